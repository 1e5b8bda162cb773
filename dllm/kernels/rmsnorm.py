"""RMSNorm and fused residual-add + RMSNorm (HF llama/qwen2 semantics).

Shapes: x, residual [T, H] (any leading dims are flattened into T), weight [H].
HF computes in fp32, rounds the normalised x back to the input dtype, then multiplies
by the weight in that dtype. The kernel does exactly those roundings, so bf16 output
matches HF bit for bit up to rsqrt's last ulp. Output dtype = x.dtype.
"""

from __future__ import annotations

import torch

from .utils import calculate_settings, check_last_dim_contiguous, require_triton, tl, triton


@triton.jit
def _rmsnorm_kernel(
    x_ptr, r_ptr, w_ptr, y_ptr, res_out_ptr,
    x_stride, r_stride, y_stride, res_stride,
    H, eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # One program per row of H elements; the row sits in registers (H <= 65536).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * r_stride + cols, mask=mask, other=0.0).to(tl.float32)
        # HF adds in the model dtype: round the sum first, then normalise the rounded sum.
        s = (x + r).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * res_stride + cols, s, mask=mask)
        x = s.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / H + eps)
    xn = (x * rstd).to(y_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * y_stride + cols, (xn * w).to(y_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor, H: int, name: str) -> torch.Tensor:
    t2 = t.reshape(-1, H)
    check_last_dim_contiguous(t2, name)
    return t2


def _launch(x, residual, weight, eps):
    H = x.shape[-1]
    if weight.shape != (H,):
        raise ValueError(f"weight shape {tuple(weight.shape)} != ({H},)")
    require_triton(x, weight)
    x2 = _rows(x, H, "x")
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    r2 = res_out = None
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
        r2 = _rows(residual, H, "residual")
        res_out = torch.empty_like(y)
    if x2.shape[0] > 0:
        block, warps = calculate_settings(H)
        _rmsnorm_kernel[(x2.shape[0],)](
            x2, r2 if r2 is not None else x2, weight.contiguous(), y,
            res_out if res_out is not None else y,
            x2.stride(0), r2.stride(0) if r2 is not None else 0, y.stride(0),
            res_out.stride(0) if res_out is not None else 0,
            H, float(eps),
            HAS_RESIDUAL=residual is not None, BLOCK_H=block, num_warps=warps,
        )
    y = y.view(x.shape)
    return y, (res_out.view(x.shape) if res_out is not None else None)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x [T, H], weight [H] -> [T, H] (new tensor, dtype of x)."""
    return _launch(x, None, weight, eps)[0]


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """new_residual = x + residual; returns (rmsnorm(new_residual), new_residual).
    Both are new tensors [T, H]; inputs are not modified."""
    return _launch(x, residual, weight, eps)


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.float()
    xn = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * xn.to(x.dtype).float()).to(x.dtype)


def add_rmsnorm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                    eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    new_residual = (x.float() + residual.float()).to(x.dtype)
    return rmsnorm_ref(new_residual, weight, eps), new_residual
