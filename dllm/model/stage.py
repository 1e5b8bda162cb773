"""StageModel: a contiguous range of decoder layers, optionally with the embedding and the head.

The narrow interface every caller shares (engine, stage server, tests)::

    x = stage.embed(ids)             # [T] -> [T, H]          (needs embed=True)
    x = stage(x, kv, meta)           # [T, H] -> [T, H]       runs layers[a:b] over the paged KV
    logits = stage.logits(x)         # [N, H] -> [N, V]       final norm + head (needs head=True)

A stage built with ``from_pretrained`` reads only its own tensors from the checkpoint.

On CUDA with triton the layers run the Triton ops of dllm/kernels/ (`use_kernels`); `DLLM_KERNELS=0`
or ``set_kernels(False)`` forces the torch path. ``quantize("int4"|"int8")`` turns every matmul weight
(not the embedding lookup) into weight-only int4 / int8 (Triton W4A16 on CUDA, ATen's CPU kernels on
CPU).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from dllm.config import ModelConfig
from dllm.errors import WeightsError
from dllm.kv.paged_cache import PagedKVCache
from dllm.model.attention import AttentionMetadata
from dllm.model.layers import DecoderLayer, RMSNorm, Rotary
from dllm.model.cpu_quant import CpuInt4Weight, Int8Weight
from dllm.model.quant import CPU_LAYOUTS, GemvWeight, Int4Weight, PackedWeight, linear
from dllm.weights.loader import load_tensors
from dllm.weights.manifest import Manifest
from dllm.weights.quantized import INT4_INT8_KINDS, fused_weight, stored_names

QUANTIZED = (Int4Weight, CpuInt4Weight, Int8Weight)
DENSE_LAYOUTS = (PackedWeight, GemvWeight)  # dense fp32 weights laid out for the CPU (.dense() gives them back)
MATMUL_KINDS = ("qkv", "o", "gate_up", "down", "head")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of float32, bfloat16, float16") from None


class StageModel(nn.Module):
    def __init__(self, config: ModelConfig, layers: range | None = None, embed: bool = True, head: bool = True):
        super().__init__()
        layers = range(config.num_layers) if layers is None else layers
        if layers.step != 1 or layers.start < 0 or layers.stop > config.num_layers or layers.start > layers.stop:
            raise ValueError(f"layer range {layers.start}:{layers.stop} is outside the model's 0:{config.num_layers}")
        self.config = config
        self.layer_range = layers
        self.has_embed, self.has_head = embed, head
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size) if embed else None
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in layers)
        self.rotary = Rotary(config)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if head else None
        # a tied head shares the embedding matrix; a head-only stage keeps its own copy
        self.lm_head = None
        if head and not (config.tie_word_embeddings and embed):
            self.lm_head = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size), requires_grad=False)
        self.requires_grad_(False)
        self.use_kernels = False
        self.quant = None  # "int4" / "int8" once quantize() ran
        self.cpu_layout = None  # "batched" / "single" once optimize_cpu_layout() laid fp32 weights out
        self.set_kernels(kernels_default())

    def set_kernels(self, on: bool) -> "StageModel":
        """Run the Triton ops (True) or the torch references (False) in every layer."""
        self.use_kernels = bool(on)
        for m in self.modules():
            if m is not self and hasattr(m, "use_kernels"):
                m.use_kernels = self.use_kernels
        return self

    def layer_matmuls(self):
        """(module, attribute) of every layer matmul weight: qkv, o, gate_up, down per layer."""
        for kind, module, name in self.matmul_slots():
            if kind != "head":
                yield module, name

    def matmul_slots(self):
        """(kind, module, attribute) of every matmul weight: per layer "qkv", "o", "gate_up",
        "down", then "head" (attribute lm_head; a tied head's weight is the embedding's) if this
        stage has it."""
        for layer in self.layers:
            yield from (("qkv", layer.attn, "qkv_weight"), ("o", layer.attn, "o_weight"),
                        ("gate_up", layer.mlp, "gate_up_weight"), ("down", layer.mlp, "down_weight"))
        if self.has_head:
            yield "head", self, "lm_head"

    def slot_keys(self):
        """A name per matmul_slots entry that holds across stage splits: "layers.{i}.{kind}" with
        i the model's layer index, and "head" (the keys of importance and the quantized cache)."""
        for i in self.layer_range:
            yield from (f"layers.{i}.{kind}" for kind in MATMUL_KINDS[:4])
        if self.has_head:
            yield "head"

    def quantize(self, mode: str = "int4", group: int | None = None, backend: str = "auto",
                 kinds=MATMUL_KINDS, importance: dict | None = None, int8_kinds=None,
                 cache_dir: Path | None = None) -> "StageModel":
        """Replace every matmul weight (qkv, o, gate_up, down, the head; not the embedding lookup)
        by a quantized one, one at a time so each dense copy is freed before the next.

        mode: "int4" (group-wise, `group` input columns per scale: default 32 on CPU, 128 for
        W4A16) or "int8" (per output row).
        backend: "w4a16" = Int4Weight (the Triton W4A16 kernel on CUDA, its torch reference
        elsewhere); "cpu" = ATen's weight-only CPU kernels (dllm/model/cpu_quant.py); "auto" =
        "cpu" on a CPU model, "w4a16" otherwise. A tied head gets its own quantized copy.
        kinds: only the matmuls of these kinds (MATMUL_KINDS; bench/quant_quality.py measures
        what each kind alone costs).
        importance: {slot key: [in]} (dllm/model/calibrate.py) for the CPU backend's
        activation-weighted int4 search; without it int4 rounds to nearest.
        int8_kinds: kinds kept int8 under CPU int4 (default INT4_INT8_KINDS, why: weights/quantized.py).
        cache_dir: a quant_cache entry to read slots from and write them to."""
        from dllm.model import quant_cache
        from dllm.weights.quantized import cpu_weight, quantize_tensor

        if mode not in ("int4", "int8"):
            raise ValueError(f"unknown quantization {mode!r}; choose int4 or int8")
        if backend == "auto":
            backend = "cpu" if self.device.type == "cpu" else "w4a16"
        if backend == "w4a16" and mode != "int4":
            raise ValueError("the W4A16 backend (GPU) runs int4 only; int8 is a CPU path")
        if backend not in ("cpu", "w4a16"):
            raise ValueError(f"unknown quantization backend {backend!r}")
        unknown = set(kinds) - set(MATMUL_KINDS)
        if unknown:
            raise ValueError(f"unknown matmul kinds {sorted(unknown)}; known: {', '.join(MATMUL_KINDS)}")
        int8_kinds = (INT4_INT8_KINDS if int8_kinds is None else tuple(int8_kinds)) if mode == "int4" else ()
        importance = importance or {}

        def make(key: str, kind: str, dense: torch.Tensor) -> nn.Module:
            if backend == "w4a16":
                return Int4Weight.from_dense(dense, group or 128)
            slot_mode = "int8" if kind in int8_kinds else mode
            parts = quant_cache.load_parts(cache_dir, key)
            if parts is None:
                parts = quantize_tensor(dense, slot_mode, group or 32, importance.get(key))
                quant_cache.save_parts(cache_dir, key, parts)
            return cpu_weight(parts, slot_mode, key)

        self._replace_matmuls(lambda key, kind, w: None if kind not in kinds or isinstance(w, QUANTIZED) else
                              make(key, kind, w.dense() if isinstance(w, DENSE_LAYOUTS) else w.data))
        self.quant = mode
        return self.set_kernels(self.use_kernels)

    def optimize_cpu_layout(self, layout: str = "batched") -> "StageModel":
        """Lay every fp32 matmul weight (qkv, o, gate_up, down, the head) out for the CPU.

        layout: "batched" = quant.PackedWeight (oneDNN: cost nearly flat from 1 to 8 rows, where
        MKL's grows ~3x, and a row's result the same bits alone or batched: what batching and
        speculation need); "single" = quant.GemvWeight (laid out for MKL's sgemv: the fastest for
        one row, for an engine that runs one sequence and verifies no drafts).

        A tied head gets its own copy of the embedding (vocab x hidden more memory: 113 MB for
        SmolLM2, 0.9 GB for Qwen2.5-1.5B in fp32) because the head reads the whole matrix every
        token while the embedding lookup reads one row."""
        if layout not in CPU_LAYOUTS:
            raise ValueError(f"unknown CPU layout {layout!r}; choose {' or '.join(CPU_LAYOUTS)}")
        if self.device.type != "cpu" or self.dtype != torch.float32:
            return self  # bf16 goes through oneDNN already
        if layout == "batched" and not PackedWeight.available():
            return self  # no oneDNN: plain F.linear (the single layout needs only MKL)
        make = CPU_LAYOUTS[layout]
        self._replace_matmuls(lambda key, kind, w: make(w.dense() if isinstance(w, DENSE_LAYOUTS) else w.data)
                              if isinstance(w, DENSE_LAYOUTS) or (isinstance(w, torch.Tensor) and w.dim() == 2)
                              else None)
        self.cpu_layout = layout
        return self

    def _replace_matmuls(self, make) -> None:
        """For every matmul slot, install ``make(key, kind, weight)`` in its place unless it returns
        None; one slot at a time, so each old weight can be freed before the next is built. A
        tied head's weight is the embedding's (the new module is the head's own copy)."""
        for key, (kind, module, name) in list(zip(self.slot_keys(), self.matmul_slots())):
            w = getattr(module, name)
            if kind == "head" and w is None:
                w = self.embed_tokens.weight
            new = make(key, kind, w)
            if new is None:
                continue
            if hasattr(module, name):
                delattr(module, name)
            setattr(module, name, new)

    # ---- weights -------------------------------------------------------------------------
    def tensor_names(self, quant: str | None = None) -> list[str]:
        """The checkpoint tensors this stage needs (HF names; a quantized checkpoint's matmul
        weights expand to their stored parts, dllm/weights/quantized.py)."""
        c, names = self.config, []
        if self.has_embed:
            names.append("model.embed_tokens.weight")
        for i in self.layer_range:
            p = f"model.layers.{i}."
            names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
            names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
            if c.qkv_bias:
                names += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
            if c.qk_norm:
                names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
            names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
        if self.has_head:
            names.append("model.norm.weight")
            if quant is not None:
                names.append("lm_head.weight")  # a quantized checkpoint stores even a tied head
            elif self.lm_head is not None:
                names.append("model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight")
        return list(dict.fromkeys(n for name in names for n in stored_names(name, quant)))

    def load_state(self, t: dict[str, torch.Tensor], quant: str | None = None) -> None:
        """Copy HF-named tensors in, fusing q/k/v and gate/up; shapes are checked by name.
        With ``quant`` the matmul weights are built from their quantized parts instead."""
        def put(param: torch.Tensor, value: torch.Tensor, name: str):
            if param.shape != value.shape:
                raise WeightsError(f"{name}: checkpoint shape {tuple(value.shape)} != expected {tuple(param.shape)}")
            param.copy_(value)

        def matmul(module: nn.Module, attr: str, names: list[str], fused: str):
            if quant is not None:
                w = fused_weight(t, names, quant, self.device, self.dtype)
                expect = tuple(getattr(module, attr).shape) if getattr(module, attr) is not None else w.shape
                if tuple(w.shape) != tuple(expect):
                    raise WeightsError(f"{fused}: checkpoint shape {tuple(w.shape)} != expected {tuple(expect)}")
                delattr(module, attr)
                setattr(module, attr, w)
            else:
                put(getattr(module, attr), torch.cat([t[n] for n in names]), fused)

        if self.has_embed:
            put(self.embed_tokens.weight, t["model.embed_tokens.weight"], "model.embed_tokens.weight")
        for layer, i in zip(self.layers, self.layer_range):
            p = f"model.layers.{i}."
            a = layer.attn
            put(layer.input_norm.weight, t[p + "input_layernorm.weight"], p + "input_layernorm.weight")
            put(layer.post_attn_norm.weight, t[p + "post_attention_layernorm.weight"], p + "post_attention_layernorm.weight")
            matmul(a, "qkv_weight", [p + f"self_attn.{x}_proj.weight" for x in "qkv"], p + "self_attn.qkv_proj.weight")
            if a.qkv_bias is not None:
                put(a.qkv_bias, torch.cat([t[p + f"self_attn.{x}_proj.bias"] for x in "qkv"]), p + "self_attn.qkv_proj.bias")
            matmul(a, "o_weight", [p + "self_attn.o_proj.weight"], p + "self_attn.o_proj.weight")
            if a.q_norm is not None:
                put(a.q_norm.weight, t[p + "self_attn.q_norm.weight"], p + "self_attn.q_norm.weight")
                put(a.k_norm.weight, t[p + "self_attn.k_norm.weight"], p + "self_attn.k_norm.weight")
            matmul(layer.mlp, "gate_up_weight", [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"],
                   p + "mlp.gate_up_proj.weight")
            matmul(layer.mlp, "down_weight", [p + "mlp.down_proj.weight"], p + "mlp.down_proj.weight")
        if self.has_head:
            put(self.norm.weight, t["model.norm.weight"], "model.norm.weight")
            if quant is not None:
                self.lm_head = fused_weight(t, ["lm_head.weight"], quant, self.device, self.dtype)
                if tuple(self.lm_head.shape) != (self.config.vocab_size, self.config.hidden_size):
                    raise WeightsError(f"lm_head.weight: checkpoint shape {tuple(self.lm_head.shape)} != expected "
                                       f"{(self.config.vocab_size, self.config.hidden_size)}")
            elif self.lm_head is not None:
                name = "model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight"
                put(self.lm_head, t[name], name)
        if quant is not None:
            self.quant = quant
            self.set_kernels(self.use_kernels)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, layers: range | None = None, embed: bool = True, head: bool = True,
                        dtype: str | torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        config: ModelConfig | None = None, verify: bool = True, quant: str | None = None,
                        cpu_layout: str = "batched") -> "StageModel":
        """Load this stage's tensors. ``dtype`` is the activation (and dense weight) dtype;
        ``cpu_layout`` lays out fp32 CPU matmul weights (optimize_cpu_layout).
        A quantized checkpoint (manifest "quant") loads as such; ``quant`` on a dense one
        quantizes after loading (``quantize``); asking a quantized checkpoint for another
        quantization is an error."""
        config = config or ModelConfig.from_dir(model_dir)
        dtype = parse_dtype(dtype)
        manifest = Manifest.load(model_dir)
        stored = manifest.quant["mode"] if manifest is not None and manifest.quant else None
        if stored is not None and quant not in (None, stored):
            raise WeightsError(f"{model_dir} is a {stored} checkpoint; it cannot run as {quant} "
                               f"(convert the original weights with --quant {quant})")
        with torch.device("meta"):
            stage = cls(config, layers, embed, head)
        if stored is not None:
            stage._drop_dense_matmuls()
        stage = stage.to_empty(device=device).to(dtype)
        stage.rotary = Rotary(config).to(device)  # buffers computed, not loaded
        tensors = load_tensors(model_dir, stage.tensor_names(stored), verify=verify)
        stage.load_state(tensors, stored)
        del tensors
        if stored is None and quant is not None:
            from dllm.model import quant_cache
            from dllm.model.calibrate import load_importance

            importance = load_importance(model_dir) if quant == "int4" and stage.device.type == "cpu" else None
            recipe = {"mode": quant, "group": 32, "int8_kinds": list(INT4_INT8_KINDS), "version": 1}
            cache = quant_cache.entry_dir(model_dir, manifest, recipe) if stage.device.type == "cpu" else None
            return stage.quantize(quant, importance=importance, cache_dir=cache)
        return stage.optimize_cpu_layout(cpu_layout)

    def _drop_dense_matmuls(self) -> None:
        """Replace the (meta) dense matmul weights by placeholders before to_empty, so loading a
        quantized checkpoint never allocates the dense model; load_state installs the modules."""
        for module, name in self.layer_matmuls():
            shape = tuple(getattr(module, name).shape)
            delattr(module, name)
            setattr(module, name, _Placeholder(shape))
        if "lm_head" in self._parameters:  # an untied head: unregister it, or load_state cannot set a module
            delattr(self, "lm_head")
        self.lm_head = None

    # ---- compute -------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].input_norm.weight.dtype if len(self.layers) else (
            self.embed_tokens.weight.dtype if self.embed_tokens is not None else self.norm.weight.dtype)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def new_kv_cache(self, num_blocks: int, block_size: int = 16) -> PagedKVCache:
        c = self.config
        return PagedKVCache(len(self.layers), num_blocks, block_size, c.num_kv_heads, c.head_dim, self.dtype, self.device)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)

    def forward(self, x: torch.Tensor, kv: PagedKVCache, meta: AttentionMetadata) -> torch.Tensor:
        """x [T, H] -> [T, H] through this stage's layers, reading and writing ``kv``."""
        if not len(self.layers):
            return x
        x = x.to(self.dtype)
        if self.use_kernels:
            cos, sin = self.rotary.kernel_table(meta.max_position + 1, meta.positions.device)
        else:
            cos, sin = self.rotary.cos_sin(meta.positions, x.dtype)
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer.forward(x, residual, cos, sin, kv.layer(i), meta)
        return x + residual

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and head: [N, H] -> [N, V] float32 logits."""
        w = self.lm_head if self.lm_head is not None else self.embed_tokens.weight
        return linear(self.norm(x.to(self.dtype)), w).float()


class _Placeholder(nn.Module):
    """Shape of a matmul weight that load_state is about to install (no storage)."""

    def __init__(self, shape: tuple[int, int]):
        super().__init__()
        self.shape = shape


def kernels_default() -> bool:
    """Triton ops when they can run here (CUDA + triton), unless DLLM_KERNELS=0."""
    from dllm import kernels

    return os.environ.get("DLLM_KERNELS", "1") != "0" and kernels.triton_available()
