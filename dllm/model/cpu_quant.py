"""Weight-only quantized matmul weights for CPU: int8 per output channel and int4 group-wise.

Both run on PyTorch's own CPU kernels (ATen's weight-only int8/int4 pack matmuls, AVX-512 /
AVX2 vectorised), chosen by measurement on this project's 2-core EPYC (bench/cpu_fast_path.py
reruns the choice on whole models). One 17920x1536 matmul (Qwen2.5-1.5B gate_up), weights
cycled through more than the L3, ms per call at 1 / 4 / 16 rows:

    fp32 input-major (MKL)              4.89 / 13.3 / 14.1
    bf16 dense (oneDNN)                 2.61 /  2.6 /  3.9   rows not independent
    int8 weight-only (_weight_int8pack_mm, bf16 activations)   1.51 / 2.2 / 8.0
    int4 weight-only (_weight_int4pack_mm_for_cpu, bf16 act.)  0.72 / 1.3 / 5.2
    int8 dynamic (fbgemm, activations quantized per tensor)    0.92 / 0.9 / 1.4   rows not independent

The weight-only kernels are kept because each output row depends only on its own input row,
bit for bit, whatever the number of rows: a tree verify of 16 rows gives exactly the logits
that 16 single-token decode steps give, so speculative decoding with a quantized target stays
identical to that target's plain greedy output. fbgemm's dynamic int8 (fastest at 16 rows)
quantizes the activations with one scale per call, so a row's result depends on its
neighbours; bf16 oneDNN picks a different kernel per row count. Both would break that.

Activations stay fp32 around the matmul (norms, rope, attention, residual in fp32); they are
rounded to bf16 only as the matmul's input, which is what the kernels take.

Checkpoint format: dllm/weights/quantized.py (int8 codes + row scales; int4 codes + group
scales and offsets, row-major so fused q|k|v and gate|up are a concatenation).
"""
from __future__ import annotations

import torch
from torch import nn

ACT_DTYPE = torch.bfloat16  # what the ATen weight-only CPU kernels multiply in
INT4_GROUPS = (32, 64, 128, 256)  # group sizes _weight_int4pack_mm_for_cpu accepts


