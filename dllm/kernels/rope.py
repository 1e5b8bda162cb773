"""Rotary position embedding, HF "rotate_half" (neox) layout, applied IN PLACE.

Shapes and strides:
  q         [T, n_heads, head_dim]   any token/head strides, last dim contiguous
                                      (a view into the fused qkv output works)
  k         [T, n_kv, head_dim]       same rules
  positions [T] int64                 arbitrary order and gaps (tree verification uses
                                      depth-based positions, so siblings share one)
  cos, sin  [max_pos, rot_dim // 2] fp32, rot_dim = 2 * cos.shape[1] <= head_dim
With x1 = x[..., :rot/2], x2 = x[..., rot/2:rot]:  x1' = x1 cos - x2 sin,
x2' = x2 cos + x1 sin; dims past rot_dim (partial rotary) are left alone.
Math is fp32 with one rounding to the input dtype (HF rounds cos/sin to bf16 first,
so bf16 results differ from HF by ~1 ulp).

`rope_store_kv` is the same rotation fused with what surrounds it in an attention layer:
the qkv bias add before it and the paged-cache write after it (q rotated in place; rotated k
and v written to their cache slots, their qkv columns left as they were). On the 32B shape's
decode step the separate bias add and two index_copy launches cost ~6 us a layer on an H200,
more than the rotation itself.
"""

from __future__ import annotations

import torch

from .utils import check_last_dim_contiguous, next_power_of_2, require_triton, tl, triton


@triton.jit
def _cos_sin_row(cos_ptr, sin_ptr, pos, cos_stride, HALF: tl.constexpr, BLOCK_D: tl.constexpr):
    d = tl.arange(0, BLOCK_D)
    cos = tl.load(cos_ptr + pos * cos_stride + d, mask=d < HALF, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * cos_stride + d, mask=d < HALF, other=0.0).to(tl.float32)
    return cos, sin


@triton.jit
def _rope_tile(src_ptr, dst_ptr, bias_ptr, src_off, dst_off, stride_h, dst_stride_h, n_heads, cos, sin,
               HAS_BIAS: tl.constexpr, HALF: tl.constexpr, REST: tl.constexpr,
               BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    # dst <- rotate(src + bias) for all heads of one token; the REST dims past 2*HALF are copied.
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h < n_heads)[:, None] & (d < HALF)[None, :]
    src = src_ptr + src_off + h[:, None] * stride_h + d[None, :]
    dst = dst_ptr + dst_off + h[:, None] * dst_stride_h + d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = bias_ptr + h[:, None] * (2 * HALF + REST) + d[None, :]
        x1 += tl.load(bias, mask=mask, other=0.0).to(tl.float32)
        x2 += tl.load(bias + HALF, mask=mask, other=0.0).to(tl.float32)
    out_ty = dst_ptr.dtype.element_ty
    tl.store(dst, (x1 * cos[None, :] - x2 * sin[None, :]).to(out_ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos[None, :] + x1 * sin[None, :]).to(out_ty), mask=mask)
    if REST > 0:
        _bias_copy(src_ptr, dst_ptr, bias_ptr, src_off + 2 * HALF, dst_off + 2 * HALF, stride_h, dst_stride_h,
                   2 * HALF + REST, n_heads, HAS_BIAS, REST, BLOCK_H, BLOCK_R)


