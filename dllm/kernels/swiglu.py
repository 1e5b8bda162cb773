"""SwiGLU activation on the fused gate_up projection.

gate_up [T, 2*I] (gate = [:, :I], up = [:, I:], the output of one fused matmul with
weights [2*I, H]) -> silu(gate) * up [T, I], new tensor of the input dtype.
Fusing saves the [T, I] silu(gate) intermediate: one read of [T, 2I] and one write of
[T, I] instead of three passes. Math in fp32 with one rounding at the end (HF rounds
silu(gate) to the model dtype before the multiply; the difference is <= 1 ulp).
"""

from __future__ import annotations

import torch

from .utils import cdiv, check_last_dim_contiguous, require_triton, tl, triton

_BLOCK = 1024


@triton.jit
def _swiglu_kernel(x_ptr, y_ptr, x_stride, y_stride, I, BLOCK: tl.constexpr):
    # grid (T, cdiv(I, BLOCK)): program (t, c) produces y[t, c*BLOCK : (c+1)*BLOCK].
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    row = x_ptr + t * x_stride
    g = tl.load(row + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(row + I + cols, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(y_ptr + t * y_stride + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2*I] -> silu(gate_up[:, :I]) * gate_up[:, I:]  [T, I]."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must be [T, 2*I], got {tuple(gate_up.shape)}")
    require_triton(gate_up)
    check_last_dim_contiguous(gate_up, "gate_up")
    T, I = gate_up.shape[0], gate_up.shape[1] // 2
    y = torch.empty((T, I), dtype=gate_up.dtype, device=gate_up.device)
    if T and I:
        _swiglu_kernel[(T, cdiv(I, _BLOCK))](gate_up, y, gate_up.stride(0), y.stride(0), I,
                                            BLOCK=_BLOCK, num_warps=4)
    return y


def swiglu_ref(gate_up: torch.Tensor) -> torch.Tensor:
    I = gate_up.shape[-1] // 2
    g, u = gate_up[..., :I].float(), gate_up[..., I:].float()
    return (torch.nn.functional.silu(g) * u).to(gate_up.dtype)
