"""W4A16: group-wise asymmetric int4 weights x fp16/bf16 (or fp32) activations.

Quantisation (per output row, per group of `group` = 128 input columns):
  scale = (max - min) / 15, zero = round(-min / scale) in [0, 15],
  q = clamp(round(w / scale) + zero, 0, 15),   w ~ (q - zero) * scale.

Layout (W4Packed), chosen for the kernels' [group / 8, BLOCK_N] weight tile:
  qweight [in // 8, out] int32. Group g of a column spans int32 rows g*G8 .. g*G8 + G8 - 1
          (G8 = group / 8); nibble i (bits 4i..4i+3) of row g*G8 + r holds q[n, g*group +
          i*G8 + r]. So the 8 nibbles of one word are 8 k's G8 apart, and "nibble i of every
          row of the tile" is the contiguous slice k = g*group + i*G8 + [0, G8): the kernels
          read x in contiguous pieces and never reshape the weight tile. Each row of the tile is
          contiguous along N (coalesced 16-byte loads; scales/zeros share that N order).
  scales  [in // group, out] fp16/bf16 (the weight's dtype; fp32 weights keep fp32)
  zeros   [in // group, out] uint8, integer zero points 0..15
  locks   optional int32 counters, one per output tile (see split-K below)
Bytes per weight: 0.5 + 2/128 + 1/128 = 0.52, i.e. 3.8x less than bf16.

Dequantisation is moved out of the inner loop: per group and column
  sum_k x_k (q_k - z) s = s * (sum_k x_k (128 + q_k) - (128 + z) * sum_k x_k),
and 128 + q costs one shift and one lop3 per weight: the nibble ORed into the mantissa of
128.0 (fp32 bits 0x43000000, nibble at bits 16..19; bf16 0x4300 at bits 0..3, fp16 1024.0
0x6400) is exactly 128 + q (1024 + q). No int->float convert, no per-weight subtract or
scale; the cancellation against 128 * sum x costs ~4 of fp32's 24 bits. Results are not
bit-identical to w4a16_matmul_ref (which rounds each weight to the activation dtype first):
they are closer to the exact product.

Kernels (`w4a16_matmul`, x [M, in] -> [M, out]):
  M == 1   `_w4_gemv_kernel`: CUDA cores, fp32 FMAs on 128 + q, one cross-thread reduction at
           the end. ~4.6 instructions a weight (was ~5.5 with a per-weight subtract and an
           arithmetic shift + sign extend). Tried and dropped: reading each nibble where a
           shift of the word puts it (fp32 2^(23-p) + q at bit p, 2 or 4 shifts a word
           instead of 7, the magics cancelled per group): H200 5120->55296 75-81 us against
           73.8, the head 183-194 against 183; the shifts are not what bounds it.
           Groups below 128 (tiny test models: tl.dot needs K = group / 8 >= 16) run every
           row through this kernel too, one grid row per x row.
           H2 (config h2="auto": bf16 x; True: fp16 x too; off by default): fp16x2 FMAs on
           nibbles masked in place as fp16 subnormals, x scaled by a power of two per program;
           sm_90 SASS 3.72 instructions a weight against 5.33, but on an H100 slower on the big
           shapes (gate_up 78.5 vs 73.3 us, down 52.2 vs 41.1; qkv/o faster): the x prepass
           and conversion cost more than the FMAs saved (see kernels/README.md).
  M >= 2   `_w4a16_kernel`: tensor cores. On CUDA with bf16/fp16 x, inline PTX turns one int32
           into four bf16x2/f16x2 registers of 128 + q (3 shifts + 4 lop3 for 8 weights),
           and the tile is 8 dots of K = G8 (nibble i with x's slice i): no [K/8, 8, N] ->
           [K, N] reshape, no fp32 round trip. Elsewhere (fp32 x, TRITON_INTERPRET) the same
           kernel builds 128 + q with plain shifts.
Both split K when out/BLOCK_N tiles cannot fill the SMs (out = 5120: 40-80 tiles for 132
SMs). Partial sums go to an fp32 [split, M, out] buffer; for the GEMV (with `locks`) the last
program of a tile to finish (atomic counter, acq_rel) adds the partials in split order and
resets its counter: deterministic, and no second launch (~2.5 us saved per matmul). Otherwise
a second kernel does the same sum: for 2+ rows that is faster than the last program summing
a [BLOCK_M, BLOCK_N] tile per split alone (16 rows, H200: -4% on a whole verify pass).
H200, Qwen2.5-32B shapes (bench/w4_explore.py; the H100 figures are in the README):
M = 1: 5120->55296 73 us (was 88), 27648->5120 42 us (was 49); M = 16: 99 us (was 148) and
56 us (was 80). Load-only ceiling of the same tiles: ~45 and ~21 us.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .utils import (
    _INTERPRET_UPCAST, HAS_TRITON, cdiv, check_last_dim_contiguous, device_sms, interpret_mode, require_triton, tl,
    triton,
)


@dataclass
class W4Packed:
    qweight: torch.Tensor  # [in // 8, out] int32, 8 nibbles along in
    scales: torch.Tensor   # [in // group, out] fp16/bf16/fp32
    zeros: torch.Tensor    # [in // group, out] uint8, 0..15
    shape: tuple[int, int]  # (out, in) of the original weight
    group: int = 128
    locks: torch.Tensor | None = None  # [>= tiles] int32 zeros: split-K done-counters (new_locks)

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    def to(self, device) -> "W4Packed":
        return W4Packed(self.qweight.to(device), self.scales.to(device), self.zeros.to(device),
                        self.shape, self.group, new_locks(self.shape[0], device))


def new_locks(n_out: int, device) -> torch.Tensor:
    """Zeroed split-K counters for a weight with n_out columns: one per (M tile, N tile) up
    to 4 M tiles of the narrowest N tile (larger launches never split K). Each program that
    finishes a tile's last split resets its counter, so they stay zero between calls and
    across CUDA-graph replays. One weight's matmuls must not run concurrently on two streams."""
    return torch.zeros(4 * cdiv(n_out, 32), dtype=torch.int32, device=device)


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
    # k = g*group + i*G8 + r  ->  word row g*G8 + r, nibble i
    q = q.reshape(n_out, n_in // group, 8, group // 8).permute(1, 3, 2, 0)  # [in/g, G8, 8, out]
    shifts = (torch.arange(8, device=w.device, dtype=torch.int64) * 4)[None, None, :, None]
    packed = (q << shifts).sum(2).reshape(n_in // 8, n_out)  # < 2^32
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return W4Packed(packed.contiguous(), scale.t().contiguous(), zero.to(torch.uint8).t().contiguous(),
                    (n_out, n_in), group, new_locks(n_out, w.device))


def unpack_w4_ref(p: W4Packed) -> torch.Tensor:
    """qweight -> integer codes q [out, in] (int64, 0..15)."""
    g8 = p.group // 8
    qw = (p.qweight.to(torch.int64) & 0xFFFFFFFF).reshape(p.in_features // p.group, g8, 1, p.out_features)
    shifts = (torch.arange(8, device=qw.device, dtype=torch.int64) * 4)[None, None, :, None]
    q = (qw >> shifts) & 0xF  # [in/g, G8 (r), 8 (i), out]
    return q.permute(0, 2, 1, 3).reshape(p.in_features, p.out_features).t()


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


# One int32 -> 8 half-precision values 128 + q (bf16) / 1024 + q (fp16), in nibble order
# [0, 4, 1, 5, 2, 6, 3, 7]: lop3 (a & b) | c (LUT 0xEA) drops nibbles j and j + 4 into the low
# mantissa bits of both halves of a x2 register. The mov splits are register renames.
_DQ_ASM = """
{
.reg .b32 t0, t1, t2, t3;
lop3.b32 t0, $8, 0x000F000F, MAGIC, 0xEA;
shr.u32 t1, $8, 4;
lop3.b32 t1, t1, 0x000F000F, MAGIC, 0xEA;
shr.u32 t2, $8, 8;
lop3.b32 t2, t2, 0x000F000F, MAGIC, 0xEA;
shr.u32 t3, $8, 12;
lop3.b32 t3, t3, 0x000F000F, MAGIC, 0xEA;
mov.b32 {$0, $1}, t0;
mov.b32 {$2, $3}, t1;
mov.b32 {$4, $5}, t2;
mov.b32 {$6, $7}, t3;
}
"""
if HAS_TRITON:
    _DQ_BF16 = tl.constexpr(_DQ_ASM.replace("MAGIC", "0x43004300"))  # bf16 128.0
    _DQ_FP16 = tl.constexpr(_DQ_ASM.replace("MAGIC", "0x64006400"))  # fp16 1024.0

# DQ modes of _w4a16_kernel
DQ_PLAIN, DQ_BF16, DQ_FP16 = 0, 1, 2


@triton.jit
def _dq8_asm(packed, DQ: tl.constexpr):
    if DQ == 1:
        return tl.inline_asm_elementwise(_DQ_BF16, "=h,=h,=h,=h,=h,=h,=h,=h,r", [packed],
                                         dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise(_DQ_FP16, "=h,=h,=h,=h,=h,=h,=h,=h,r", [packed],
                                         dtype=(tl.float16,) * 8, is_pure=True, pack=1)


@triton.jit
def _nibble_plus(packed, i: tl.constexpr, dtype: tl.constexpr):
    """128 + nibble i of each int32 as `dtype` (exact in fp16/bf16/fp32), plain Triton."""
    return (((packed >> (4 * i)) & 0xF).to(tl.float32) + 128.0).to(dtype)


@triton.jit
def _nibble_minus(packed, i: tl.constexpr, z_off):
    """q - z in fp32 (z_off = 128 + z per column): exact."""
    return ((packed >> (4 * i)) & 0xF).to(tl.float32) + 128.0 - z_off[None, :]


@triton.jit
def _splitk_finish(acc, part_ptr, out_ptr, lock_ptr, offs, mask, pid_k, stride_ps, tile,
                   SPLIT_K: tl.constexpr, USE_LOCKS: tl.constexpr):
    """Store one program's fp32 partial tile; with SPLIT_K == 1 straight to out. With locks,
    the last of a tile's SPLIT_K programs sums the partials in split order (deterministic)."""
    if SPLIT_K == 1:
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(part_ptr + pid_k * stride_ps + offs, acc, mask=mask)
        if USE_LOCKS:
            # acq_rel: our partial is visible before the count, and the last program sees all
            done = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel")
            if done == SPLIT_K - 1:
                tot = tl.load(part_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
                for i in range(1, SPLIT_K):
                    tot += tl.load(part_ptr + i * stride_ps + offs, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(out_ptr + offs, tot.to(out_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(lock_ptr + tile, 0)


@triton.jit
def _w4a16_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, part_ptr, out_ptr, lock_ptr,
    M, N, stride_xm, stride_qk, stride_sk, stride_zk, stride_ps, stride_om,
    k_steps_per_split, k_steps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, USE_LOCKS: tl.constexpr, DQ: tl.constexpr, EXACT: tl.constexpr,
):
    # grid (cdiv(N, BLOCK_N), split_k, cdiv(M, BLOCK_M)); BLOCK_K == group size.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    G8: tl.constexpr = BLOCK_K // 8
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = rm < M, rn < N
    rkp = tl.arange(0, G8)
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + rkp[None, :]
    q_ptrs = qw_ptr + rkp[:, None] * stride_qk + rn[None, :]
    xdt = x_ptr.dtype.element_ty
    wdt = tl.float32 if _INTERPRET_UPCAST else xdt  # the interpreter's bf16 dot is broken
    off = 1024.0 if DQ == 2 else 128.0  # the fp16 asm's magic is 1024.0; plain Triton adds 128
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    kb0 = pid_k * k_steps_per_split
    kb1 = tl.minimum(kb0 + k_steps_per_split, k_steps)
    for kb in range(kb0, kb1):
        packed = tl.load(q_ptrs + kb * G8 * stride_qk, mask=n_mask[None, :], other=0)
        s = tl.load(s_ptr + kb * stride_sk + rn, mask=n_mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + kb * stride_zk + rn, mask=n_mask, other=0).to(tl.float32) + off
        if EXACT:  # fp32 x: exact q - z weights (see the gemv)
            w0 = _nibble_minus(packed, 0, z)
            w1 = _nibble_minus(packed, 1, z)
            w2 = _nibble_minus(packed, 2, z)
            w3 = _nibble_minus(packed, 3, z)
            w4 = _nibble_minus(packed, 4, z)
            w5 = _nibble_minus(packed, 5, z)
            w6 = _nibble_minus(packed, 6, z)
            w7 = _nibble_minus(packed, 7, z)
        elif DQ == 0:
            w0 = _nibble_plus(packed, 0, wdt)
            w1 = _nibble_plus(packed, 1, wdt)
            w2 = _nibble_plus(packed, 2, wdt)
            w3 = _nibble_plus(packed, 3, wdt)
            w4 = _nibble_plus(packed, 4, wdt)
            w5 = _nibble_plus(packed, 5, wdt)
            w6 = _nibble_plus(packed, 6, wdt)
            w7 = _nibble_plus(packed, 7, wdt)
        else:
            w0, w4, w1, w5, w2, w6, w3, w7 = _dq8_asm(packed, DQ)
        # x slice i (contiguous G8 columns) pairs with nibble i of every word row
        xb = x_ptrs + kb * BLOCK_K
        x0 = tl.load(xb + 0 * G8, mask=m_mask[:, None], other=0.0).to(wdt)
        x1 = tl.load(xb + 1 * G8, mask=m_mask[:, None], other=0.0).to(wdt)
        x2 = tl.load(xb + 2 * G8, mask=m_mask[:, None], other=0.0).to(wdt)
        x3 = tl.load(xb + 3 * G8, mask=m_mask[:, None], other=0.0).to(wdt)
        x4 = tl.load(xb + 4 * G8, mask=m_mask[:, None], other=0.0).to(wdt)
        x5 = tl.load(xb + 5 * G8, mask=m_mask[:, None], other=0.0).to(wdt)
        x6 = tl.load(xb + 6 * G8, mask=m_mask[:, None], other=0.0).to(wdt)
        x7 = tl.load(xb + 7 * G8, mask=m_mask[:, None], other=0.0).to(wdt)
        g = tl.dot(x0, w0, input_precision="ieee")
        g = tl.dot(x1, w1, g, input_precision="ieee")
        g = tl.dot(x2, w2, g, input_precision="ieee")
        g = tl.dot(x3, w3, g, input_precision="ieee")
        g = tl.dot(x4, w4, g, input_precision="ieee")
        g = tl.dot(x5, w5, g, input_precision="ieee")
        g = tl.dot(x6, w6, g, input_precision="ieee")
        g = tl.dot(x7, w7, g, input_precision="ieee")
        if EXACT:
            acc += g * s[None, :]
        else:
            xs = (x0.to(tl.float32) + x1.to(tl.float32) + x2.to(tl.float32) + x3.to(tl.float32)
                  + x4.to(tl.float32) + x5.to(tl.float32) + x6.to(tl.float32) + x7.to(tl.float32))
            acc += (g - tl.sum(xs, axis=1)[:, None] * z[None, :]) * s[None, :]
    offs = rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    tile = pid_m * tl.num_programs(0) + pid_n
    _splitk_finish(acc, part_ptr, out_ptr, lock_ptr, offs, m_mask[:, None] & n_mask[None, :], pid_k, stride_ps,
                   tile, SPLIT_K, USE_LOCKS)


@triton.jit
def _gemv_group(packed, xg_ptr, rkp, z, G8: tl.constexpr, EXACT: tl.constexpr):
    """One group of the GEMV. packed [G8, N] uint32 words, xg_ptr -> the group's x, z = 128 +
    zero point per column -> (part [G8, N] = sum_i x_i * (128 + q_i), or x_i * (q_i - z) when
    EXACT; xs [G8] = sum_i x_i), with x_i the contiguous slice i * G8 + rkp."""
    part = tl.zeros(packed.shape, dtype=tl.float32)
    xs = tl.zeros([G8], dtype=tl.float32)
    for i in tl.static_range(8):
        xi = tl.load(xg_ptr + i * G8 + rkp).to(tl.float32)
        xs += xi
        # nibble i -> bits 16..19, the low mantissa bits of 128.0f: exactly 128 + q
        if i < 4:
            t = packed << (16 - 4 * i)
        elif i == 4:
            t = packed
        else:
            t = packed >> (4 * i - 16)
        w = ((t & 0x000F0000) | 0x43000000).to(tl.float32, bitcast=True)
        if EXACT:  # fp32 x: q - z per weight (exact), no cancellation against 128 * sum x
            w = w - z[None, :]
        part += xi[:, None] * w
    return part, xs


# The packed fp16x2 GEMV group step (H2). A nibble masked in place is an fp16 subnormal, exact:
# n * 2^-24 at bits 0..3 of a half, n * 2^-20 at bits 4..7. So one word is 1 shr + 4 and (two
# nibbles a half-pair each) + 4 fma.rn.f16x2 against pairs of x values scaled by a power of two
# X (max |x| X in [2^14, 2^15) over the program's K range, so nothing overflows and only terms
# below ~2^-8 of the largest go subnormal), then lo + hi and one convert: 8 products summed in
# fp16, then fp32 from there on. Operands: $1 the word, $2..$5 the x pairs (x_j, x_j+4) * X for
# j = 0, 2 and * X / 16 for j = 1, 3 (the nibbles at bits 4..7 are 16x larger).
_H2_ASM = """
{
.reg .b32 t0, t1, t2, t3, p8, a;
.reg .b16 lo, hi;
and.b32 t0, $1, 0x000F000F;
and.b32 t1, $1, 0x00F000F0;
shr.u32 p8, $1, 8;
and.b32 t2, p8, 0x000F000F;
and.b32 t3, p8, 0x00F000F0;
mul.rn.f16x2 a, t0, $2;
fma.rn.f16x2 a, t1, $3, a;
fma.rn.f16x2 a, t2, $4, a;
fma.rn.f16x2 a, t3, $5, a;
mov.b32 {lo, hi}, a;
add.rn.f16 lo, lo, hi;
cvt.f32.f16 $0, lo;
}
"""
if HAS_TRITON:
    _H2 = tl.constexpr(_H2_ASM)

# H2 modes of _w4_gemv_kernel
H2_OFF, H2_ASM, H2_PLAIN = 0, 1, 2


@triton.jit
def _h2_pair(lo, hi):
    """Two fp32 tensors -> int32 holding (fp16(lo), fp16(hi)) as one f16x2 register."""
    lb = lo.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hb = hi.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
    return (hb << 16) | lb


@triton.jit
def _h2_nib(packed, i: tl.constexpr):
    """Nibble i as the fp16 the asm's mask makes of it: n * 2^-24, or n * 2^-20 for odd i."""
    scale: tl.constexpr = 9.5367431640625e-07 if i % 2 == 1 else 5.9604644775390625e-08
    return (((packed >> (4 * i)) & 0xF).to(tl.float32) * scale).to(tl.float16)


@triton.jit
def _h2_group(packed, x0, x1, x2, x3, x4, x5, x6, x7, H2: tl.constexpr):
    """sum_i n_i x_i 2^-24 over one word's 8 nibbles, fp16 arithmetic -> fp32 [G8, N]. x_i [G8]
    fp32, already scaled by X, and the odd ones by X / 16. H2_PLAIN is the same sum in plain
    Triton (the interpreter runs no PTX): the same roundings but for the FMAs' (unfused there)."""
    if H2 == 1:
        xp0, _ = tl.broadcast(_h2_pair(x0, x4)[:, None], packed)
        xp1, _ = tl.broadcast(_h2_pair(x1, x5)[:, None], packed)
        xp2, _ = tl.broadcast(_h2_pair(x2, x6)[:, None], packed)
        xp3, _ = tl.broadcast(_h2_pair(x3, x7)[:, None], packed)
        return tl.inline_asm_elementwise(_H2, "=r,r,r,r,r,r", [packed, xp0, xp1, xp2, xp3],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        lo = _h2_nib(packed, 0) * x0.to(tl.float16)[:, None]
        lo = lo + _h2_nib(packed, 1) * x1.to(tl.float16)[:, None]
        lo = lo + _h2_nib(packed, 2) * x2.to(tl.float16)[:, None]
        lo = lo + _h2_nib(packed, 3) * x3.to(tl.float16)[:, None]
        hi = _h2_nib(packed, 4) * x4.to(tl.float16)[:, None]
        hi = hi + _h2_nib(packed, 5) * x5.to(tl.float16)[:, None]
        hi = hi + _h2_nib(packed, 6) * x6.to(tl.float16)[:, None]
        hi = hi + _h2_nib(packed, 7) * x7.to(tl.float16)[:, None]
        return (lo + hi).to(tl.float32)


@triton.jit
def _w4_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, part_ptr, out_ptr, lock_ptr,
    N, stride_xm, stride_qk, stride_sk, stride_zk, stride_ps, stride_om,
    k_steps_per_split, k_steps,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, USE_LOCKS: tl.constexpr,
    EXACT: tl.constexpr, H2: tl.constexpr,
):
    # One row of x on CUDA cores (grid axis 2 = row): no [16, K] padding for tl.dot and no
    # dot-operand layout shuffle. acc2 [G8, N] collects FMAs; one cross-thread reduction at the end.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    x_ptr += pid_m.to(tl.int64) * stride_xm
    G8: tl.constexpr = BLOCK_K // 8
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    rkp = tl.arange(0, G8)
    q_ptrs = qw_ptr + rkp[:, None] * stride_qk + rn[None, :]
    acc2 = tl.zeros([G8, BLOCK_N], dtype=tl.float32)
    kb0 = pid_k * k_steps_per_split
    kb1 = tl.minimum(kb0 + k_steps_per_split, k_steps)
    if H2 != 0:
        # X = 2^(14 - floor(log2 max|x|)) over this program's K range, exact from the exponent bits
        rk = tl.arange(0, BLOCK_K)
        mx = tl.zeros([BLOCK_K], dtype=tl.float32)
        for kb in range(kb0, kb1):
            mx = tl.maximum(mx, tl.abs(tl.load(x_ptr + kb * BLOCK_K + rk).to(tl.float32)))
        e_m = (tl.maximum(tl.max(mx, axis=0), 1e-30).to(tl.int32, bitcast=True) >> 23) & 0xFF
        X = ((268 - e_m) << 23).to(tl.float32, bitcast=True)
        Xo = X * 0.0625  # odd nibbles sit 4 bits up
        for kb in range(kb0, kb1):
            packed = tl.load(q_ptrs + kb * G8 * stride_qk, mask=n_mask[None, :], other=0)
            s = tl.load(s_ptr + kb * stride_sk + rn, mask=n_mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + kb * stride_zk + rn, mask=n_mask, other=0).to(tl.float32)
            xb = x_ptr + kb * BLOCK_K + rkp
            x0 = tl.load(xb + 0 * G8).to(tl.float32) * X
            x1 = tl.load(xb + 1 * G8).to(tl.float32) * Xo
            x2 = tl.load(xb + 2 * G8).to(tl.float32) * X
            x3 = tl.load(xb + 3 * G8).to(tl.float32) * Xo
            x4 = tl.load(xb + 4 * G8).to(tl.float32) * X
            x5 = tl.load(xb + 5 * G8).to(tl.float32) * Xo
            x6 = tl.load(xb + 6 * G8).to(tl.float32) * X
            x7 = tl.load(xb + 7 * G8).to(tl.float32) * Xo
            part = _h2_group(packed, x0, x1, x2, x3, x4, x5, x6, x7, H2)
            # zero point: sum_i x_i (n_i - z) = part - z * sum_i x_i, all in units of X / 2^24
            xs = ((x0 + x2 + x4 + x6) + (x1 + x3 + x5 + x7) * 16.0) * 5.9604644775390625e-08
            acc2 += (part - xs[:, None] * z[None, :]) * s[None, :]
        acc = tl.sum(acc2, axis=0) * ((e_m + 10) << 23).to(tl.float32, bitcast=True)  # * 2^24 / X
    else:
        for kb in range(kb0, kb1):
            # uint32: logical shifts (an int32 >> compiles to a shift plus a sign extend)
            packed = tl.load(q_ptrs + kb * G8 * stride_qk, mask=n_mask[None, :], other=0).to(tl.uint32, bitcast=True)
            s = tl.load(s_ptr + kb * stride_sk + rn, mask=n_mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + kb * stride_zk + rn, mask=n_mask, other=0).to(tl.float32) + 128.0
            part, xs = _gemv_group(packed, x_ptr + kb * BLOCK_K, rkp, z, G8, EXACT)
            if EXACT:
                acc2 += part * s[None, :]
            else:
                acc2 += (part - xs[:, None] * z[None, :]) * s[None, :]
        acc = tl.sum(acc2, axis=0)
    _splitk_finish(acc, part_ptr, out_ptr, lock_ptr, pid_m.to(tl.int64) * stride_om + rn, n_mask, pid_k, stride_ps,
                   pid_m * tl.num_programs(0) + pid_n, SPLIT_K, USE_LOCKS)


@triton.jit
def _splitk_reduce_kernel(part_ptr, out_ptr, numel, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    # part [SPLIT_K, numel] fp32 -> out [numel] (fixed summation order: deterministic).
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(SPLIT_K):
        acc += tl.load(part_ptr + i * numel + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# Tuned on H200 at Qwen2.5-32B shapes (bench/w4_explore.py, one knob at a time):
#   gemv, out >= 4 in (gate_up 5120->55296): 128-wide tiles, 8 warps, ~8 programs per SM
#   gemv, in >= 4 out (down 27648->5120):     128-wide tiles, 8 warps, ~4 programs per SM
#   gemv, otherwise (qkv, o):                 64-wide tiles, 4 warps, ~8 programs per SM
#   dot (M >= 2):                             128-wide tiles, 4 warps, 3 stages, ~8 per SM
# h2 (the fp16x2 GEMV) is off by default: slower than the fp32 GEMV on the big 32B shapes on an
# H100 (kernels/README.md). DLLM_W4_H2=auto (bf16 x) or 1 (fp16 x too) turns it on, for A/B runs.
DEFAULT_CONFIG = dict(num_stages=3, gemv=True, locks=True, h2=False)
DEFAULT_CONFIG["h2"] = {"auto": "auto", "1": True}.get(os.environ.get("DLLM_W4_H2", ""), False)


def _plan(M: int, N: int, K: int, k_steps: int, sms: int, cfg: dict) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, waves, split_k) for x [M, K] @ W[N, K].T."""
    if (M == 1 and cfg["gemv"]) or cfg["group"] < 128:  # tl.dot needs K = group / 8 >= 16
        block_m = 1
        block_n, warps, waves = (128, 8, 8) if N >= 4 * K else (128, 8, 4) if K >= 4 * N else (64, 4, 8)
    elif M <= 16:
        # swept on an H200 at M = 16, Qwen2.5-32B shapes (bench/w4_explore.py dot-sweep): fewer
        # split-K waves than the GEMV wants (the dot path does more work per weight), wide tiles
        # for the wide gate_up; us gate_up / down / qkv / o 99.6 / 62.9 / 22.4 / 22.7 with
        # (128, 4, 8) everywhere -> 90.3 / 57.4 / 20.7 / 16.0. Re-swept with the split-K sum in a
        # second kernel (no locks): the tall down takes wide tiles too, 56.0 -> 52.1 us.
        block_m = 16
        block_n, warps, waves = (256, 4, 2) if N >= 4 * K or K >= 4 * N else (128, 4, 2)
    else:
        block_m = 32 if M <= 32 else 64
        block_n, warps, waves = 128, 4, 8
    block_n = cfg.get("block_n", block_n)
    warps = cfg.get("num_warps", warps)
    waves = cfg.get("waves", waves)
    tiles = cdiv(N, block_n) * cdiv(M, block_m)
    split_k = max(1, min(k_steps, cdiv(waves * sms, tiles)))
    return block_m, block_n, warps, waves, split_k


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
    block_m, block_n, warps, _, plan_split = _plan(M, N, p.in_features, k_steps, device_sms(x),
                                                   {**cfg, "group": p.group})
    split_k = max(1, min(k_steps, split_k or plan_split))
    per_split = cdiv(k_steps, split_k)
    split_k = cdiv(k_steps, per_split)
    grid = (cdiv(N, block_n), split_k, cdiv(M, block_m))
    # The last-program reduction (locks) only for the GEMV: for 2+ rows it was slower than the
    # second kernel (H200, 8 layers of the 32B shape + head, 16 rows: 1712 vs 1559 + 82 us).
    use_locks = bool(cfg["locks"] and split_k > 1 and block_m == 1 and p.locks is not None
                     and p.locks.numel() >= grid[0] * grid[2])
    part = out if split_k == 1 else torch.empty((split_k, M, N), dtype=torch.float32, device=x.device)
    locks = p.locks if use_locks else part  # unused pointer when not use_locks
    stride_ps = part.stride(0) if split_k > 1 else 0
    common = dict(BLOCK_N=block_n, BLOCK_K=p.group, SPLIT_K=split_k, USE_LOCKS=use_locks,
                  EXACT=x.dtype == torch.float32,
                  num_warps=warps, num_stages=cfg["num_stages"])
    if block_m == 1:  # one program row per x row (M == 1, or groups too small for tl.dot)
        # fp16 sums cost fp16 x ~3x the error of its own output rounding (~1e-3 of max |y|),
        # below bf16's (~4e-3): "auto" takes H2 for bf16 x only, True for fp16 too
        h2 = H2_OFF
        if x.dtype == torch.bfloat16 and cfg["h2"] or x.dtype == torch.float16 and cfg["h2"] is True:
            h2 = H2_PLAIN if interpret_mode() or not x.is_cuda else H2_ASM
        _w4_gemv_kernel[grid](
            x, p.qweight, p.scales, p.zeros, part, out, locks,
            N, x.stride(0), p.qweight.stride(0), p.scales.stride(0), p.zeros.stride(0), stride_ps, out.stride(0),
            per_split, k_steps, H2=h2, **common)
    else:
        asm_ok = x.is_cuda and not interpret_mode() and x.dtype in (torch.bfloat16, torch.float16)
        dq = (DQ_BF16 if x.dtype == torch.bfloat16 else DQ_FP16) if asm_ok and cfg.get("asm", True) else DQ_PLAIN
        _w4a16_kernel[grid](
            x, p.qweight, p.scales, p.zeros, part, out, locks,
            M, N, x.stride(0), p.qweight.stride(0), p.scales.stride(0), p.zeros.stride(0), stride_ps, out.stride(0),
            per_split, k_steps, BLOCK_M=block_m, DQ=dq, **common)
    if split_k > 1 and not use_locks:
        block = 1024
        _splitk_reduce_kernel[(cdiv(M * N, block),)](part, out, M * N, SPLIT_K=split_k, BLOCK=block, num_warps=4)
    return out
