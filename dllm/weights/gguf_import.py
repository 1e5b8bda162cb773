"""Read a GGUF checkpoint as HF-named float32 tensors plus a ModelConfig.

GGUFSource memory-maps the file (gguf.GGUFReader) and dequantizes one tensor per ``load`` call,
so a converter can stream a model far larger than RAM. Three things differ from an HF checkpoint:

* names: llama.cpp's ``blk.N.attn_q.weight`` is HF's ``model.layers.N.self_attn.q_proj.weight``;
* layout: ggml lists dims fastest-first (ne = [in, out]); gguf's numpy view is already reversed,
  so a dequantized 2-D tensor is HF's [out, in];
* llama q/k rows are permuted: llama.cpp's convert_hf_to_gguf interleaves the two rotary halves of
  every head (its rope pairs x[2i], x[2i+1]; HF's pairs x[i], x[i + d/2]). We undo that for arch
  llama only; qwen2/qwen3 are stored in HF order.

Opening costs seconds (gguf-py parses each of the ~300k vocabulary strings and merges one by one),
so callers should keep one GGUFSource per file; FastGGUFReader cuts that 3.5x.
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
    if qtype not in GGML_QUANT_SIZES:
        return False
    _, type_size = GGML_QUANT_SIZES[qtype]
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
        self._arch = _Meta(self.reader, self.path.name).require("general.architecture")
        if self._arch not in GGUF_ARCHS:  # before mapping names: other archs have other tensors
            raise ConfigError(f"{self.path.name}: unsupported GGUF architecture {self._arch!r}; "
                              f"supported: {', '.join(sorted(GGUF_ARCHS))}")
        self._by_hf: dict[str, object] = {}
        for t in self.reader.tensors:
            if t.name in _NOT_WEIGHTS:
                continue
            hf = hf_tensor_name(t.name)
            if hf is None:
                raise WeightsError(f"{self.path.name}: GGUF tensor {t.name!r} has no HF equivalent dllm knows")
            self._by_hf[hf] = t

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


# ---- metadata -> HF config.json dict ---------------------------------------------------------

# GGUF general.architecture -> HF model_type. llama.cpp also files Mistral under "llama".
GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


class _Meta:
    """Typed reads of GGUF key/values; a missing required key fails by name."""

    def __init__(self, reader: GGUFReader, name: str):
        self.fields, self.name = reader.fields, name

    def get(self, key: str, default=None):
        f = self.fields.get(key)
        return default if f is None else f.contents()

    def require(self, key: str):
        value = self.get(key)
        if value is None:
            raise ConfigError(f"{self.name}: GGUF metadata has no {key!r}")
        return value


def hf_config_from_gguf(reader: GGUFReader, name: str = "GGUF") -> dict:
    """The HF config.json dict a GGUF's metadata describes (the fields ModelConfig.from_hf reads)."""
    meta = _Meta(reader, name)
    arch = meta.require("general.architecture")
    if arch not in GGUF_ARCHS:
        raise ConfigError(f"{name}: unsupported GGUF architecture {arch!r}; supported: {', '.join(sorted(GGUF_ARCHS))}")
    tensors = {t.name: t for t in reader.tensors}
    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise WeightsError(f"{name}: GGUF has no token_embd.weight tensor")
    hidden, heads = int(meta.require(f"{arch}.embedding_length")), int(meta.require(f"{arch}.attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length") or hidden // heads)
    theta = float(meta.get(f"{arch}.rope.freq_base", 10000.0))
    d = {
        "model_type": _model_type(arch, meta.get("general.name")),
        "hidden_size": hidden,
        "num_hidden_layers": int(meta.require(f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv") or heads),
        "head_dim": head_dim,
        "intermediate_size": _scalar(meta.require(f"{arch}.feed_forward_length"), "feed_forward_length", name),
        # The embedding's row count is the model's vocabulary; the token list may be shorter
        # when the embedding was padded (e.g. to a multiple of 64).
        "vocab_size": int(embd.shape[1]),
        "rms_norm_eps": float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(meta, arch, tensors.get("rope_freqs.weight"), theta, head_dim),
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": _eos_ids(meta),
    }
    if arch == "llama" and "blk.0.attn_q.bias" in tensors:
        d["attention_bias"] = True
    return d


def _model_type(arch: str, general_name: str | None) -> str:
    # Same rule as transformers' GGUF loader: "llama" files named like Mistral are Mistral.
    if arch == "llama" and general_name and "mistral" in general_name.lower():
        return "mistral"
    return GGUF_ARCHS[arch]


def _scalar(value, key: str, name: str) -> int:
    if isinstance(value, list):  # per-layer sizes (OpenELM-style) need a different block
        raise ConfigError(f"{name}: per-layer {key} {value[:4]}... is not supported")
    return int(value)


def _eos_ids(meta: _Meta) -> list[int] | int | None:
    """eos, plus end-of-turn / end-of-message ids when the GGUF names them (chat models stop on those)."""
    ids = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        v = meta.get(key)
        if v is not None and int(v) not in ids:
            ids.append(int(v))
    return None if not ids else ids[0] if len(ids) == 1 else ids


def _rope_scaling(meta: _Meta, arch: str, rope_freqs, theta: float, head_dim: int) -> dict | None:
    """HF rope_scaling from {arch}.rope.scaling.* (linear / yarn) or a llama3 rope_freqs tensor."""
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor", meta.get(f"{arch}.rope.scale_linear"))
    if kind is None and factor is not None:
        kind = "linear"  # older files wrote only rope.scale_linear
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        orig = meta.require(f"{arch}.rope.scaling.original_context_length")
        return {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": int(orig)}
    if kind not in (None, "none"):
        raise ConfigError(f"{meta.name}: rope scaling type {kind!r} is not supported (linear, yarn, llama3)")
    if rope_freqs is not None:
        freqs = dequantize(rope_freqs.data, rope_freqs.tensor_type).reshape(-1)
        return _llama3_scaling(freqs, theta, head_dim, meta.name)
    return None


def _llama3_scaling(freqs: np.ndarray, theta: float, head_dim: int, name: str) -> dict:
    """Recover Llama 3.1 rope_scaling from the per-frequency factors llama.cpp baked into rope_freqs.

    convert_hf_to_gguf computes factors from (factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings); every released Llama 3.x uses low=1, high=4, original=8192,
    so we rebuild with those and the largest factor, and refuse anything that does not reproduce.
    """
    cand = {"rope_type": "llama3", "factor": float(freqs.max()), "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv
    orig, lo, hi, f = 8192, 1.0, 4.0, cand["factor"]
    smooth = (orig / wavelen - lo) / (hi - lo)
    want = np.where(wavelen < orig / hi, 1.0, np.where(wavelen > orig / lo, f, 1 / ((1 - smooth) / f + smooth)))
    if want.shape != freqs.shape or not np.allclose(want, freqs, rtol=1e-4):
        raise ConfigError(f"{name}: rope_freqs.weight does not match llama3 rope scaling with "
                          "low_freq_factor=1, high_freq_factor=4, original_max_position_embeddings=8192")
    return cand


class FastGGUFReader(GGUFReader):
    """GGUFReader whose buffer is a plain ndarray view of the same mmap.

    gguf-py slices its np.memmap once per metadata value, and every memmap slice runs
    memmap.__array_finalize__: 4.5 s -> 1.25 s to open SmolLM2, 13.1 s -> 4.6 s for Qwen2.5-0.5B.
    The view shares the mapping (no copy) and tensor .data become ndarray views; fields are unchanged.
    """

    @property
    def data(self):
        return self._buf

    @data.setter
    def data(self, value):
        self._buf = value.view(np.ndarray) if isinstance(value, np.memmap) else value


def open_reader(path: Path) -> GGUFReader:
    """GGUFReader on path, with missing/corrupt files turned into WeightsError naming the file."""
    if not path.is_file():
        raise WeightsError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise WeightsError(f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        return FastGGUFReader(path)
    except Exception as e:  # gguf-py raises ValueError/IndexError/KeyError on truncated or bad headers
        raise WeightsError(f"{path} is a corrupt or truncated GGUF file: {type(e).__name__}: {e}") from None
