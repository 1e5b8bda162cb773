"""Read a GGUF checkpoint as HF-named float32 tensors plus a ModelConfig.

GGUFSource memory-maps the file (gguf.GGUFReader) and dequantizes one tensor per ``load`` call,
so a converter can stream a model far larger than RAM. Three things differ from an HF checkpoint:

* names: llama.cpp's ``blk.N.attn_q.weight`` is HF's ``model.layers.N.self_attn.q_proj.weight``;
* layout: ggml lists dims fastest-first (ne = [in, out]); gguf's numpy view is already reversed,
  so a dequantized 2-D tensor is HF's [out, in];
* llama q/k rows are permuted: llama.cpp's convert_hf_to_gguf interleaves the two rotary halves of
  every head (its rope pairs x[2i], x[2i+1]; HF's pairs x[i], x[i + d/2]). We undo that for arch
  llama only; qwen2/qwen3 are stored in HF order.

Opening costs seconds (gguf-py parses each of the ~150k vocabulary strings one by one: ~4 s for
SmolLM2, ~12 s for Qwen2.5-0.5B on one core), so callers should keep one GGUFSource per file.
"""
from __future__ import annotations

import re
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

from dllm.config import ModelConfig
from dllm.errors import ConfigError, UnsupportedQuantError, WeightsError
from dllm.weights.gguf_config import hf_config_from_gguf

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# GGUF tensors that are not HF parameters: llama3 rope factors are folded into config.rope_scaling.
_NOT_WEIGHTS = {"rope_freqs.weight"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_tensor_name(gguf_name: str) -> str | None:
    """HF name for a GGUF tensor name; None when the name is not one we map."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m is None or m.group(2) not in _BLOCK_NAMES:
        return None
    return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"


@lru_cache(maxsize=None)
def can_dequantize(qtype: GGMLQuantizationType) -> bool:
    """Whether gguf.quants has a dequantizer for qtype (probed on one zero block: no private API)."""
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return True
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    try:
        dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute``: [n_head*d, ...] rows back to HF rotary-half order.

    llama.cpp wrote rows as reshape(n_head, 2, d/2, ...).swapaxes(1, 2): (head, i, half). We read
    them as (head, i, half) and swap back to (head, half, i). Works for weights [out, in] and biases [out].
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise WeightsError(f"cannot un-permute {rows} rope rows into {n_head} heads of even size")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFSource:
    """One GGUF file: ``.config``, ``.tensor_names()``, ``.load(hf_name)`` -> float32 [out, in]."""

    kind = "gguf"

    def __init__(self, path: str | Path, reader: GGUFReader | None = None):
        self.path = Path(path)
        self.reader = reader if reader is not None else open_reader(self.path)
        self._by_hf: dict[str, object] = {}
        for t in self.reader.tensors:
            if t.name in _NOT_WEIGHTS:
                continue
            hf = hf_tensor_name(t.name)
            if hf is None:
                raise WeightsError(f"{self.path.name}: GGUF tensor {t.name!r} has no HF equivalent dllm knows")
            self._by_hf[hf] = t
        self._arch = str(self._field("general.architecture"))

    def _field(self, key: str):
        f = self.reader.fields.get(key)
        if f is None:
            raise ConfigError(f"{self.path.name}: GGUF metadata has no {key!r}")
        return f.contents()

    @cached_property
    def hf_config(self) -> dict:
        """The HF config.json dict this GGUF describes (transformers' field names)."""
        return hf_config_from_gguf(self.reader, name=self.path.name)

    @cached_property
    def config(self) -> ModelConfig:
        return ModelConfig.from_hf(self.hf_config)

    def tensor_names(self) -> list[str]:
        """HF names in file order (llama.cpp writes embed, then block by block, then head)."""
        return list(self._by_hf)

    def shape(self, hf_name: str) -> tuple[int, ...]:
        """HF shape ([out, in] for matrices) without reading the data."""
        return tuple(int(n) for n in reversed(self._tensor(hf_name).shape))

    def quant_type(self, hf_name: str) -> str:
        return self._tensor(hf_name).tensor_type.name

    def check_supported(self) -> None:
        """Raise UnsupportedQuantError for the first tensor we cannot dequantize (before any work)."""
        for hf, t in self._by_hf.items():
            self._require_dequantizable(hf, t)

    def load(self, hf_name: str) -> torch.Tensor:
        """Dequantize one tensor to float32 in HF layout; q/k un-permuted for llama."""
        t = self._tensor(hf_name)
        self._require_dequantizable(hf_name, t)
        try:
            w = dequantize(t.data, t.tensor_type).reshape(self.shape(hf_name))
        except ValueError as e:  # a truncated or inconsistent tensor payload
            raise WeightsError(f"{self.path.name}: tensor {t.name} ({t.tensor_type.name}) is corrupt: {e}") from None
        if self._arch == "llama" and ".self_attn.q_proj." in hf_name:
            w = unpermute_rope_rows(w, self.config.num_heads)
        elif self._arch == "llama" and ".self_attn.k_proj." in hf_name:
            w = unpermute_rope_rows(w, self.config.num_kv_heads)
        # F32 payloads come back as read-only views of the mmap; torch needs its own writable copy.
        w = np.ascontiguousarray(w, dtype=np.float32)
        return torch.from_numpy(w if w.flags.writeable else w.copy())

    def tensors(self, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(hf_name, tensor) one at a time, so only one dequantized tensor is alive per step."""
        for name in self.tensor_names() if names is None else names:
            yield name, self.load(name)

    def _tensor(self, hf_name: str):
        t = self._by_hf.get(hf_name)
        if t is None:
            raise WeightsError(f"{self.path.name} has no tensor {hf_name!r}")
        return t

    def _require_dequantizable(self, hf_name: str, t) -> None:
        if not can_dequantize(t.tensor_type):
            raise UnsupportedQuantError(
                f"{self.path.name}: tensor {t.name} ({hf_name}) has quantization type {t.tensor_type.name}, "
                "which dllm cannot dequantize")


def open_reader(path: Path) -> GGUFReader:
    """GGUFReader on path, with missing/corrupt files turned into WeightsError naming the file."""
    if not path.is_file():
        raise WeightsError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise WeightsError(f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        return GGUFReader(path)
    except Exception as e:  # gguf-py raises ValueError/IndexError/KeyError on truncated or bad headers
        raise WeightsError(f"{path} is a corrupt or truncated GGUF file: {type(e).__name__}: {e}") from None