@triton.jit
def _bias_copy(src_ptr, dst_ptr, bias_ptr, src_off, dst_off, stride_h, dst_stride_h, bias_stride_h, n_heads,
               HAS_BIAS: tl.constexpr, WIDTH: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    # dst <- src + bias over [n_heads, WIDTH] of one token. The window is the last WIDTH columns of
    # each head (all of them for v, the unrotated tail for partial rotary), so its bias is the last
    # WIDTH of each bias_stride_h-wide head.
    h = tl.arange(0, BLOCK_H)
    w = tl.arange(0, BLOCK_W)
    mask = (h < n_heads)[:, None] & (w < WIDTH)[None, :]
    x = tl.load(src_ptr + src_off + h[:, None] * stride_h + w[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(bias_ptr + (bias_stride_h - WIDTH) + h[:, None] * bias_stride_h + w[None, :],
                     mask=mask, other=0.0).to(tl.float32)
    tl.store(dst_ptr + dst_off + h[:, None] * dst_stride_h + w[None, :], x.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr,
    q_stride_t, q_stride_h, k_stride_t, k_stride_h, cos_stride,
    n_q_heads, n_k_heads,
    HALF: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per token: cos/sin row read once, used for every q and k head.
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cos, sin = _cos_sin_row(cos_ptr, sin_ptr, pos, cos_stride, HALF, BLOCK_D)
    # in place (src = dst), no bias; dims past 2*HALF are left alone (REST = 0)
    _rope_tile(q_ptr, q_ptr, q_ptr, t * q_stride_t, t * q_stride_t, q_stride_h, q_stride_h, n_q_heads, cos, sin,
               False, HALF, 0, BLOCK_QH, BLOCK_D, 1)
    _rope_tile(k_ptr, k_ptr, k_ptr, t * k_stride_t, t * k_stride_t, k_stride_h, k_stride_h, n_k_heads, cos, sin,
               False, HALF, 0, BLOCK_KH, BLOCK_D, 1)


@triton.jit
def _rope_store_kv_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr, kc_ptr, vc_ptr, qb_ptr, kb_ptr, vb_ptr,
    q_stride_t, q_stride_h, k_stride_t, k_stride_h, v_stride_t, v_stride_h, cos_stride,
    c_stride_s, c_stride_h, n_q_heads, n_k_heads,
    HAS_BIAS: tl.constexpr, HALF: tl.constexpr, REST: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_HD: tl.constexpr,
):
    # One program per token: q rotated in place, rotated k and v written to the token's cache slot.
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    cos, sin = _cos_sin_row(cos_ptr, sin_ptr, pos, cos_stride, HALF, BLOCK_D)
    _rope_tile(q_ptr, q_ptr, qb_ptr, t * q_stride_t, t * q_stride_t, q_stride_h, q_stride_h, n_q_heads, cos, sin,
               HAS_BIAS, HALF, REST, BLOCK_QH, BLOCK_D, BLOCK_R)
    _rope_tile(k_ptr, kc_ptr, kb_ptr, t * k_stride_t, slot * c_stride_s, k_stride_h, c_stride_h, n_k_heads,
               cos, sin, HAS_BIAS, HALF, REST, BLOCK_KH, BLOCK_D, BLOCK_R)
    _bias_copy(v_ptr, vc_ptr, vb_ptr, t * v_stride_t, slot * c_stride_s, v_stride_h, c_stride_h, HEAD_DIM,
               n_k_heads, HAS_BIAS, HEAD_DIM, BLOCK_KH, BLOCK_HD)


def _check(q, k, positions, cos, sin):
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} / k {tuple(k.shape)} must be [T, heads, head_dim]")
    if positions.shape != (q.shape[0],):
        raise ValueError(f"positions shape {tuple(positions.shape)} != ({q.shape[0]},)")
    if cos.shape != sin.shape or cos.dim() != 2 or 2 * cos.shape[1] > q.shape[2]:
        raise ValueError(f"cos/sin {tuple(cos.shape)} must be [max_pos, rot_dim//2], rot_dim <= {q.shape[2]}")


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
         cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, n_heads, hd] and k [T, n_kv, hd] IN PLACE; returns (q, k).
    positions [T] int; cos/sin [max_pos, rot_dim//2]. Positions must be < max_pos."""
    _check(q, k, positions, cos, sin)
    require_triton(q, k, positions, cos)
    check_last_dim_contiguous(q, "q")
    check_last_dim_contiguous(k, "k")
    cos, sin = cos.contiguous(), sin.contiguous()
    T, half = q.shape[0], cos.shape[1]
    if T == 0:
        return q, k
    block_qh, block_kh = next_power_of_2(q.shape[1]), next_power_of_2(k.shape[1])
    block_d = next_power_of_2(half)
    warps = 8 if block_qh * block_d >= 4096 else 4
    _rope_kernel[(T,)](
        q, k, positions.contiguous(), cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
        q.shape[1], k.shape[1],
        HALF=half, BLOCK_QH=block_qh, BLOCK_KH=block_kh, BLOCK_D=block_d, num_warps=warps,
    )
    return q, k


def rope_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slots: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Adds the qkv bias, rotates, and writes K/V to the paged cache, in one launch.

    q [T, n_heads, hd], k / v [T, n_kv, hd] (views of the fused qkv output work); bias: the
    fused [(n_heads + 2 n_kv) * hd] qkv bias or None; k_cache / v_cache [blocks, block_size,
    n_kv, hd]; slots [T] int flat cache slots (< blocks * block_size). q becomes
    rope(q + bq) in place (returned); k_cache[slot] = rope(k + bk), v_cache[slot] = v + bv;
    k and v themselves are not changed."""
    _check(q, k, positions, cos, sin)
    _check_store(q, k, v, k_cache, v_cache, slots, bias)
    require_triton(q, k, v, positions, cos, k_cache)
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        check_last_dim_contiguous(t, name)
    cos, sin = cos.contiguous(), sin.contiguous()
    T, nh, hd = q.shape
    nkv, half = k.shape[1], cos.shape[1]
    if T == 0:
        return q
    if bias is None:
        qb = kb = vb = q  # never read (HAS_BIAS is off)
    else:
        qb, kb, vb = bias.contiguous().split([nh * hd, nkv * hd, nkv * hd])
    kc, vc = k_cache.view(-1, nkv, hd), v_cache.view(-1, nkv, hd)
    block_d = next_power_of_2(half)
    warps = 8 if next_power_of_2(nh) * block_d >= 4096 else 4
    _rope_store_kv_kernel[(T,)](
        q, k, v, positions.contiguous(), cos, sin, slots.contiguous(), kc, vc, qb, kb, vb,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        kc.stride(0), kc.stride(1), nh, nkv,
        HAS_BIAS=bias is not None, HALF=half, REST=hd - 2 * half, HEAD_DIM=hd,
        BLOCK_QH=next_power_of_2(nh), BLOCK_KH=next_power_of_2(nkv), BLOCK_D=block_d,
        BLOCK_R=next_power_of_2(max(1, hd - 2 * half)), BLOCK_HD=next_power_of_2(hd), num_warps=warps,
    )
    return q


def _check_store(q, k, v, k_cache, v_cache, slots, bias):
    T, nh, hd = q.shape
    nkv = k.shape[1]
    if v.shape != k.shape:
        raise ValueError(f"v {tuple(v.shape)} must match k {tuple(k.shape)}")
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4 or tuple(k_cache.shape[2:]) != (nkv, hd):
        raise ValueError(f"k/v cache {tuple(k_cache.shape)} must be [blocks, block_size, {nkv}, {hd}]")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k/v cache must be contiguous")
    if slots.shape != (T,):
        raise ValueError(f"slots shape {tuple(slots.shape)} != ({T},)")
    if bias is not None and bias.shape != ((nh + 2 * nkv) * hd,):
        raise ValueError(f"bias shape {tuple(bias.shape)} != ({(nh + 2 * nkv) * hd},)")


def rope_store_kv_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                      cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slots: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """rope_store_kv in torch ops (same effects: q in place, the cache slots written)."""
    _check(q, k, positions, cos, sin)
    _check_store(q, k, v, k_cache, v_cache, slots, bias)
    T, nh, hd = q.shape
    nkv = k.shape[1]
    qf, kf, vf = q.float(), k.float(), v.float()
    if bias is not None:
        qb, kb, vb = bias.float().split([nh * hd, nkv * hd, nkv * hd])
        qf, kf, vf = qf + qb.view(nh, hd), kf + kb.view(nkv, hd), vf + vb.view(nkv, hd)
    q_rot, k_rot = rope_ref(qf, kf, positions, cos, sin)
    q.copy_(q_rot)
    k_cache.view(-1, nkv, hd).index_copy_(0, slots.long(), k_rot.to(k_cache.dtype))
    v_cache.view(-1, nkv, hd).index_copy_(0, slots.long(), vf.to(v_cache.dtype))
    return q


def _rope_one_ref(x: torch.Tensor, cos_t: torch.Tensor, sin_t: torch.Tensor) -> torch.Tensor:
    half = cos_t.shape[-1]
    xf = x.float()
    x1, x2, rest = xf[..., :half], xf[..., half:2 * half], xf[..., 2 * half:]
    c, s = cos_t[:, None, :], sin_t[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], dim=-1).to(x.dtype)


def rope_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
             cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns NEW rotated (q, k); inputs untouched."""
    _check(q, k, positions, cos, sin)
    pos = positions.long()
    if pos.numel() and int(pos.max()) >= cos.shape[0]:
        raise ValueError(f"position {int(pos.max())} >= cos/sin cache length {cos.shape[0]}")
    cos_t, sin_t = cos.float()[pos], sin.float()[pos]
    return _rope_one_ref(q, cos_t, sin_t), _rope_one_ref(k, cos_t, sin_t)


def rope_cache(max_pos: int, rot_dim: int, base: float = 10000.0,
               device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain (unscaled) cos/sin cache [max_pos, rot_dim // 2] fp32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64, device=device) / rot_dim))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float64, device=device), inv_freq)
    return freqs.cos().float(), freqs.sin().float()
