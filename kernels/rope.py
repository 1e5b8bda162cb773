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
"""

from __future__ import annotations

import torch

from .utils import check_last_dim_contiguous, next_power_of_2, require_triton, tl, triton


@triton.jit
def _rope_rotate(x_ptr, t, stride_t, stride_h, n_heads, cos, sin,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    # Rotates all heads of token t: a [BLOCK_H, BLOCK_D] tile of each half.
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h < n_heads)[:, None] & (d < HALF)[None, :]
    ptr = x_ptr + t * stride_t + h[:, None] * stride_h + d[None, :]
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    out_ty = x_ptr.dtype.element_ty
    tl.store(ptr, (x1 * cos[None, :] - x2 * sin[None, :]).to(out_ty), mask=mask)
    tl.store(ptr + HALF, (x2 * cos[None, :] + x1 * sin[None, :]).to(out_ty), mask=mask)


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
    d = tl.arange(0, BLOCK_D)
    cos = tl.load(cos_ptr + pos * cos_stride + d, mask=d < HALF, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * cos_stride + d, mask=d < HALF, other=0.0).to(tl.float32)
    _rope_rotate(q_ptr, t, q_stride_t, q_stride_h, n_q_heads, cos, sin, HALF, BLOCK_QH, BLOCK_D)
    _rope_rotate(k_ptr, t, k_stride_t, k_stride_h, n_k_heads, cos, sin, HALF, BLOCK_KH, BLOCK_D)


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
