"""Exploration (device only): where does the W4A16 matmul lose bandwidth?

Times variants of the int4 kernels at Qwen2.5-32B shapes, each call on its own copy of the
weight (copies rotate so the working set is several times the L2), N calls captured in one
CUDA graph. Prints GB/s of weight bytes and writes $OUT/w4_explore.json.
"""
from __future__ import annotations

import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import importlib  # noqa: E402

W = importlib.import_module("dllm.kernels.w4a16_matmul")  # the package re-exports a function of that name
_dq8_prod = W._dq8_asm
from dllm.kernels.utils import cdiv  # noqa: E402


# ---------------------------------------------------------------- variants
@triton.jit
def _load_only(qw_ptr, s_ptr, z_ptr, out_ptr, N, stride_qk, stride_sk, stride_zk, stride_os,
               k_steps_per_split, k_steps, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    rkp = tl.arange(0, BLOCK_K // 8)
    q_ptrs = qw_ptr + rkp[:, None] * stride_qk + rn[None, :]
    acc = tl.zeros([BLOCK_K // 8, BLOCK_N], dtype=tl.int32)
    accf = tl.zeros([BLOCK_N], dtype=tl.float32)
    kb0 = pid_k * k_steps_per_split
    kb1 = tl.minimum(kb0 + k_steps_per_split, k_steps)
    for kb in range(kb0, kb1):
        packed = tl.load(q_ptrs + kb * (BLOCK_K // 8) * stride_qk, mask=n_mask[None, :], other=0)
        s = tl.load(s_ptr + kb * stride_sk + rn, mask=n_mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + kb * stride_zk + rn, mask=n_mask, other=0).to(tl.float32)
        acc ^= packed
        accf += s + z
    r = tl.sum(acc, axis=0).to(tl.float32) + accf
    tl.store(out_ptr + pid_k * stride_os + rn, r, mask=n_mask)


@triton.jit
def _gemv_fact(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, N, stride_qk, stride_sk, stride_zk, stride_os,
               k_steps_per_split, k_steps, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # nibble -> bits 19..22 of 1.0f: float = 1 + q/16 (shift + lop3), zero point factored out:
    # sum_k x (q - z) s = s * (16 * (sum_k x (1 + q/16) - sum_k x) - z * sum_k x)
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
        z = tl.load(z_ptr + kb * stride_zk + rn, mask=n_mask, other=0).to(tl.float32)
        part = tl.zeros([BLOCK_K // 8, BLOCK_N], dtype=tl.float32)
        xs = tl.zeros([BLOCK_K // 8], dtype=tl.float32)
        for i in tl.static_range(8):
            xi = tl.load(x_ptr + kb * BLOCK_K + rkp * 8 + i).to(tl.float32)
            xs += xi
            if i <= 4:
                t = packed << (19 - 4 * i)
            else:
                t = packed >> (4 * i - 19)
            w = ((t & 0x00780000) | 0x3F800000).to(tl.float32, bitcast=True)
            part += xi[:, None] * w
        acc2 += (part - xs[:, None]) * (16.0 * s)[None, :] - xs[:, None] * (s * z)[None, :]
    acc = tl.sum(acc2, axis=0)
    tl.store(out_ptr + pid_k * stride_os + rn, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


# one int32 of 8 nibbles -> 8 bf16 weights (q - z) * s, two per bf16x2 op (lop3 puts nibbles
# j and j+4 in the low bits of each half of 0x4300 = 128.0: exactly 128 + q). Outputs are
# nibbles [0, 4, 1, 5, 2, 6, 3, 7]. (w - (128+z)) via fma(w, 1, -(128+z)) is exact; * s
# via fma(d, s, -0) rounds once: bit-identical to rounding fp32 (q - z) * s to bf16.
_DQ_BF16 = tl.constexpr("""
{
.reg .b32 t0, t1, t2, t3, nz, ss, one, mz;
mov.b32 nz, {$9, $9};
mov.b32 ss, {$10, $10};
xor.b32 nz, nz, 0x80008000;
mov.b32 one, 0x3F803F80;
mov.b32 mz, 0x80008000;
lop3.b32 t0, $8, 0x000F000F, 0x43004300, 0xEA;
shr.u32 t1, $8, 4;
lop3.b32 t1, t1, 0x000F000F, 0x43004300, 0xEA;
shr.u32 t2, $8, 8;
lop3.b32 t2, t2, 0x000F000F, 0x43004300, 0xEA;
shr.u32 t3, $8, 12;
lop3.b32 t3, t3, 0x000F000F, 0x43004300, 0xEA;
fma.rn.bf16x2 t0, t0, one, nz;
fma.rn.bf16x2 t1, t1, one, nz;
fma.rn.bf16x2 t2, t2, one, nz;
fma.rn.bf16x2 t3, t3, one, nz;
fma.rn.bf16x2 t0, t0, ss, mz;
fma.rn.bf16x2 t1, t1, ss, mz;
fma.rn.bf16x2 t2, t2, ss, mz;
fma.rn.bf16x2 t3, t3, ss, mz;
mov.b32 {$0, $1}, t0;
mov.b32 {$2, $3}, t1;
mov.b32 {$4, $5}, t2;
mov.b32 {$6, $7}, t3;
}
""")


@triton.jit
def _dq8(packed, zz, s):
    return tl.inline_asm_elementwise(_DQ_BF16, "=h,=h,=h,=h,=h,=h,=h,=h,r,h,h", [packed, zz, s],
                                     dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)


@triton.jit
def _dot_asm(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, M, N, stride_xm, stride_qk, stride_sk, stride_zk,
             stride_os, stride_om, k_steps_per_split, k_steps,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = rm < M, rn < N
    rkp = tl.arange(0, BLOCK_K // 8)
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + rkp[None, :] * 8
    q_ptrs = qw_ptr + rkp[:, None] * stride_qk + rn[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    kb0 = pid_k * k_steps_per_split
    kb1 = tl.minimum(kb0 + k_steps_per_split, k_steps)
    for kb in range(kb0, kb1):
        packed = tl.load(q_ptrs + kb * (BLOCK_K // 8) * stride_qk, mask=n_mask[None, :], other=0)
        s = tl.load(s_ptr + kb * stride_sk + rn, mask=n_mask, other=0.0)
        z = tl.load(z_ptr + kb * stride_zk + rn, mask=n_mask, other=0)
        zz = (z.to(tl.int16) | 0x4300).to(tl.bfloat16, bitcast=True)
        zz2, _ = tl.broadcast(zz[None, :], packed)
        s2, _ = tl.broadcast(s[None, :], packed)
        w0, w4, w1, w5, w2, w6, w3, w7 = _dq8(packed, zz2, s2)
        xb = x_ptrs + kb * BLOCK_K
        acc = tl.dot(tl.load(xb + 0, mask=m_mask[:, None], other=0.0), w0, acc)
        acc = tl.dot(tl.load(xb + 1, mask=m_mask[:, None], other=0.0), w1, acc)
        acc = tl.dot(tl.load(xb + 2, mask=m_mask[:, None], other=0.0), w2, acc)
        acc = tl.dot(tl.load(xb + 3, mask=m_mask[:, None], other=0.0), w3, acc)
        acc = tl.dot(tl.load(xb + 4, mask=m_mask[:, None], other=0.0), w4, acc)
        acc = tl.dot(tl.load(xb + 5, mask=m_mask[:, None], other=0.0), w5, acc)
        acc = tl.dot(tl.load(xb + 6, mask=m_mask[:, None], other=0.0), w6, acc)
        acc = tl.dot(tl.load(xb + 7, mask=m_mask[:, None], other=0.0), w7, acc)
    o_ptrs = out_ptr + pid_k * stride_os + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _dot_split8(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, M, N, stride_xm, stride_qk, stride_sk, stride_zk,
                stride_os, stride_om, k_steps_per_split, k_steps,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # pure Triton, no [K/8, 8, N] -> [K, N] reshape: 8 dots of K/8 each, x gathered per nibble
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = rm < M, rn < N
    rkp = tl.arange(0, BLOCK_K // 8)
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + rkp[None, :] * 8
    q_ptrs = qw_ptr + rkp[:, None] * stride_qk + rn[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    kb0 = pid_k * k_steps_per_split
    kb1 = tl.minimum(kb0 + k_steps_per_split, k_steps)
    for kb in range(kb0, kb1):
        packed = tl.load(q_ptrs + kb * (BLOCK_K // 8) * stride_qk, mask=n_mask[None, :], other=0)
        s = tl.load(s_ptr + kb * stride_sk + rn, mask=n_mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + kb * stride_zk + rn, mask=n_mask, other=0).to(tl.float32) + 8388608.0
        xb = x_ptrs + kb * BLOCK_K
        for i in tl.static_range(8):
            q = ((packed >> (4 * i)) & 0xF) | 0x4B000000
            w = (q.to(tl.float32, bitcast=True) - z[None, :]) * s[None, :]
            xi = tl.load(xb + i, mask=m_mask[:, None], other=0.0)
            acc = tl.dot(xi, w.to(xi.dtype), acc)
    o_ptrs = out_ptr + pid_k * stride_os + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _gemv_asm(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, N, stride_qk, stride_sk, stride_zk, stride_os,
              k_steps_per_split, k_steps, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
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
        s = tl.load(s_ptr + kb * stride_sk + rn, mask=n_mask, other=0.0)
        z = tl.load(z_ptr + kb * stride_zk + rn, mask=n_mask, other=0)
        zz = (z.to(tl.int16) | 0x4300).to(tl.bfloat16, bitcast=True)
        zz2, _ = tl.broadcast(zz[None, :], packed)
        s2, _ = tl.broadcast(s[None, :], packed)
        w0, w4, w1, w5, w2, w6, w3, w7 = _dq8(packed, zz2, s2)
        xb = x_ptr + kb * BLOCK_K + rkp * 8
        acc2 += tl.load(xb + 0).to(tl.float32)[:, None] * w0.to(tl.float32)
        acc2 += tl.load(xb + 1).to(tl.float32)[:, None] * w1.to(tl.float32)
        acc2 += tl.load(xb + 2).to(tl.float32)[:, None] * w2.to(tl.float32)
        acc2 += tl.load(xb + 3).to(tl.float32)[:, None] * w3.to(tl.float32)
        acc2 += tl.load(xb + 4).to(tl.float32)[:, None] * w4.to(tl.float32)
        acc2 += tl.load(xb + 5).to(tl.float32)[:, None] * w5.to(tl.float32)
        acc2 += tl.load(xb + 6).to(tl.float32)[:, None] * w6.to(tl.float32)
        acc2 += tl.load(xb + 7).to(tl.float32)[:, None] * w7.to(tl.float32)
    acc = tl.sum(acc2, axis=0)
    tl.store(out_ptr + pid_k * stride_os + rn, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _gemv_kint(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, N, stride_qk, stride_sk, stride_zk, stride_os,
               k_steps_per_split, k_steps, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # layout variant: nibble i of int32 row r of a group is k = i * (K/8) + r, so each x_i
    # is one contiguous [K/8] load
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
            xi = tl.load(x_ptr + kb * BLOCK_K + i * (BLOCK_K // 8) + rkp).to(tl.float32)
            q = ((packed >> (4 * i)) & 0xF) | 0x4B000000
            part += xi[:, None] * (q.to(tl.float32, bitcast=True) - z[None, :])
        acc2 += part * s[None, :]
    acc = tl.sum(acc2, axis=0)
    tl.store(out_ptr + pid_k * stride_os + rn, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _gemv_fused(x_ptr, qw_ptr, s_ptr, z_ptr, part_ptr, out_ptr, lock_ptr, N, stride_qk, stride_sk, stride_zk,
                stride_os, k_steps_per_split, k_steps, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
    # current gemv + split-K reduction by the last program of each N tile (fixed order: deterministic)
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
            xi = tl.load(x_ptr + kb * BLOCK_K + rkp * 8 + i).to(tl.float32)
            q = ((packed >> (4 * i)) & 0xF) | 0x4B000000
            part += xi[:, None] * (q.to(tl.float32, bitcast=True) - z[None, :])
        acc2 += part * s[None, :]
    acc = tl.sum(acc2, axis=0)
    if SPLIT_K == 1:
        tl.store(out_ptr + rn, acc.to(out_ptr.dtype.element_ty), mask=n_mask)
    else:
        tl.store(part_ptr + pid_k * stride_os + rn, acc, mask=n_mask)
        done = tl.atomic_add(lock_ptr + pid_n, 1, sem="acq_rel")
        if done == SPLIT_K - 1:
            tot = tl.zeros([BLOCK_N], dtype=tl.float32)
            for i in range(SPLIT_K):
                tot += tl.load(part_ptr + i * stride_os + rn, mask=n_mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + rn, tot.to(out_ptr.dtype.element_ty), mask=n_mask)
            tl.atomic_xchg(lock_ptr + pid_n, 0)


_LOCKS = {}


# one int32 -> 8 bf16 values 128 + q (nibbles [0, 4, 1, 5, 2, 6, 3, 7]): 3 shifts + 4 lop3, the
# zero point and scale are applied to the dot's output instead (per group, per column)
_DQ_INT = tl.constexpr("""
{
.reg .b32 t0, t1, t2, t3;
lop3.b32 t0, $8, 0x000F000F, 0x43004300, 0xEA;
shr.u32 t1, $8, 4;
lop3.b32 t1, t1, 0x000F000F, 0x43004300, 0xEA;
shr.u32 t2, $8, 8;
lop3.b32 t2, t2, 0x000F000F, 0x43004300, 0xEA;
shr.u32 t3, $8, 12;
lop3.b32 t3, t3, 0x000F000F, 0x43004300, 0xEA;
mov.b32 {$0, $1}, t0;
mov.b32 {$2, $3}, t1;
mov.b32 {$4, $5}, t2;
mov.b32 {$6, $7}, t3;
}
""")


@triton.jit
def _dq8i(packed):
    return tl.inline_asm_elementwise(_DQ_INT, "=h,=h,=h,=h,=h,=h,=h,=h,r", [packed],
                                     dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)


@triton.jit
def _dot_int(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, M, N, stride_xm, stride_qk, stride_sk, stride_zk,
             stride_os, stride_om, k_steps_per_split, k_steps,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # sum_k x (q - z) s = s * (dot(x, 128 + q) - (128 + z) * sum_k x), per group
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = rm < M, rn < N
    rkp = tl.arange(0, BLOCK_K // 8)
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + rkp[None, :] * 8
    q_ptrs = qw_ptr + rkp[:, None] * stride_qk + rn[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    kb0 = pid_k * k_steps_per_split
    kb1 = tl.minimum(kb0 + k_steps_per_split, k_steps)
    for kb in range(kb0, kb1):
        packed = tl.load(q_ptrs + kb * (BLOCK_K // 8) * stride_qk, mask=n_mask[None, :], other=0)
        s = tl.load(s_ptr + kb * stride_sk + rn, mask=n_mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + kb * stride_zk + rn, mask=n_mask, other=0).to(tl.float32) + 128.0
        w0, w4, w1, w5, w2, w6, w3, w7 = _dq8i(packed)
        xb = x_ptrs + kb * BLOCK_K
        x0 = tl.load(xb + 0, mask=m_mask[:, None], other=0.0)
        x1 = tl.load(xb + 1, mask=m_mask[:, None], other=0.0)
        x2 = tl.load(xb + 2, mask=m_mask[:, None], other=0.0)
        x3 = tl.load(xb + 3, mask=m_mask[:, None], other=0.0)
        x4 = tl.load(xb + 4, mask=m_mask[:, None], other=0.0)
        x5 = tl.load(xb + 5, mask=m_mask[:, None], other=0.0)
        x6 = tl.load(xb + 6, mask=m_mask[:, None], other=0.0)
        x7 = tl.load(xb + 7, mask=m_mask[:, None], other=0.0)
        g = tl.dot(x0, w0)
        g = tl.dot(x1, w1, g)
        g = tl.dot(x2, w2, g)
        g = tl.dot(x3, w3, g)
        g = tl.dot(x4, w4, g)
        g = tl.dot(x5, w5, g)
        g = tl.dot(x6, w6, g)
        g = tl.dot(x7, w7, g)
        xs = (x0.to(tl.float32) + x1.to(tl.float32) + x2.to(tl.float32) + x3.to(tl.float32)
              + x4.to(tl.float32) + x5.to(tl.float32) + x6.to(tl.float32) + x7.to(tl.float32))
        xsum = tl.sum(xs, axis=1)
        acc += (g - xsum[:, None] * z[None, :]) * s[None, :]
    o_ptrs = out_ptr + pid_k * stride_os + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# kint layout: nibble i of int32 row r of a group is k = i * (group / 8) + r. Outputs are
# nibbles [0, 4, 1, 5, 2, 6, 3, 7] as bf16 values q - 8 (CENTER) or 128 + q.
_DQ_C = tl.constexpr("""
{
.reg .b32 t0, t1, t2, t3, c;
mov.b32 c, 0xC308C308;
lop3.b32 t0, $8, 0x000F000F, 0x43004300, 0xEA;
shr.u32 t1, $8, 4;
lop3.b32 t1, t1, 0x000F000F, 0x43004300, 0xEA;
shr.u32 t2, $8, 8;
lop3.b32 t2, t2, 0x000F000F, 0x43004300, 0xEA;
shr.u32 t3, $8, 12;
lop3.b32 t3, t3, 0x000F000F, 0x43004300, 0xEA;
add.rn.bf16x2 t0, t0, c;
add.rn.bf16x2 t1, t1, c;
add.rn.bf16x2 t2, t2, c;
add.rn.bf16x2 t3, t3, c;
mov.b32 {$0, $1}, t0;
mov.b32 {$2, $3}, t1;
mov.b32 {$4, $5}, t2;
mov.b32 {$6, $7}, t3;
}
""")


@triton.jit
def _dq8c(packed):
    return tl.inline_asm_elementwise(_DQ_C, "=h,=h,=h,=h,=h,=h,=h,=h,r", [packed],
                                     dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)


@triton.jit
def _dot_k(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, M, N, stride_xm, stride_qk, stride_sk, stride_zk,
           stride_os, stride_om, k_steps_per_split, k_steps,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CENTER: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = rm < M, rn < N
    G8: tl.constexpr = BLOCK_K // 8
    rkp = tl.arange(0, G8)
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + rkp[None, :]
    q_ptrs = qw_ptr + rkp[:, None] * stride_qk + rn[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    kb0 = pid_k * k_steps_per_split
    kb1 = tl.minimum(kb0 + k_steps_per_split, k_steps)
    for kb in range(kb0, kb1):
        packed = tl.load(q_ptrs + kb * G8 * stride_qk, mask=n_mask[None, :], other=0)
        s = tl.load(s_ptr + kb * stride_sk + rn, mask=n_mask, other=0.0).to(tl.float32)
        if CENTER:
            z = tl.load(z_ptr + kb * stride_zk + rn, mask=n_mask, other=0).to(tl.float32) - 8.0
            w0, w4, w1, w5, w2, w6, w3, w7 = _dq8c(packed)
        else:
            z = tl.load(z_ptr + kb * stride_zk + rn, mask=n_mask, other=0).to(tl.float32) + 128.0
            w0, w4, w1, w5, w2, w6, w3, w7 = _dq8i(packed)
        xb = x_ptrs + kb * BLOCK_K
        x0 = tl.load(xb + 0 * G8, mask=m_mask[:, None], other=0.0)
        x1 = tl.load(xb + 1 * G8, mask=m_mask[:, None], other=0.0)
        x2 = tl.load(xb + 2 * G8, mask=m_mask[:, None], other=0.0)
        x3 = tl.load(xb + 3 * G8, mask=m_mask[:, None], other=0.0)
        x4 = tl.load(xb + 4 * G8, mask=m_mask[:, None], other=0.0)
        x5 = tl.load(xb + 5 * G8, mask=m_mask[:, None], other=0.0)
        x6 = tl.load(xb + 6 * G8, mask=m_mask[:, None], other=0.0)
        x7 = tl.load(xb + 7 * G8, mask=m_mask[:, None], other=0.0)
        g = tl.dot(x0, w0)
        g = tl.dot(x1, w1, g)
        g = tl.dot(x2, w2, g)
        g = tl.dot(x3, w3, g)
        g = tl.dot(x4, w4, g)
        g = tl.dot(x5, w5, g)
        g = tl.dot(x6, w6, g)
        g = tl.dot(x7, w7, g)
        xs = (x0.to(tl.float32) + x1.to(tl.float32) + x2.to(tl.float32) + x3.to(tl.float32)
              + x4.to(tl.float32) + x5.to(tl.float32) + x6.to(tl.float32) + x7.to(tl.float32))
        xsum = tl.sum(xs, axis=1)
        acc += (g - xsum[:, None] * z[None, :]) * s[None, :]
    o_ptrs = out_ptr + pid_k * stride_os + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _gemv_k(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, N, stride_qk, stride_sk, stride_zk, stride_os,
            k_steps_per_split, k_steps, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # kint layout, lop3 dequant to 128 + q, fp32 FMA, zero and scale once per group and row
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    G8: tl.constexpr = BLOCK_K // 8
    rkp = tl.arange(0, G8)
    q_ptrs = qw_ptr + rkp[:, None] * stride_qk + rn[None, :]
    acc2 = tl.zeros([G8, BLOCK_N], dtype=tl.float32)
    kb0 = pid_k * k_steps_per_split
    kb1 = tl.minimum(kb0 + k_steps_per_split, k_steps)
    for kb in range(kb0, kb1):
        packed = tl.load(q_ptrs + kb * G8 * stride_qk, mask=n_mask[None, :], other=0)
        s = tl.load(s_ptr + kb * stride_sk + rn, mask=n_mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + kb * stride_zk + rn, mask=n_mask, other=0).to(tl.float32) + 128.0
        w0, w4, w1, w5, w2, w6, w3, w7 = _dq8i(packed)
        xb = x_ptr + kb * BLOCK_K + rkp
        x0 = tl.load(xb + 0 * G8).to(tl.float32)
        x1 = tl.load(xb + 1 * G8).to(tl.float32)
        x2 = tl.load(xb + 2 * G8).to(tl.float32)
        x3 = tl.load(xb + 3 * G8).to(tl.float32)
        x4 = tl.load(xb + 4 * G8).to(tl.float32)
        x5 = tl.load(xb + 5 * G8).to(tl.float32)
        x6 = tl.load(xb + 6 * G8).to(tl.float32)
        x7 = tl.load(xb + 7 * G8).to(tl.float32)
        part = x0[:, None] * w0.to(tl.float32)
        part += x1[:, None] * w1.to(tl.float32)
        part += x2[:, None] * w2.to(tl.float32)
        part += x3[:, None] * w3.to(tl.float32)
        part += x4[:, None] * w4.to(tl.float32)
        part += x5[:, None] * w5.to(tl.float32)
        part += x6[:, None] * w6.to(tl.float32)
        part += x7[:, None] * w7.to(tl.float32)
        xs = x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7
        acc2 += (part - xs[:, None] * z[None, :]) * s[None, :]
    acc = tl.sum(acc2, axis=0)
    tl.store(out_ptr + pid_k * stride_os + rn, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _gemv_f(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, N, stride_qk, stride_sk, stride_zk, stride_os,
            k_steps_per_split, k_steps, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # kint layout; each nibble moved to bits 16..19 of 128.0f (shift + lop3): fp32 128 + q exactly;
    # sum_k x (q - z) s = s * (sum_k x (128 + q) - (128 + z) sum_k x), per group
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    G8: tl.constexpr = BLOCK_K // 8
    rkp = tl.arange(0, G8)
    q_ptrs = qw_ptr + rkp[:, None] * stride_qk + rn[None, :]
    acc2 = tl.zeros([G8, BLOCK_N], dtype=tl.float32)
    kb0 = pid_k * k_steps_per_split
    kb1 = tl.minimum(kb0 + k_steps_per_split, k_steps)
    for kb in range(kb0, kb1):
        packed = tl.load(q_ptrs + kb * G8 * stride_qk, mask=n_mask[None, :], other=0).to(tl.uint32, bitcast=True)
        s = tl.load(s_ptr + kb * stride_sk + rn, mask=n_mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + kb * stride_zk + rn, mask=n_mask, other=0).to(tl.float32) + 128.0
        part, xs = W._gemv_group(packed, x_ptr + kb * BLOCK_K, rkp, z, G8, False)
        acc2 += (part - xs[:, None] * z[None, :]) * s[None, :]
    acc = tl.sum(acc2, axis=0)
    tl.store(out_ptr + pid_k * stride_os + rn, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _dot_swap(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, M, N, stride_xm, stride_qk, stride_sk, stride_zk,
              stride_os, stride_om, k_steps_per_split, k_steps,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # swap AB: out^T tile [BLOCK_N, BLOCK_M] = sum_i W_i [BLOCK_N, G8] @ x_i^T [G8, BLOCK_M]. The
    # dequantized weights are the A operand (Hopper's wgmma reads A from registers; B must sit in
    # shared memory), x^T the small B operand; M = 1 pads x to BLOCK_M = 16 columns, not 16 rows.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    G8: tl.constexpr = BLOCK_K // 8
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = rm < M, rn < N
    rkp = tl.arange(0, G8)
    q_ptrs = qw_ptr + rn[:, None] + rkp[None, :] * stride_qk
    xt_ptrs = x_ptr + rm[None, :].to(tl.int64) * stride_xm + rkp[:, None]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    kb0 = pid_k * k_steps_per_split
    kb1 = tl.minimum(kb0 + k_steps_per_split, k_steps)
    for kb in range(kb0, kb1):
        packed = tl.load(q_ptrs + kb * G8 * stride_qk, mask=n_mask[:, None], other=0)
        s = tl.load(s_ptr + kb * stride_sk + rn, mask=n_mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + kb * stride_zk + rn, mask=n_mask, other=0).to(tl.float32) + 128.0
        w0, w4, w1, w5, w2, w6, w3, w7 = _dq8_prod(packed, 1)
        xb = xt_ptrs + kb * BLOCK_K
        x0 = tl.load(xb + 0 * G8, mask=m_mask[None, :], other=0.0)
        x1 = tl.load(xb + 1 * G8, mask=m_mask[None, :], other=0.0)
        x2 = tl.load(xb + 2 * G8, mask=m_mask[None, :], other=0.0)
        x3 = tl.load(xb + 3 * G8, mask=m_mask[None, :], other=0.0)
        x4 = tl.load(xb + 4 * G8, mask=m_mask[None, :], other=0.0)
        x5 = tl.load(xb + 5 * G8, mask=m_mask[None, :], other=0.0)
        x6 = tl.load(xb + 6 * G8, mask=m_mask[None, :], other=0.0)
        x7 = tl.load(xb + 7 * G8, mask=m_mask[None, :], other=0.0)
        g = tl.dot(w0, x0)
        g = tl.dot(w1, x1, g)
        g = tl.dot(w2, x2, g)
        g = tl.dot(w3, x3, g)
        g = tl.dot(w4, x4, g)
        g = tl.dot(w5, x5, g)
        g = tl.dot(w6, x6, g)
        g = tl.dot(w7, x7, g)
        xs = (x0.to(tl.float32) + x1.to(tl.float32) + x2.to(tl.float32) + x3.to(tl.float32)
              + x4.to(tl.float32) + x5.to(tl.float32) + x6.to(tl.float32) + x7.to(tl.float32))
        acc += (g - z[:, None] * tl.sum(xs, axis=0)[None, :]) * s[:, None]
    o_ptrs = out_ptr + pid_k * stride_os + rm[None, :].to(tl.int64) * stride_om + rn[:, None]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])


# ---------------------------------------------------------------- launchers
def launch(kind, x, p, cfg):
    M, N = x.shape[0], p.out_features
    k_steps = p.in_features // p.group
    sms = W.device_sms(x)
    block_n = cfg["block_n"]
    block_m = cfg.get("block_m") or (16 if M <= 16 else (32 if M <= 32 else 64))
    if kind in ("gemv", "gemv_fact", "load_only", "gemv_asm", "gemv_kint", "gemv_fused", "gemv_k", "gemv_f"):
        block_m = 1
    tiles = cdiv(N, block_n) * cdiv(M, block_m)
    split = max(1, min(k_steps, cdiv(cfg["waves"] * sms, tiles)))
    per = cdiv(k_steps, split)
    split = cdiv(k_steps, per)
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    dst = out if split == 1 else torch.empty((split, M, N), dtype=torch.float32, device=x.device)
    kw = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    sos = dst.stride(0) if split > 1 else 0
    if kind == "gemv":
        W._w4_gemv_kernel[(cdiv(N, block_n), split)](x, p.qweight, p.scales, p.zeros, dst, N, p.qweight.stride(0),
                                                     p.scales.stride(0), p.zeros.stride(0), sos, per, k_steps,
                                                     BLOCK_N=block_n, BLOCK_K=p.group, **kw)
    elif kind == "gemv_fact":
        _gemv_fact[(cdiv(N, block_n), split)](x, p.qweight, p.scales, p.zeros, dst, N, p.qweight.stride(0),
                                              p.scales.stride(0), p.zeros.stride(0), sos, per, k_steps,
                                              BLOCK_N=block_n, BLOCK_K=p.group, **kw)
    elif kind in ("gemv_asm", "gemv_kint", "gemv_k", "gemv_f"):
        kern = {"gemv_asm": _gemv_asm, "gemv_kint": _gemv_kint, "gemv_k": _gemv_k, "gemv_f": _gemv_f}[kind]
        kern[(cdiv(N, block_n), split)](x, p.qweight, p.scales, p.zeros, dst, N, p.qweight.stride(0),
                                        p.scales.stride(0), p.zeros.stride(0), sos, per, k_steps,
                                        BLOCK_N=block_n, BLOCK_K=p.group, **kw)
    elif kind == "gemv_fused":
        lock = _LOCKS.get(x.device)
        if lock is None:
            lock = _LOCKS[x.device] = torch.zeros(4096, dtype=torch.int32, device=x.device)
        _gemv_fused[(cdiv(N, block_n), split)](x, p.qweight, p.scales, p.zeros, dst, out, lock, N,
                                               p.qweight.stride(0), p.scales.stride(0), p.zeros.stride(0), sos,
                                               per, k_steps, SPLIT_K=split, BLOCK_N=block_n, BLOCK_K=p.group, **kw)
        return out
    elif kind == "load_only":
        _load_only[(cdiv(N, block_n), split)](p.qweight, p.scales, p.zeros, dst, N, p.qweight.stride(0),
                                              p.scales.stride(0), p.zeros.stride(0), sos, per, k_steps,
                                              BLOCK_N=block_n, BLOCK_K=p.group, **kw)
        return None
    elif kind in ("dot_k", "dot_kc"):
        _dot_k[(cdiv(N, block_n), split, cdiv(M, block_m))](
            x, p.qweight, p.scales, p.zeros, dst, M, N, x.stride(0), p.qweight.stride(0), p.scales.stride(0),
            p.zeros.stride(0), sos, dst.stride(-2), per, k_steps,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=p.group, CENTER=kind == "dot_kc", **kw)
    else:
        kern = {"dot": W._w4a16_kernel, "dot_asm": _dot_asm, "dot_split8": _dot_split8, "dot_int": _dot_int,
                "dot_swap": _dot_swap}[kind]
        kern[(cdiv(N, block_n), split, cdiv(M, block_m))](
            x, p.qweight, p.scales, p.zeros, dst, M, N, x.stride(0), p.qweight.stride(0), p.scales.stride(0),
            p.zeros.stride(0), sos, dst.stride(-2), per, k_steps,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=p.group, **kw)
    if split > 1 and cfg.get("reduce", True):
        W._splitk_reduce_kernel[(cdiv(M * N, 1024),)](dst, out, M * N, SPLIT_K=split, BLOCK=1024, num_warps=4)
    return out


def repack_kint(p):
    """Same codes, packed so that nibble i of int32 row r of a group is k = i * (group/8) + r."""
    q = W.unpack_w4_ref(p)  # [out, in]
    n_out, n_in = q.shape
    g8 = p.group // 8
    q = q.reshape(n_out, n_in // p.group, 8, g8).permute(1, 3, 2, 0)  # [groups, r, i, out]
    shifts = (torch.arange(8, device=q.device, dtype=torch.int64) * 4)[None, None, :, None]
    packed = (q << shifts).sum(2).reshape(n_in // 8, n_out)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return W.W4Packed(packed.contiguous(), p.scales, p.zeros, p.shape, p.group)


def graph_us(fn_list, reps=20):
    """Mean us per call: the calls captured back to back in one graph, replayed `reps` times."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fn_list:
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fn_list:
            f()
    g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) * 1000 / (reps * len(fn_list))


def main():
    out_dir = Path(os.environ.get("OUT", "/tmp"))
    dev = "cuda"
    torch.manual_seed(0)
    rows = []
    t_start = time.time()
    budget = float(os.environ.get("EXPLORE_BUDGET_S", "330"))

    # copy bandwidth
    a = torch.empty(2**30 // 2, dtype=torch.bfloat16, device=dev)
    b = torch.empty_like(a)
    us = graph_us([lambda: b.copy_(a)] * 4, reps=10)
    copy_gbs = 2 * a.numel() * 2 / us / 1e3
    print(f"copy {copy_gbs:.0f} GB/s", flush=True)
    del a, b
    x_big = torch.randn(64, 27648, dtype=torch.bfloat16, device=dev)

    shapes = [(5120, 55296), (5120, 7168), (5120, 5120), (27648, 5120)]
    packs = {}
    for (k, n) in shapes:
        w = torch.randn(n, k, dtype=torch.bfloat16, device=dev) * 0.02
        p = W.quantize_w4(w)
        copies = max(2, int(400e6 // (n * k // 2)) + 1)
        packs[(k, n)] = [p] + [W.W4Packed(p.qweight.clone(), p.scales.clone(), p.zeros.clone(), p.shape, p.group)
                               for _ in range(copies - 1)]
        del w

    def check(kind, M, p, cfg):
        x = x_big[:M, :p.in_features].contiguous()
        ref = W.w4a16_matmul_ref(x, p).float()
        got = launch(kind, x, p, cfg).float()
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        return err

    def measure(kind, M, shape, cfg):
        ps = packs[shape]
        x = x_big[:M, :shape[0]].contiguous()
        fns = [(lambda p=p: launch(kind, x, p, cfg)) for p in ps]
        us = graph_us(fns)
        wbytes = ps[0].qweight.numel() * 4 + ps[0].scales.numel() * 2 + ps[0].zeros.numel()
        return us, wbytes / us / 1e3

    def record(kind, M, shape, cfg, err=None):
        try:
            us, gbs = measure(kind, M, shape, cfg)
        except Exception as e:  # noqa: BLE001
            print(f"FAIL {kind} M={M} {shape} {cfg}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            rows.append(dict(kind=kind, M=M, shape=list(shape), cfg=cfg, error=str(e)[:300]))
            return None
        rows.append(dict(kind=kind, M=M, shape=list(shape), cfg=cfg, us=us, gbs=gbs, err=err))
        print(f"{kind:10s} M={M:2d} {shape[0]:5d}->{shape[1]:5d} {cfg} {us:7.1f} us {gbs:6.0f} GB/s err={err}",
              flush=True)
        return us

    base = dict(W.DEFAULT_CONFIG)
    p0 = packs[(5120, 7168)][0]
    pk0 = repack_kint(p0)
    x = x_big[:1, :5120].contiguous()
    ref = W.w4a16_matmul_ref(x, p0).float()
    for kind in ("gemv_f", "gemv_k"):
        got = launch(kind, x, pk0, base).float()
        d = (got - ref).abs()
        print(f"check {kind}: max {(d.max() / ref.abs().max()).item():.2e} mean {(d.mean() / ref.abs().mean()).item():.2e}")
    for shape in shapes:
        for kind in ("gemv_f", "gemv_k", "gemv_fused"):
            for cfg in (base, dict(base, waves=8), dict(base, block_n=256), dict(base, num_warps=8),
                        dict(base, num_warps=8, waves=8), dict(base, block_n=64, waves=8)):
                record(kind, 1, shape, cfg)
    (out_dir / "w4_explore.json").write_text(json.dumps(dict(copy_gbs=copy_gbs, gpu=torch.cuda.get_device_name(),
                                                             triton=triton.__version__, rows=rows), indent=1))


def _config_sweep(out_name: str, label: str, call, Ms, grid) -> None:
    """Time ``call(x, p, cfg)`` at every launch config of ``grid`` against the production kernel
    at its own plan, per 32B matmul shape and number of rows M; keep the fastest config whose
    error against the reference is < 2e-2. Stops trying configs after $EXPLORE_BUDGET_S
    (default 300) seconds. $OUT/<out_name>."""
    out_dir = Path(os.environ.get("OUT", "/tmp"))
    dev = "cuda"
    torch.manual_seed(0)
    x_big = torch.randn(64, 27648, dtype=torch.bfloat16, device=dev)
    rows = []
    t0 = time.time()
    budget = float(os.environ.get("EXPLORE_BUDGET_S", "300"))
    for (k, n) in [(5120, 55296), (27648, 5120), (5120, 7168), (5120, 5120)]:
        w = torch.randn(n, k, dtype=torch.bfloat16, device=dev) * 0.02
        p = W.quantize_w4(w)
        del w
        copies = max(2, int(400e6 // (n * k // 2)) + 1)
        ps = [p] + [W.W4Packed(p.qweight.clone(), p.scales.clone(), p.zeros.clone(), p.shape, p.group,
                               W.new_locks(n, dev)) for _ in range(copies - 1)]
        wbytes = p.qweight.numel() * 4 + p.scales.numel() * 2 + p.zeros.numel()
        for M in Ms:
            x = x_big[:M, :k].contiguous()
            ref = W.w4a16_matmul_ref(x, p).float()
            prod_us = graph_us([(lambda q=q: W.w4a16_matmul(x, q)) for q in ps], reps=10)
            best = None
            for cfg in grid:
                if time.time() - t0 > budget:
                    break
                try:
                    got = call(x, p, cfg).float()
                    err = ((got - ref).abs().max() / ref.abs().max()).item()
                    us = graph_us([(lambda q=q: call(x, q, cfg)) for q in ps], reps=10)
                except Exception as e:  # noqa: BLE001
                    rows.append(dict(M=M, shape=[k, n], cfg=cfg, error=str(e)[:300]))
                    print("FAIL", M, k, n, cfg, str(e)[:300], flush=True)
                    continue
                rows.append(dict(M=M, shape=[k, n], cfg=cfg, us=us, err=err))
                if err < 2e-2 and (best is None or us < best[0]):
                    best = (us, cfg, err)
            print(f"M={M:2d} {k:5d}->{n:5d} production {prod_us:6.1f} us ({wbytes / prod_us / 1e3:.0f} GB/s)  "
                  f"{label} best {best} ({wbytes / best[0] / 1e3 if best else 0:.0f} GB/s)", flush=True)
            rows.append(dict(M=M, shape=[k, n], production_us=prod_us, best=best))
        (out_dir / out_name).write_text(json.dumps(dict(gpu=torch.cuda.get_device_name(), rows=rows), indent=1))


def dot_sweep():
    """The production kernel (w4a16_matmul) at M = 16 over its launch configs, per 32B shape:
    the M >= 2 path had one fixed config. $OUT/w4_dot_sweep.json."""
    grid = [dict(block_n=bn, num_warps=nw, waves=wv, num_stages=st)
            for bn, nw, wv, st in itertools.product((64, 128, 256), (4, 8), (2, 4, 8), (3, 4))]
    _config_sweep("w4_dot_sweep.json", "config", lambda x, p, cfg: W.w4a16_matmul(x, p, config=cfg), (16,), grid)


def swap_sweep():
    """Swap-AB dot (_dot_swap: dequantized weights as the A operand) against the production
    kernel at $SWEEP_M rows (default 1,16), per 32B shape, over launch configs.
    $OUT/w4_swap_sweep.json. H200: 3-9% faster than the production kernel at M = 16 here, slower
    at M = 1; inside a 16-node verify of 8 layers + head (bench/gpu_profile.py) 1576 + 86 us
    against 1559 + 82 us once both sum split-K partials in a second kernel: not adopted."""
    grid = [dict(block_n=bn, num_warps=nw, waves=wv, num_stages=st, block_m=16)
            for bn, nw, wv, st in itertools.product((64, 128, 256), (4, 8), (1, 2, 4, 8), (3, 4))]
    Ms = [int(m) for m in os.environ.get("SWEEP_M", "1,16").split(",")]
    _config_sweep("w4_swap_sweep.json", "swap", lambda x, p, cfg: launch("dot_swap", x, p, cfg), Ms, grid)


# ---------------------------------------------------------------- tile-major layout
# qweight stored [N // BN, K // 8, BN]: each program's [G8, BN] tiles are one contiguous run
# down the whole K range (scales / zeros likewise [N // BN, K // group, BN]), so a program
# streams contiguous memory instead of 512-byte pieces `out` words apart.
def tile_pack(p, bn):
    n, k8 = p.out_features, p.in_features // 8
    groups = p.in_features // p.group
    qt = p.qweight.view(k8, n // bn, bn).permute(1, 0, 2).contiguous()
    st = p.scales.view(groups, n // bn, bn).permute(1, 0, 2).contiguous()
    zt = p.zeros.view(groups, n // bn, bn).permute(1, 0, 2).contiguous()
    return qt, st, zt


@triton.jit
def _load_only_tiled(qw_ptr, s_ptr, z_ptr, out_ptr, N, k_steps_per_split, k_steps,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    G8: tl.constexpr = BLOCK_K // 8
    cn = tl.arange(0, BLOCK_N)
    rkp = tl.arange(0, G8)
    q_ptrs = qw_ptr + pid_n.to(tl.int64) * (k_steps * G8 * BLOCK_N) + rkp[:, None] * BLOCK_N + cn[None, :]
    sz_off = pid_n.to(tl.int64) * (k_steps * BLOCK_N) + cn
    acc = tl.zeros([G8, BLOCK_N], dtype=tl.int32)
    accf = tl.zeros([BLOCK_N], dtype=tl.float32)
    kb0 = pid_k * k_steps_per_split
    kb1 = tl.minimum(kb0 + k_steps_per_split, k_steps)
    for kb in range(kb0, kb1):
        packed = tl.load(q_ptrs + kb * (G8 * BLOCK_N))
        s = tl.load(s_ptr + sz_off + kb * BLOCK_N).to(tl.float32)
        z = tl.load(z_ptr + sz_off + kb * BLOCK_N).to(tl.float32)
        acc ^= packed
        accf += s + z
    r = tl.sum(acc, axis=0).to(tl.float32) + accf
    tl.store(out_ptr + pid_k * N + pid_n * BLOCK_N + cn, r)


@triton.jit
def _gemv_tiled(x_ptr, qw_ptr, s_ptr, z_ptr, part_ptr, out_ptr, lock_ptr, N, stride_ps,
                k_steps_per_split, k_steps, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                SPLIT_K: tl.constexpr, USE_LOCKS: tl.constexpr):
    # the production GEMV (128 + q in fp32, zero point per group) over the tile-major layout
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    G8: tl.constexpr = BLOCK_K // 8
    cn = tl.arange(0, BLOCK_N)
    rn = pid_n * BLOCK_N + cn
    rkp = tl.arange(0, G8)
    q_ptrs = qw_ptr + pid_n.to(tl.int64) * (k_steps * G8 * BLOCK_N) + rkp[:, None] * BLOCK_N + cn[None, :]
    sz_off = pid_n.to(tl.int64) * (k_steps * BLOCK_N) + cn
    acc2 = tl.zeros([G8, BLOCK_N], dtype=tl.float32)
    kb0 = pid_k * k_steps_per_split
    kb1 = tl.minimum(kb0 + k_steps_per_split, k_steps)
    for kb in range(kb0, kb1):
        packed = tl.load(q_ptrs + kb * (G8 * BLOCK_N)).to(tl.uint32, bitcast=True)
        s = tl.load(s_ptr + sz_off + kb * BLOCK_N).to(tl.float32)
        z = tl.load(z_ptr + sz_off + kb * BLOCK_N).to(tl.float32) + 128.0
        part, xs = W._gemv_group(packed, x_ptr + kb * BLOCK_K, rkp, z, G8, False)
        acc2 += (part - xs[:, None] * z[None, :]) * s[None, :]
    acc = tl.sum(acc2, axis=0)
    W._splitk_finish(acc, part_ptr, out_ptr, lock_ptr, rn, rn < N, pid_k, stride_ps, pid_n, SPLIT_K, USE_LOCKS)


def tiled_call(kind, x, packs, p, cfg):
    """kind 'gemv_tiled' | 'load_tiled' on (qt, st, zt) = packs, launch plan as W._plan's gemv."""
    qt, st, zt = packs
    N = p.out_features
    k_steps = p.in_features // p.group
    bn = cfg["block_n"]
    tiles = cdiv(N, bn)
    split = max(1, min(k_steps, cdiv(cfg["waves"] * W.device_sms(x), tiles)))
    per = cdiv(k_steps, split)
    split = cdiv(k_steps, per)
    kw = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if kind == "load_tiled":
        dst = torch.empty((split, N), dtype=torch.float32, device=x.device)
        _load_only_tiled[(tiles, split)](qt, st, zt, dst, N, per, k_steps, BLOCK_N=bn, BLOCK_K=p.group, **kw)
        return None
    out = torch.empty((1, N), dtype=x.dtype, device=x.device)
    part = out if split == 1 else torch.empty((split, 1, N), dtype=torch.float32, device=x.device)
    use_locks = split > 1
    locks = p.locks if use_locks else part
    _gemv_tiled[(tiles, split)](x, qt, st, zt, part, out, locks, N, part.stride(0) if split > 1 else 0, per, k_steps,
                                BLOCK_N=bn, BLOCK_K=p.group, SPLIT_K=split, USE_LOCKS=use_locks, **kw)
    return out


def tiled_sweep():
    """Row-major [K/8, N] (production) against tile-major weights at M = 1, per 32B shape:
    load-only ceilings of both layouts, the production GEMV at its plan, and the same GEMV
    over tile-major weights at a few launch configs. $OUT/w4_tiled.json. H100 (2026-12-07,
    bench/results/w4-tiled-nvidia-h100-80gb-hbm3.json): tile-major raises the load-only ceiling
    (gate_up 61.8 -> 51.9 us, down 30.9 -> 27.5) but not the GEMV (76.3 vs 77.0, 42.0 vs 42.1,
    head 185.5 vs 194.6): the GEMV is bound by its arithmetic, not by the layout. Not adopted."""
    out_dir = Path(os.environ.get("OUT", "/tmp"))
    dev = "cuda"
    torch.manual_seed(0)
    rows = []
    a = torch.empty(2**30 // 2, dtype=torch.bfloat16, device=dev)
    b = torch.empty_like(a)
    us = graph_us([lambda: b.copy_(a)] * 4, reps=10)
    copy_gbs = 2 * a.numel() * 2 / us / 1e3
    print(f"copy {copy_gbs:.0f} GB/s", flush=True)
    del a, b
    x_big = torch.randn(1, 27648, dtype=torch.bfloat16, device=dev)
    base = dict(num_stages=3)
    for (k, n) in [(5120, 55296), (27648, 5120), (5120, 7168), (5120, 5120), (5120, 152064)]:
        w = torch.randn(n, k, dtype=torch.bfloat16, device=dev) * 0.02
        p = W.quantize_w4(w)
        del w
        copies = max(2, int(400e6 // (n * k // 2)) + 1)
        ps = [p] + [W.W4Packed(p.qweight.clone(), p.scales.clone(), p.zeros.clone(), p.shape, p.group,
                               W.new_locks(n, dev)) for _ in range(copies - 1)]
        wbytes = p.qweight.numel() * 4 + p.scales.numel() * 2 + p.zeros.numel()
        x = x_big[:, :k].contiguous()
        ref = W.w4a16_matmul_ref(x, p).float()
        bm, bn0, nw0, wv0, _ = W._plan(1, n, k, k // p.group, W.device_sms(x), {**W.DEFAULT_CONFIG, "group": p.group})
        prod = graph_us([(lambda q=q: W.w4a16_matmul(x, q)) for q in ps], reps=10)
        lo = graph_us([(lambda q=q: launch("load_only", x, q, dict(block_n=bn0, num_warps=nw0, waves=wv0, num_stages=3)))
                       for q in ps], reps=10)
        line = dict(shape=[k, n], production_us=prod, production_gbs=wbytes / prod / 1e3, load_only_us=lo,
                    plan=dict(block_n=bn0, num_warps=nw0, waves=wv0))
        print(f"{k:5d}->{n:6d} production {prod:6.1f} us ({wbytes / prod / 1e3:.0f} GB/s)  load-only {lo:6.1f} us "
              f"({wbytes / lo / 1e3:.0f} GB/s)", flush=True)
        tiled = {}
        for bn in (64, 128, 256):
            tiled[bn] = [tile_pack(q, bn) for q in ps]
        grid = [dict(base, block_n=bn, num_warps=nw, waves=wv)
                for bn, nw, wv in itertools.product((64, 128, 256), (4, 8), (4, 8, 16))]
        best, best_lo, res = None, None, []
        for cfg in grid:
            try:
                got = tiled_call("gemv_tiled", x, tiled[cfg["block_n"]][0], p, cfg).float()
                err = ((got - ref).abs().max() / ref.abs().max()).item()
                t = graph_us([(lambda q=q, tp=tp: tiled_call("gemv_tiled", x, tp, q, cfg))
                              for q, tp in zip(ps, tiled[cfg["block_n"]])], reps=10)
            except Exception as e:  # noqa: BLE001
                print("FAIL", k, n, cfg, str(e)[:300], flush=True)
                continue
            res.append(dict(cfg=cfg, us=t, err=err))
            if err < 2e-2 and (best is None or t < best["us"]):
                best = res[-1]
        for cfg in (best["cfg"], dict(base, block_n=bn0, num_warps=nw0, waves=wv0)):
            tlo = graph_us([(lambda q=q, tp=tp: tiled_call("load_tiled", x, tp, q, cfg))
                            for q, tp in zip(ps, tiled[cfg["block_n"]])], reps=10)
            res.append(dict(cfg=cfg, load_only_us=tlo))
            if best_lo is None or tlo < best_lo["load_only_us"]:
                best_lo = res[-1]
        line.update(tiled=res, best=best, best_load_only=best_lo)
        rows.append(line)
        print(f"   tiled best {best['us']:6.1f} us ({wbytes / best['us'] / 1e3:.0f} GB/s) {best['cfg']} err {best['err']:.1e}; "
              f"tiled load-only best {best_lo['load_only_us']:6.1f} us ({wbytes / best_lo['load_only_us'] / 1e3:.0f} GB/s) "
              f"{best_lo['cfg']}", flush=True)
        del ps, tiled
        torch.cuda.empty_cache()
        (out_dir / "w4_tiled.json").write_text(json.dumps(dict(copy_gbs=copy_gbs, gpu=torch.cuda.get_device_name(),
                                                               rows=rows), indent=1))



# ---------------------------------------------------------------- packed fp16x2 GEMV
# Fewer instructions a weight: a nibble masked in place is an fp16 subnormal, n * 2^-24 (bits
# 0..3) or n * 2^-20 (bits 4..7), exact; fma.rn.f16x2 multiplies two of them by a pair of x
# values scaled by a power of two X (per program, max |x| X in [2^14, 2^15): products stay far
# from fp16 overflow, and only terms below ~2^-8 of the largest go subnormal). One word = 1 shr
# + 4 and + 4 f16x2 FMAs + an f16 add and a convert: ~1.4 instructions a weight against ~3.3
# for the fp32 path. ZSUB subtracts the zero point in fp16 before the FMA (exact, +4 a word)
# instead of through z * sum x in fp32 afterwards.
# the production group step's PTX (W._H2_ASM), and a variant that subtracts the zero point in fp16 first
_H2_PLAIN = W._H2
_H2_ZSUB = tl.constexpr(W._H2_ASM.replace("mul.rn.f16x2 a, t0, $2;",
                                          "sub.rn.f16x2 t0, t0, $6;\nsub.rn.f16x2 t1, t1, $7;\n"
                                          "sub.rn.f16x2 t2, t2, $6;\nsub.rn.f16x2 t3, t3, $7;\n"
                                          "mul.rn.f16x2 a, t0, $2;"))
_h2_pair = W._h2_pair


@triton.jit
def _gemv_h2(x_ptr, qw_ptr, s_ptr, z_ptr, part_ptr, out_ptr, lock_ptr, N, stride_qk, stride_sk, stride_ps,
             k_steps_per_split, k_steps, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             SPLIT_K: tl.constexpr, USE_LOCKS: tl.constexpr, TILED: tl.constexpr, ZSUB: tl.constexpr):
    # TILED: qweight [N / BLOCK_N, K / 8, BLOCK_N], scales / zeros [N / BLOCK_N, K / group, BLOCK_N];
    # else the production [K / 8, N] with its strides.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    G8: tl.constexpr = BLOCK_K // 8
    cn = tl.arange(0, BLOCK_N)
    rn = pid_n * BLOCK_N + cn
    n_mask = rn < N
    rkp = tl.arange(0, G8)
    if TILED:
        q_ptrs = qw_ptr + pid_n.to(tl.int64) * (k_steps * G8 * BLOCK_N) + rkp[:, None] * BLOCK_N + cn[None, :]
        q_step = G8 * BLOCK_N
        s_ptrs = s_ptr + pid_n.to(tl.int64) * (k_steps * BLOCK_N) + cn
        z_ptrs = z_ptr + pid_n.to(tl.int64) * (k_steps * BLOCK_N) + cn
        s_step = BLOCK_N
    else:
        q_ptrs = qw_ptr + rkp[:, None] * stride_qk + rn[None, :]
        q_step = G8 * stride_qk
        s_ptrs = s_ptr + rn
        z_ptrs = z_ptr + rn
        s_step = stride_sk
    kb0 = pid_k * k_steps_per_split
    kb1 = tl.minimum(kb0 + k_steps_per_split, k_steps)
    # X = 2^(14 - floor(log2 max|x|)) over this program's K range, from the exponent bits (exact)
    rk = tl.arange(0, BLOCK_K)
    mx = tl.zeros([BLOCK_K], dtype=tl.float32)
    for kb in range(kb0, kb1):
        mx = tl.maximum(mx, tl.abs(tl.load(x_ptr + kb * BLOCK_K + rk).to(tl.float32)))
    m = tl.maximum(tl.max(mx, axis=0), 1e-30)
    e_m = (m.to(tl.int32, bitcast=True) >> 23) & 0xFF
    X = ((268 - e_m) << 23).to(tl.float32, bitcast=True)
    back = ((e_m + 10) << 23).to(tl.float32, bitcast=True)  # 2^24 / X
    Xs = X * 0.0625
    acc2 = tl.zeros([G8, BLOCK_N], dtype=tl.float32)
    for kb in range(kb0, kb1):
        packed = tl.load(q_ptrs + kb * q_step, mask=n_mask[None, :], other=0)
        s = tl.load(s_ptrs + kb * s_step, mask=n_mask, other=0.0).to(tl.float32)
        zi = tl.load(z_ptrs + kb * s_step, mask=n_mask, other=0).to(tl.int32)
        xb = x_ptr + kb * BLOCK_K + rkp
        x0 = tl.load(xb + 0 * G8).to(tl.float32)
        x1 = tl.load(xb + 1 * G8).to(tl.float32)
        x2 = tl.load(xb + 2 * G8).to(tl.float32)
        x3 = tl.load(xb + 3 * G8).to(tl.float32)
        x4 = tl.load(xb + 4 * G8).to(tl.float32)
        x5 = tl.load(xb + 5 * G8).to(tl.float32)
        x6 = tl.load(xb + 6 * G8).to(tl.float32)
        x7 = tl.load(xb + 7 * G8).to(tl.float32)
        xp0, _ = tl.broadcast(_h2_pair(x0 * X, x4 * X)[:, None], packed)
        xp1, _ = tl.broadcast(_h2_pair(x1 * Xs, x5 * Xs)[:, None], packed)
        xp2, _ = tl.broadcast(_h2_pair(x2 * X, x6 * X)[:, None], packed)
        xp3, _ = tl.broadcast(_h2_pair(x3 * Xs, x7 * Xs)[:, None], packed)
        if ZSUB:
            zz0, _ = tl.broadcast((zi | (zi << 16))[None, :], packed)
            zz1 = zz0 << 4
            part = tl.inline_asm_elementwise(_H2_ZSUB, "=r,r,r,r,r,r,r,r", [packed, xp0, xp1, xp2, xp3, zz0, zz1],
                                             dtype=tl.float32, is_pure=True, pack=1)
            acc2 += part * s[None, :]
        else:
            part = tl.inline_asm_elementwise(_H2_PLAIN, "=r,r,r,r,r,r", [packed, xp0, xp1, xp2, xp3],
                                             dtype=tl.float32, is_pure=True, pack=1)
            xs = (x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7) * (X * 5.9604644775390625e-08)  # * X / 2^24
            acc2 += (part - xs[:, None] * zi.to(tl.float32)[None, :]) * s[None, :]
    acc = tl.sum(acc2, axis=0) * back
    W._splitk_finish(acc, part_ptr, out_ptr, lock_ptr, rn, n_mask, pid_k, stride_ps, pid_n, SPLIT_K, USE_LOCKS)


@triton.jit
def _h2_prep_kernel(x_ptr, xp_ptr, xs_ptr, back_ptr, BLOCK_K: tl.constexpr):
    """One group of x (BLOCK_K values) -> the GEMV's f16x2 operand pairs, scaled by a per-group
    power of two: xp [4, G8] int32 (pair j of row r = (x[j*G8 + r], x[(j+4)*G8 + r]) * X, / 16
    for odd j), xs [G8] = sum_i x[i*G8 + r] * X / 2^24, back = 2^24 / X."""
    g = tl.program_id(0)
    G8: tl.constexpr = BLOCK_K // 8
    rkp = tl.arange(0, G8)
    xb = x_ptr + g * BLOCK_K + rkp
    x0 = tl.load(xb + 0 * G8).to(tl.float32)
    x1 = tl.load(xb + 1 * G8).to(tl.float32)
    x2 = tl.load(xb + 2 * G8).to(tl.float32)
    x3 = tl.load(xb + 3 * G8).to(tl.float32)
    x4 = tl.load(xb + 4 * G8).to(tl.float32)
    x5 = tl.load(xb + 5 * G8).to(tl.float32)
    x6 = tl.load(xb + 6 * G8).to(tl.float32)
    x7 = tl.load(xb + 7 * G8).to(tl.float32)
    mx = tl.maximum(tl.maximum(tl.maximum(tl.abs(x0), tl.abs(x1)), tl.maximum(tl.abs(x2), tl.abs(x3))),
                    tl.maximum(tl.maximum(tl.abs(x4), tl.abs(x5)), tl.maximum(tl.abs(x6), tl.abs(x7))))
    m = tl.maximum(tl.max(mx, axis=0), 1e-30)
    e_m = (m.to(tl.int32, bitcast=True) >> 23) & 0xFF
    X = ((268 - e_m) << 23).to(tl.float32, bitcast=True)
    Xs = X * 0.0625
    o = xp_ptr + g * (4 * G8) + rkp
    tl.store(o + 0 * G8, _h2_pair(x0 * X, x4 * X))
    tl.store(o + 1 * G8, _h2_pair(x1 * Xs, x5 * Xs))
    tl.store(o + 2 * G8, _h2_pair(x2 * X, x6 * X))
    tl.store(o + 3 * G8, _h2_pair(x3 * Xs, x7 * Xs))
    tl.store(xs_ptr + g * G8 + rkp, (x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7) * (X * 5.9604644775390625e-08))
    tl.store(back_ptr + g, ((e_m + 10) << 23).to(tl.float32, bitcast=True))


@triton.jit
def _gemv_h2p(xp_ptr, xs_ptr, back_ptr, qw_ptr, s_ptr, z_ptr, part_ptr, out_ptr, lock_ptr, N, stride_qk, stride_sk,
              stride_ps, k_steps_per_split, k_steps, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              SPLIT_K: tl.constexpr, USE_LOCKS: tl.constexpr, TILED: tl.constexpr):
    # _gemv_h2 on x prepared by _h2_prep_kernel (zero point through z * sum x)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    G8: tl.constexpr = BLOCK_K // 8
    cn = tl.arange(0, BLOCK_N)
    rn = pid_n * BLOCK_N + cn
    n_mask = rn < N
    rkp = tl.arange(0, G8)
    if TILED:
        q_ptrs = qw_ptr + pid_n.to(tl.int64) * (k_steps * G8 * BLOCK_N) + rkp[:, None] * BLOCK_N + cn[None, :]
        q_step = G8 * BLOCK_N
        s_ptrs = s_ptr + pid_n.to(tl.int64) * (k_steps * BLOCK_N) + cn
        z_ptrs = z_ptr + pid_n.to(tl.int64) * (k_steps * BLOCK_N) + cn
        s_step = BLOCK_N
    else:
        q_ptrs = qw_ptr + rkp[:, None] * stride_qk + rn[None, :]
        q_step = G8 * stride_qk
        s_ptrs = s_ptr + rn
        z_ptrs = z_ptr + rn
        s_step = stride_sk
    kb0 = pid_k * k_steps_per_split
    kb1 = tl.minimum(kb0 + k_steps_per_split, k_steps)
    acc2 = tl.zeros([G8, BLOCK_N], dtype=tl.float32)
    for kb in range(kb0, kb1):
        packed = tl.load(q_ptrs + kb * q_step, mask=n_mask[None, :], other=0)
        s = tl.load(s_ptrs + kb * s_step, mask=n_mask, other=0.0).to(tl.float32) * tl.load(back_ptr + kb)
        zf = tl.load(z_ptrs + kb * s_step, mask=n_mask, other=0).to(tl.float32)
        xb = xp_ptr + kb * (4 * G8) + rkp
        xp0, _ = tl.broadcast(tl.load(xb + 0 * G8)[:, None], packed)
        xp1, _ = tl.broadcast(tl.load(xb + 1 * G8)[:, None], packed)
        xp2, _ = tl.broadcast(tl.load(xb + 2 * G8)[:, None], packed)
        xp3, _ = tl.broadcast(tl.load(xb + 3 * G8)[:, None], packed)
        xs = tl.load(xs_ptr + kb * G8 + rkp)
        part = tl.inline_asm_elementwise(_H2_PLAIN, "=r,r,r,r,r,r", [packed, xp0, xp1, xp2, xp3],
                                         dtype=tl.float32, is_pure=True, pack=1)
        acc2 += (part - xs[:, None] * zf[None, :]) * s[None, :]
    acc = tl.sum(acc2, axis=0)
    W._splitk_finish(acc, part_ptr, out_ptr, lock_ptr, rn, n_mask, pid_k, stride_ps, pid_n, SPLIT_K, USE_LOCKS)


def h2_prep(x, group=128):
    """x [1, K] -> (xp, xs, back) for _gemv_h2p."""
    k = x.shape[1]
    g8 = group // 8
    xp = torch.empty((k // group, 4, g8), dtype=torch.int32, device=x.device)
    xs = torch.empty((k // group, g8), dtype=torch.float32, device=x.device)
    back = torch.empty((k // group,), dtype=torch.float32, device=x.device)
    _h2_prep_kernel[(k // group,)](x, xp, xs, back, BLOCK_K=group, num_warps=1)
    return xp, xs, back


def h2_call(x, p, cfg, tiled=None):
    """The packed-fp16x2 GEMV at launch config cfg (block_n, num_warps, waves, zsub) on the
    production layout, or on tile-major weights tiled = tile_pack(p, cfg['block_n'])."""
    N = p.out_features
    k_steps = p.in_features // p.group
    bn = cfg["block_n"]
    tiles = cdiv(N, bn)
    split = max(1, min(k_steps, cdiv(cfg["waves"] * W.device_sms(x), tiles)))
    per = cdiv(k_steps, split)
    split = cdiv(k_steps, per)
    out = torch.empty((1, N), dtype=x.dtype, device=x.device)
    part = out if split == 1 else torch.empty((split, 1, N), dtype=torch.float32, device=x.device)
    use_locks = split > 1
    locks = p.locks if use_locks else part
    qw, s, z = tiled if tiled is not None else (p.qweight, p.scales, p.zeros)
    if cfg.get("prep"):
        xp, xs, back = cfg["prep"] if isinstance(cfg["prep"], tuple) else h2_prep(x, p.group)
        _gemv_h2p[(tiles, split)](xp, xs, back, qw, s, z, part, out, locks, N, p.qweight.stride(0), p.scales.stride(0),
                                  part.stride(0) if split > 1 else 0, per, k_steps, BLOCK_N=bn, BLOCK_K=p.group,
                                  SPLIT_K=split, USE_LOCKS=use_locks, TILED=tiled is not None,
                                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        return out
    _gemv_h2[(tiles, split)](x, qw, s, z, part, out, locks, N, p.qweight.stride(0), p.scales.stride(0),
                             part.stride(0) if split > 1 else 0, per, k_steps, BLOCK_N=bn, BLOCK_K=p.group,
                             SPLIT_K=split, USE_LOCKS=use_locks, TILED=tiled is not None, ZSUB=cfg["zsub"],
                             num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


H2_SHAPES = [(5120, 55296), (27648, 5120), (5120, 7168), (5120, 5120), (5120, 152064)]


def h2_sweep():
    """The packed-fp16x2 GEMV (row-major and tile-major, with and without the fp16 zero-point
    subtract) against the production GEMV at M = 1, per 32B shape, error against the reference
    (bf16-rounded weights, fp32 sums) on gaussian x and on x with a few 100x outliers. Also
    the load-only ceilings. $OUT/w4_h2.json. H100 (bench/results/w4-h2-nvidia-h100-80gb-hbm3.json):
    H2 in production slower on gate_up/down/head, faster on qkv/o; h2p gate_up 63.8 us."""
    out_dir = Path(os.environ.get("OUT", "/tmp"))
    dev = "cuda"
    torch.manual_seed(0)
    rows = []
    a = torch.empty(2**30 // 2, dtype=torch.bfloat16, device=dev)
    b = torch.empty_like(a)
    us = graph_us([lambda: b.copy_(a)] * 4, reps=10)
    copy_gbs = 2 * a.numel() * 2 / us / 1e3
    print(f"copy {copy_gbs:.0f} GB/s", flush=True)
    del a, b
    t_start = time.time()
    budget = float(os.environ.get("EXPLORE_BUDGET_S", "400"))
    xg = torch.randn(1, 27648, dtype=torch.bfloat16, device=dev)
    xo = xg.clone()
    xo[0, torch.randperm(27648, device=dev)[:8]] *= 100.0  # massive-activation channels
    base = dict(num_stages=3)
    for (k, n) in H2_SHAPES:
        w = torch.randn(n, k, dtype=torch.bfloat16, device=dev) * 0.02
        p = W.quantize_w4(w)
        del w
        copies = max(2, int(400e6 // (n * k // 2)) + 1)
        ps = [p] + [W.W4Packed(p.qweight.clone(), p.scales.clone(), p.zeros.clone(), p.shape, p.group,
                               W.new_locks(n, dev)) for _ in range(copies - 1)]
        wbytes = p.qweight.numel() * 4 + p.scales.numel() * 2 + p.zeros.numel()
        x = xg[:, :k].contiguous()
        xs_o = xo[:, :k].contiguous()
        refs = {"gauss": W.w4a16_matmul_ref(x, p).float(), "outlier": W.w4a16_matmul_ref(xs_o, p).float()}
        exact = {"gauss": (x.float() @ W.dequantize_w4_ref(p, torch.float32).t()),
                 "outlier": (xs_o.float() @ W.dequantize_w4_ref(p, torch.float32).t())}

        def errs(fn):
            out = {}
            for name, xx in (("gauss", x), ("outlier", xs_o)):
                got = fn(xx).float()
                out[name] = ((got - exact[name]).abs().max() / exact[name].abs().max()).item()
            return out

        prod_err = errs(lambda xx: W.w4a16_matmul(xx, p, config={"h2": "auto"}))
        ref_err = {nm: ((refs[nm] - exact[nm]).abs().max() / exact[nm].abs().max()).item() for nm in refs}
        bm, bn0, nw0, wv0, _ = W._plan(1, n, k, k // p.group, W.device_sms(x), {**W.DEFAULT_CONFIG, "group": p.group})
        prod = graph_us([(lambda q=q: W.w4a16_matmul(x, q, config={"h2": "auto"})) for q in ps], reps=10)
        lo = graph_us([(lambda q=q: launch("load_only", x, q, dict(block_n=bn0, num_warps=nw0, waves=wv0, num_stages=3)))
                       for q in ps], reps=10)
        line = dict(shape=[k, n], production_us=prod, production_gbs=wbytes / prod / 1e3, load_only_us=lo,
                    production_err=prod_err, ref_err=ref_err, plan=dict(block_n=bn0, num_warps=nw0, waves=wv0))
        print(f"{k:5d}->{n:6d} production with H2 {prod:6.1f} us ({wbytes / prod / 1e3:.0f} GB/s) err {prod_err}  "
              f"load-only {lo:6.1f} us; ref err {ref_err}", flush=True)
        tiled = {bn: [tile_pack(q, bn) for q in ps] for bn in (128, 256)}
        res = []
        best = {}
        # variant: h2 (x scaled in the GEMV), h2p (x prepared by _h2_prep_kernel, timed apart),
        # h2zsub (zero point subtracted in fp16)
        prep = h2_prep(x, p.group)
        prep_us = graph_us([lambda: h2_prep(x, p.group)] * 8, reps=10)
        prod_fp32 = graph_us([(lambda q=q: W.w4a16_matmul(x, q, config={"h2": False})) for q in ps], reps=10)
        line["production_fp32_us"] = prod_fp32
        print(f"   production with the fp32 GEMV (h2 off) {prod_fp32:6.1f} us", flush=True)
        grid = [("h2zsub", "tiled", 128, 8, 8)]
        grid += [(v,) + g for v in ("h2", "h2p") for g in itertools.product(("tiled",), (128, 256), (4, 8), (8,))]
        grid += [("h2p", "row", bn0, nw0, wv0)]
        for var, lay, bn, nw, wv in grid:
            if time.time() - t_start > budget:
                print("budget spent: skipping the rest", flush=True)
                break
            cfg = dict(base, block_n=bn, num_warps=nw, waves=wv, zsub=var == "h2zsub", prep=var == "h2p")
            cfg_t = dict(cfg, prep=prep) if var == "h2p" else cfg
            try:
                e = errs(lambda xx: h2_call(xx, p, cfg, tiled[bn][0] if lay == "tiled" else None))
                t = graph_us([(lambda q=q, i=i: h2_call(x, q, cfg_t, tiled[bn][i] if lay == "tiled" else None))
                              for i, q in enumerate(ps)], reps=10)
            except Exception as ex:  # noqa: BLE001
                print("FAIL", k, n, var, lay, cfg, str(ex)[:600], flush=True)
                continue
            res.append(dict(variant=var, layout=lay, cfg=cfg, us=t, err=e))
            key = f"{var}-{lay}"
            if max(e.values()) < 2e-2 and (key not in best or t < best[key]["us"]):
                best[key] = res[-1]
        tlo = {}
        for bn in (128, 256):
            tlo[bn] = graph_us([(lambda q=q, tp=tp: tiled_call("load_tiled", x, tp, q, dict(base, block_n=bn,
                                                                                          num_warps=8, waves=8)))
                                for q, tp in zip(ps, tiled[bn])], reps=10)
        line.update(h2=res, best=best, tiled_load_only_us=tlo, prep_us=prep_us)
        rows.append(line)
        for key, bst in best.items():
            print(f"   {key:12s} {bst['us']:6.1f} us ({wbytes / bst['us'] / 1e3:.0f} GB/s) {bst['cfg']} err {bst['err']}",
                  flush=True)
        print(f"   tiled load-only {tlo}; h2 prep {prep_us:.1f} us", flush=True)
        del ps, tiled
        torch.cuda.empty_cache()
        (out_dir / "w4_h2.json").write_text(json.dumps(dict(copy_gbs=copy_gbs, gpu=torch.cuda.get_device_name(),
                                                            rows=rows), indent=1))


if __name__ == "__main__":
    {"dot-sweep": dot_sweep, "swap-sweep": swap_sweep, "tiled-sweep": tiled_sweep, "h2-sweep": h2_sweep}.get(sys.argv[1] if sys.argv[1:] else "", main)()
