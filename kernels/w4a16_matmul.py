"""W4A16: group-wise asymmetric int4 weights x fp16/bf16 activations.

Quantisation (per output row, per group of `group` = 128 input columns):
  scale = (max - min) / 15, zero = round(-min / scale) in [0, 15],
  q = clamp(round(w / scale) + zero, 0, 15),   w ~ (q - zero) * scale.

Layout (W4Packed), chosen for the kernel's [BLOCK_K, BLOCK_N] weight tile:
  qweight [in // 8, out] int32: nibble i (bits 4i..4i+3) of qweight[r, n] is q[n, 8r + i].
          Packing along K keeps each row of the tile contiguous along N (coalesced
          16-byte loads, and scales/zeros share that N order), and unpacking 8 nibbles
          along K yields the [K, N] operand that tl.dot wants with no transpose.
  scales  [in // group, out] fp16/bf16 (the weight's dtype; fp32 weights keep fp32)
  zeros   [in // group, out] uint8, integer zero points 0..15
Bytes per weight: 0.5 + 2/128 + 1/128 = 0.52, i.e. 3.8x less than bf16.

Kernels (`w4a16_matmul`, x [M, in] -> [M, out]); BLOCK_K = group, so every K step
reads one row of scales/zeros. Dequant avoids the int->float convert: (q | 0x4B000000)
reinterpreted as fp32 is exactly 2^23 + q, so (that - (2^23 + zero)) * scale is exact in
fp32 and rounds once to the activation dtype, bit-identical to dequantize_w4_ref.
  M == 1   `_w4_gemv_kernel`: CUDA-core FMAs, no padding of M to tl.dot's 16 rows and no
           dot-operand shuffle. 46 us on 5120 -> 27648 (H100; cuBLAS bf16: 104 us).
  M >= 2   `_w4a16_kernel`: tl.dot with BLOCK_M = 16 up to M = 16, one M tile up to
           M = 64, so the weight is streamed once whatever M is: 72 us at M = 4 and 74 us
           at M = 16 (flat), 102 us at M = 64.
Both split K when out/BLOCK_N tiles cannot fill the SMs (out = 5120 gives 40 tiles for
132 SMs); partial sums go to an fp32 [split, M, out] buffer that a second kernel adds in
a fixed order (deterministic, unlike atomics).
Known gap: ~1.5 TB/s at M = 1 and ~1 TB/s at M = 4..16 vs 3 TB/s of HBM: dequant costs
~5 ALU ops per weight, so these kernels are issue-bound, not memory-bound (see README).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .utils import cdiv, check_last_dim_contiguous, device_sms, dot, require_triton, tl, triton


@dataclass
class W4Packed:
    qweight: torch.Tensor  # [in // 8, out] int32, 8 nibbles along in
    scales: torch.Tensor   # [in // group, out] fp16/bf16/fp32
    zeros: torch.Tensor    # [in // group, out] uint8, 0..15
    shape: tuple[int, int]  # (out, in) of the original weight
    group: int = 128

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    def to(self, device) -> "W4Packed":
        return W4Packed(self.qweight.to(device), self.scales.to(device), self.zeros.to(device),
                        self.shape, self.group)


def quantize_w4(w: torch.Tensor, group: int = 128) -> W4Packed:
    """w [out, in] -> W4Packed. in must be a multiple of group (and group of 8)."""
    if w.dim() != 2:
        raise ValueError(f"weight must be [out, in], got {tuple(w.shape)}")
    n_out, n_in = w.shape
    if group % 8 or group <= 0:
        raise ValueError(f"group size {group} must be a positive multiple of 8")
    if n_in % group:
        raise ValueError(f"in_features {n_in} is not a multiple of the group size {group}; "
                         f"pad the weight to {cdiv(n_in, group) * group} columns")
    wg = w.float().reshape(n_out, n_in // group, group)
    lo = wg.amin(-1).clamp(max=0.0)  # keep 0 representable
    hi = wg.amax(-1).clamp(min=0.0)
    scale = ((hi - lo) / 15.0).clamp(min=1e-8).to(w.dtype if w.dtype in (torch.float16, torch.bfloat16) else torch.float32)
    s = scale.float()
    zero = (-lo / s).round().clamp(0, 15)
    q = ((wg / s[..., None]).round() + zero[..., None]).clamp(0, 15).to(torch.int64)  # [out, in/g, g]
    q = q.reshape(n_out, n_in).t().reshape(n_in // 8, 8, n_out)  # [in/8, 8, out]
    shifts = (torch.arange(8, device=w.device, dtype=torch.int64) * 4)[None, :, None]
    packed = (q << shifts).sum(1)  # < 2^32
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return W4Packed(packed.contiguous(), scale.t().contiguous(), zero.to(torch.uint8).t().contiguous(),
                    (n_out, n_in), group)


def unpack_w4_ref(p: W4Packed) -> torch.Tensor:
    """qweight -> integer codes q [out, in] (int64, 0..15)."""
    qw = p.qweight.to(torch.int64) & 0xFFFFFFFF
    shifts = (torch.arange(8, device=qw.device, dtype=torch.int64) * 4)[None, :, None]
    q = (qw[:, None, :] >> shifts) & 0xF  # [in/8, 8, out]
    return q.reshape(p.in_features, p.out_features).t()


def dequantize_w4_ref(p: W4Packed, dtype: torch.dtype | None = None) -> torch.Tensor:
    """W4Packed -> dense [out, in] in `dtype` (default: the scales' dtype)."""
    q = unpack_w4_ref(p).float()
    z = p.zeros.t().float().repeat_interleave(p.group, dim=1)
    s = p.scales.t().float().repeat_interleave(p.group, dim=1)
    return ((q - z) * s).to(dtype or p.scales.dtype)


def w4a16_matmul_ref(x: torch.Tensor, p: W4Packed) -> torch.Tensor:
    """x [M, in] @ dequant(W).T -> [M, out] (dequant rounded to x.dtype, fp32 accumulate)."""
    w = dequantize_w4_ref(p, x.dtype)
    return (x.float() @ w.float().t()).to(x.dtype)


@triton.jit
def _w4a16_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr,
    M, N, stride_xm, stride_qk, stride_sk, stride_zk, stride_os, stride_om,
    k_steps_per_split, k_steps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grid (cdiv(N, BLOCK_N), split_k, cdiv(M, BLOCK_M)); BLOCK_K == group size.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = rm < M, rn < N
    rkp = tl.arange(0, BLOCK_K // 8)
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + tl.arange(0, BLOCK_K)[None, :]
    q_ptrs = qw_ptr + rkp[:, None] * stride_qk + rn[None, :]
    shifts = tl.arange(0, 8) * 4
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    kb0 = pid_k * k_steps_per_split
    kb1 = tl.minimum(kb0 + k_steps_per_split, k_steps)
    for kb in range(kb0, kb1):
        # [K/8, N] int32, each row contiguous along N; one row of scales/zeros per step
        packed = tl.load(q_ptrs + kb * (BLOCK_K // 8) * stride_qk, mask=n_mask[None, :], other=0)
        x = tl.load(x_ptrs + kb * BLOCK_K, mask=m_mask[:, None], other=0.0)
        s = tl.load(s_ptr + kb * stride_sk + rn, mask=n_mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + kb * stride_zk + rn, mask=n_mask, other=0).to(tl.float32) + 8388608.0
        # [K/8, 8, N] -> [K, N]: row 8 kp + i is nibble i of int32 row kp (= k, in order).
        # On H100 this reshape beat re-loading each int32 row 8 times (72 vs 118 us at M=16).
        q = (packed[:, None, :] >> shifts[None, :, None]) & 0xF
        q = tl.reshape(q | 0x4B000000, (BLOCK_K, BLOCK_N))  # bits of 2^23 + q as fp32
        w = (q.to(tl.float32, bitcast=True) - z[None, :]) * s[None, :]  # (q - zero) * scale, exact
        acc += dot(x, w.to(x.dtype))
    o_ptrs = out_ptr + pid_k * stride_os + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _w4_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr,
    N, stride_qk, stride_sk, stride_zk, stride_os,
    k_steps_per_split, k_steps,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # M == 1 on CUDA cores: no [16, K] padding for tl.dot and no dot-operand layout
    # shuffle. acc2 [K/8, N] collects FMAs; one cross-thread reduction at the very end.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    rkp = tl.arange(0, BLOCK_K // 8)
    q_ptrs = qw_ptr + rkp[:, None] * stride_qk + rn[None, :]
    acc2 = tl.zeros([BLOCK_K // 8, BLOCK_N], dtype=tl.float32)
    kb0 = pid_k * k_steps_per_split
    kb1 = tl.minimum(kb0 + k_steps_per_split, k_steps)
    for kb in range(kb0, kb1):
        packed = tl.load(q_ptrs + kb * (BLOCK_K // 8) * stride_qk, mask=n_mask[None, :], other=0)
        s = tl.load(s_ptr + kb * stride_sk + rn, mask=n_mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + kb * stride_zk + rn, mask=n_mask, other=0).to(tl.float32) + 8388608.0
        part = tl.zeros([BLOCK_K // 8, BLOCK_N], dtype=tl.float32)
        for i in tl.static_range(8):
            # nibble i of row kp is k = 8 kp + i: gather x in that order instead of reshaping
            xi = tl.load(x_ptr + kb * BLOCK_K + rkp * 8 + i).to(tl.float32)
            q = ((packed >> (4 * i)) & 0xF) | 0x4B000000
            part += xi[:, None] * (q.to(tl.float32, bitcast=True) - z[None, :])
        acc2 += part * s[None, :]
    acc = tl.sum(acc2, axis=0)
    tl.store(out_ptr + pid_k * stride_os + rn, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _splitk_reduce_kernel(part_ptr, out_ptr, numel, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    # part [SPLIT_K, numel] fp32 -> out [numel] (fixed summation order: deterministic).
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(SPLIT_K):
        acc += tl.load(part_ptr + i * numel + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# Tuned on H100 at Qwen2.5-32B shapes (bench/bench_kernels.py): BLOCK_N 128, 4 warps, 3 stages
# and ~4 programs per SM (waves) beat 64/256-wide tiles, 8 warps and 2 waves by 10-30%.
# gemv: M == 1 takes the CUDA-core kernel (47 vs 71 us on 5120 -> 27648).
DEFAULT_CONFIG = dict(block_n=128, num_warps=4, num_stages=3, waves=4, gemv=True)


def _plan(M: int, N: int, k_steps: int, sms: int, cfg: dict) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, split_k) for x [M, K] @ W[N, K].T."""
    block_m = 16 if M <= 16 else (32 if M <= 32 else 64)
    block_n = cfg["block_n"]
    tiles = cdiv(N, block_n) * cdiv(M, block_m)
    split_k = max(1, min(k_steps, cdiv(cfg["waves"] * sms, tiles)))
    return block_m, block_n, split_k


def w4a16_matmul(x: torch.Tensor, p: W4Packed, split_k: int | None = None, config: dict | None = None) -> torch.Tensor:
    """x [M, in] (fp16/bf16/fp32) @ W4 weight -> [M, out] in x.dtype."""
    if x.dim() != 2 or x.shape[1] != p.in_features:
        raise ValueError(f"x {tuple(x.shape)} must be [M, {p.in_features}]")
    require_triton(x, p.qweight)
    check_last_dim_contiguous(x, "x")
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    M, N = x.shape[0], p.out_features
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    k_steps = p.in_features // p.group
    block_m, block_n, plan_split = _plan(M, N, k_steps, device_sms(x), cfg)
    split_k = max(1, min(k_steps, split_k or plan_split))
    per_split = cdiv(k_steps, split_k)
    split_k = cdiv(k_steps, per_split)
    dst = out if split_k == 1 else torch.empty((split_k, M, N), dtype=torch.float32, device=x.device)
    grid = (cdiv(N, block_n), split_k, cdiv(M, block_m))
    if cfg["gemv"] and M == 1:
        _w4_gemv_kernel[grid[:2]](
            x, p.qweight, p.scales, p.zeros, dst,
            N, p.qweight.stride(0), p.scales.stride(0), p.zeros.stride(0),
            dst.stride(0) if split_k > 1 else 0, per_split, k_steps,
            BLOCK_N=block_n, BLOCK_K=p.group, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    else:
        _w4a16_kernel[grid](
            x, p.qweight, p.scales, p.zeros, dst,
            M, N, x.stride(0), p.qweight.stride(0), p.scales.stride(0), p.zeros.stride(0),
            dst.stride(0) if split_k > 1 else 0, dst.stride(-2),
            per_split, k_steps,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=p.group, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    if split_k > 1:
        block = 1024
        _splitk_reduce_kernel[(cdiv(M * N, block),)](dst, out, M * N, SPLIT_K=split_k, BLOCK=block, num_warps=4)
    return out
