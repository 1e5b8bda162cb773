"""Quantized checkpoints: which tensors are quantized, how they are stored, how they load.

A model converted with ``--quant int8|int4`` stores every matmul weight ``X.weight``
(q/k/v/o, gate/up/down, the head) as

    int8:  X.qweight int8 [out, in]        X.scales fp32 [out]                 w ~ q * scale
    int4:  X.qweight uint8 [out, in/2]     X.scales, X.mins fp32 [out, in/g]   w ~ q * scale + min
           (two 4-bit codes a byte, low nibble first; g = 32 by default)

Quantization is per output row (int8) or per row and group of g input columns (int4), and the
tensors are row-major, so the row-wise concatenation the runtime does (q|k|v, gate|up) is a
concatenation of the stored parts. The embedding and norms stay dense in the file's dtype. A
tied head gets its own ``lm_head.*`` tensors, because it is quantized while the embedding lookup
is not. The manifest records ``"quant": {"mode": ..., "group": ...}``.

On CPU these load into ATen's weight-only kernels (dllm/model/cpu_quant.py). On CUDA an int4
checkpoint is dequantized and requantized for the Triton W4A16 kernel (integer zero points, so
a second rounding); int8 is CPU only.
"""
from __future__ import annotations

import re

import torch

from dllm.errors import WeightsError
from dllm.model.cpu_quant import CpuInt4Weight, Int8Weight, fit_group, quantize_int4, quantize_int8, unpack_int4
from dllm.model.quant import Int4Weight

MODES = ("int8", "int4")
_MATMUL_RE = re.compile(r"(\.self_attn\.[qkvo]_proj|\.mlp\.(gate|up|down)_proj)\.weight$|^lm_head\.weight$")
# The int4 recipe keeps q|k|v in int8: they are ~5% of a model's matmul parameters (GQA keeps k/v
# narrow) and carried the largest loss per byte. Measured on Qwen2.5-Coder-0.5B, perplexity over
# fp32 with the activation-weighted int4 search: +12.9% all int4, +8.8% with q|k|v int8, for +4%
# bytes (bench/results/quant-quality.json has the current whole-model numbers).
INT4_INT8_KINDS = ("qkv",)
_QKV_RE = re.compile(r"\.self_attn\.[qkv]_proj\.weight$")
PARTS = {"int8": ("qweight", "scales"), "int4": ("qweight", "scales", "mins")}


def is_matmul_weight(name: str) -> bool:
    """q/k/v/o, gate/up/down projection weights and the head (HF names)."""
    return _MATMUL_RE.search(name) is not None


def base_name(name: str) -> str:
    """'model.layers.0.self_attn.q_proj.weight' -> 'model.layers.0.self_attn.q_proj'."""
    return name[: -len(".weight")]


_SLOT_RE = re.compile(r"^model\.layers\.(\d+)\.(?:self_attn\.([qkvo])_proj|mlp\.(gate|up|down)_proj)\.weight$")
_SLOT_KIND = {"q": "qkv", "k": "qkv", "v": "qkv", "o": "o", "gate": "gate_up", "up": "gate_up", "down": "down"}


def slot_key(name: str) -> str:
    """The runtime's slot key (StageModel.slot_keys: importance and quant-cache keys) of HF matmul
    weight ``name``: q/k/v share "layers.{i}.qkv", gate/up "layers.{i}.gate_up"; the head is "head"."""
    if name == "lm_head.weight":
        return "head"
    m = _SLOT_RE.match(name)
    if m is None:
        raise ValueError(f"{name} is not a matmul weight")
    return f"layers.{m.group(1)}.{_SLOT_KIND[m.group(2) or m.group(3)]}"


def tensor_mode(name: str, mode: str) -> str:
    """How HF weight ``name`` is stored in a ``mode`` checkpoint: int4 keeps q/k/v in int8."""
    return "int8" if mode == "int4" and "qkv" in INT4_INT8_KINDS and _QKV_RE.search(name) else mode


def stored_names(name: str, mode: str | None) -> list[str]:
    """The checkpoint tensors that hold HF weight ``name`` under ``mode``."""
    if mode is None or not is_matmul_weight(name):
        return [name]
    return [f"{base_name(name)}.{p}" for p in PARTS[tensor_mode(name, mode)]]


def quantize_tensor(w: torch.Tensor, mode: str, group: int = 32,
                    importance: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """A dense [out, in] weight -> {part: tensor} as stored (see the module docstring); int4
    with ``importance`` runs the activation-weighted search (cpu_quant.quantize_int4)."""
    if mode == "int8":
        q, s = quantize_int8(w)
        return {"qweight": q, "scales": s}
    q, s, m = quantize_int4(w, group, importance)
    return {"qweight": q, "scales": s, "mins": m}


def cpu_weight(parts: dict[str, torch.Tensor], mode: str, what: str = "weight"):
    """Stored parts -> the CPU weight module (Int8Weight / CpuInt4Weight) that runs them."""
    if mode == "int8":
        return Int8Weight(parts["qweight"], parts["scales"])
    if parts["qweight"].shape[1] * 2 % parts["scales"].shape[1]:
        raise WeightsError(f"{what}: {parts['scales'].shape[1]} scale groups do not divide its columns")
    return CpuInt4Weight(parts["qweight"], parts["scales"], parts["mins"])


def stored_shapes(shape: tuple[int, int], mode: str, group: int = 32) -> dict[str, tuple[list[int], torch.dtype]]:
    """{part: (shape, dtype)} quantize_tensor will produce for a weight of ``shape``, without data."""
    n_out, n_in = shape
    if mode == "int8":
        return {"qweight": ([n_out, n_in], torch.int8), "scales": ([n_out], torch.float32)}
    g = fit_group(n_in, group)
    return {"qweight": ([n_out, n_in // 2], torch.uint8), "scales": ([n_out, n_in // g], torch.float32),
            "mins": ([n_out, n_in // g], torch.float32)}


def dequantize_parts(parts: dict[str, torch.Tensor], mode: str) -> torch.Tensor:
    """Stored parts -> the dense fp32 [out, in] weight they stand for."""
    if mode == "int8":
        return parts["qweight"].float() * parts["scales"].float()[:, None]
    q = unpack_int4(parts["qweight"]).float()
    g = q.shape[1] // parts["scales"].shape[1]
    return q * parts["scales"].repeat_interleave(g, 1) + parts["mins"].repeat_interleave(g, 1)


def fused_weight(tensors: dict[str, torch.Tensor], names: list[str], mode: str, device: torch.device,
                 dtype: torch.dtype = torch.float32):
    """The quantized weight module for HF weights ``names`` fused along output rows."""
    mode = tensor_mode(names[0], mode)
    parts = {p: torch.cat([tensors[f"{base_name(n)}.{p}"] for n in names]) for p in PARTS[mode]}
    if device.type == "cpu":
        return cpu_weight(parts, mode, names[0])
    if mode == "int8":
        raise WeightsError("int8 checkpoints run on CPU; convert with --quant int4 for a GPU")
    dense = dequantize_parts(parts, mode)
    return Int4Weight.from_dense(dense.to(device=device, dtype=dtype), fit_group(dense.shape[1], 128))