def fit_group(in_features: int, group: int) -> int:
    """The largest supported group size <= ``group`` that divides in_features (SmolLM2's 576
    columns take 64): one scale per `group` columns, and a row never straddles two groups."""
    for g in sorted(INT4_GROUPS, reverse=True):
        if g <= group and in_features % g == 0:
            return g
    raise ValueError(f"in_features {in_features} is not a multiple of any int4 group size {INT4_GROUPS}")


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (q int8 [out, in], scale fp32 [out]); symmetric per output row,
    w ~ q * scale with |q| <= 127 (round to nearest)."""
    wf = w.float()
    scale = (wf.abs().amax(1) / 127.0).clamp(min=1e-12)
    q = torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Weight(nn.Module):
    """A dense [out, in] weight as int8 codes and one bf16 scale per output row."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.dim() != 2 or scales.shape != (qweight.shape[0],):
            raise ValueError(f"int8 weight must be int8 [out, in] with scales [out]; got {qweight.dtype} "
                             f"{tuple(qweight.shape)} and {tuple(scales.shape)}")
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.to(ACT_DTYPE).contiguous())
        self.shape = tuple(qweight.shape)

    @classmethod
    def from_dense(cls, w: torch.Tensor) -> "Int8Weight":
        return cls(*quantize_int8(w))

    def dequantize(self) -> torch.Tensor:
        """[out, in] fp32 values the kernel multiplies by (scale rounded to bf16 as it is used)."""
        return self.qweight.float() * self.scales.float()[:, None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] in x.dtype."""
        if x.dim() != 2:
            return self.forward(x.reshape(-1, self.shape[1])).view(*x.shape[:-1], self.shape[0])
        return torch._weight_int8pack_mm(x.to(ACT_DTYPE), self.qweight, self.scales).to(x.dtype)

    def extra_repr(self) -> str:
        return f"out={self.shape[0]}, in={self.shape[1]}"


def quantize_int4(w: torch.Tensor, group: int = 32, importance: torch.Tensor | None = None,
                  steps: int = 20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [out, in] -> (codes uint8 [out, in/2], scale fp32 [out, in/g], min fp32 [out, in/g]).

    w ~ q * scale + min, q in 0..15, two codes a byte (low nibble = even column). The float
    offset (not an integer zero point) makes a GGUF Q4_0/Q4_1/Q4_K source with 32-column blocks
    come back exactly at group 32: measured SmolLM2 perplexity +40% at group 128 and +7% at group
    32 (layers +0.4%, the rest is the head, whose source is Q8_0); an integer zero point at group
    32 gave +28%.

    Without ``importance``: round to nearest on each group's own [min, max] range. With it
    (fp32 [in], the mean squared activation of each input column on a calibration text:
    dllm/model/calibrate.py): each group's (scale, min) minimises the activation-weighted error
    sum_i imp_i * sqrt(mean(w^2) + w_i^2) * (w_i - w'_i)^2 (llama.cpp's imatrix weighting), searched
    over ``steps`` + 1 grids of 15 +- 1.5 levels across the range, each refit by weighted least
    squares (never worse than round-to-nearest under that weight: the plain grid is one of them).
    Measured on Qwen2.5-Coder-0.5B (mostly Q5_0 source), every matmul int4, perplexity over fp32:
    bench/data/perplexity_sample.txt +14.4% -> +12.9%, held-out code (dllm/engine.py and
    dllm/net/stage_server.py) +6.6% -> +1.9%; bench/quant_quality.py measures the int4 mode itself.
    More steps are not better: 40 gave +13.5% where 20 gave +12.0% (the int4 mode, 512 tokens of
    the sample)."""
    n_out, n_in = w.shape
    g = fit_group(n_in, group)
    if importance is None:
        wg = w.float().reshape(n_out, n_in // g, g)
        lo, hi = wg.amin(-1), wg.amax(-1)
        scale = ((hi - lo) / 15.0).clamp(min=1e-12)
        q = ((wg - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8).reshape(n_out, n_in)
        return q[:, 0::2] | (q[:, 1::2] << 4), scale, lo
    if importance.shape != (n_in,):
        raise ValueError(f"importance must be [{n_in}] (one value per input column), got {tuple(importance.shape)}")
    parts = [_weighted_int4(w[r:r + 8192], g, importance.float(), steps) for r in range(0, n_out, 8192)]
    return tuple(torch.cat(p) for p in zip(*parts))


def _weighted_int4(w: torch.Tensor, g: int, importance: torch.Tensor, steps: int):
    """quantize_int4's weighted search on a block of rows (bounded temporaries: [rows, in] fp32)."""
    n_out, n_in = w.shape
    x = w.float().reshape(n_out, n_in // g, g)
    wt = importance.reshape(1, -1, g) * torch.sqrt((x * x).mean(-1, keepdim=True) + x * x)
    wx = wt * x
    sw, sx, sxx = wt.sum(-1), wx.sum(-1), (wx * x).sum(-1)
    lo, hi = x.amin(-1), x.amax(-1)
    rng = (hi - lo).clamp(min=1e-12)
    best_e = torch.full_like(sw, float("inf"))
    best_s, best_m = rng / 15, lo.clone()
    d = x - lo[..., None]
    for k in range(steps + 1):
        levels = 15 + 1.5 * (2 * k / steps - 1) if steps else 15.0
        q = (d * (levels / rng)[..., None]).round_().clamp_(0, 15)
        wq = wt * q
        sq, sqq, sqx = wq.sum(-1), (wq * q).sum(-1), (q * wx).sum(-1)
        det = sw * sqq - sq * sq
        ok = det > 0  # a grid that puts a whole group on one code has no unique fit
        det = torch.where(ok, det, torch.ones_like(det))
        s, m = (sw * sqx - sq * sx) / det, (sqq * sx - sq * sqx) / det
        err = sxx - 2 * s * sqx - 2 * m * sx + s * s * sqq + 2 * s * m * sq + m * m * sw
        better = ok & (s > 0) & (err < best_e)
        best_e = torch.where(better, err, best_e)
        best_s, best_m = torch.where(better, s, best_s), torch.where(better, m, best_m)
    q = ((x - best_m[..., None]) / best_s[..., None]).round().clamp(0, 15).to(torch.uint8).reshape(n_out, n_in)
    return q[:, 0::2] | (q[:, 1::2] << 4), best_s, best_m


def unpack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in/2] -> int32 [out, in] codes 0..15."""
    q = torch.stack([codes & 0xF, codes >> 4], -1)
    return q.reshape(codes.shape[0], -1).to(torch.int32)


class CpuInt4Weight(nn.Module):
    """Group-wise int4 codes with a float scale and offset per group, for ATen's CPU int4 matmul.

    That kernel dequantizes as (q - 8) * scale + zero, so the offset is stored as
    zero = min + 8 * scale; scale and zero are rounded to bf16, as the kernel takes them."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor):
        super().__init__()
        n_out, n_in = codes.shape[0], codes.shape[1] * 2
        if codes.dtype != torch.uint8 or scales.shape != mins.shape or scales.shape[0] != n_out \
                or n_in % scales.shape[1]:
            raise ValueError(f"int4 weight must be uint8 codes [out, in/2] with scales/mins [out, in/group]; got "
                             f"{codes.dtype} {tuple(codes.shape)}, {tuple(scales.shape)}, {tuple(mins.shape)}")
        if n_out % 16:  # the kernel packs 16 output rows together
            raise ValueError(f"int4 weight needs a multiple of 16 output rows, got {n_out}; use int8 for it")
        self.group = n_in // scales.shape[1]
        if self.group not in INT4_GROUPS:
            raise ValueError(f"int4 group size {self.group} is not one the CPU kernel supports {INT4_GROUPS}")
        self.register_buffer("qweight", torch._convert_weight_to_int4pack_for_cpu(unpack_int4(codes), 1))
        s, m = scales.float(), mins.float()
        self.register_buffer("scale_zero", torch.stack([s.t(), (m + 8 * s).t()], -1).to(ACT_DTYPE).contiguous())
        self.shape = (n_out, n_in)

    @classmethod
    def from_dense(cls, w: torch.Tensor, group: int = 32, importance: torch.Tensor | None = None) -> "CpuInt4Weight":
        return cls(*quantize_int4(w, group, importance))

    def dequantize(self) -> torch.Tensor:
        """[out, in] fp32 values the kernel multiplies by (through an identity matmul)."""
        eye = torch.eye(self.shape[1], dtype=ACT_DTYPE)
        return torch._weight_int4pack_mm_for_cpu(eye, self.qweight, self.group, self.scale_zero).float().t()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scale_zero))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return self.forward(x.reshape(-1, self.shape[1])).view(*x.shape[:-1], self.shape[0])
        return torch._weight_int4pack_mm_for_cpu(x.to(ACT_DTYPE), self.qweight, self.group, self.scale_zero).to(x.dtype)

    def extra_repr(self) -> str:
        return f"out={self.shape[0]}, in={self.shape[1]}, group={self.group}"
