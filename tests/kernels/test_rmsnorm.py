import pytest
import torch

from dllm.kernels.rmsnorm import add_rmsnorm, add_rmsnorm_ref, rmsnorm, rmsnorm_ref
from tests.kernels import DEVICE, assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 64), (7, 300), (33, 1000), (3, 5120)]


def _inputs(T, H, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    r = torch.randn(T, H, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(H, generator=g)).to(dtype)
    return x.to(DEVICE), r.to(DEVICE), w.to(DEVICE)


def _hf_rmsnorm(x, w, eps):
    """Qwen2RMSNorm.forward, copied (independent of rmsnorm_ref)."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return w * h.to(input_dtype)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H", SHAPES)
def test_rmsnorm_matches_ref(T, H, dtype):
    x, _, w = _inputs(T, H, dtype)
    assert_close(rmsnorm(x, w, 1e-6), rmsnorm_ref(x, w, 1e-6))


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H", SHAPES)
def test_add_rmsnorm_matches_ref(T, H, dtype):
    x, r, w = _inputs(T, H, dtype)
    x0, r0 = x.clone(), r.clone()
    y, new_r = add_rmsnorm(x, r, w, 1e-5)
    y_ref, new_r_ref = add_rmsnorm_ref(x, r, w, 1e-5)
    if DEVICE == "cuda" or dtype != torch.bfloat16:
        torch.testing.assert_close(new_r, new_r_ref, atol=0, rtol=0)  # one rounding of x + r: exact
    else:  # triton's interpreter truncates fp32 -> bf16 instead of rounding to nearest
        assert_close(new_r, new_r_ref)
    assert_close(y, y_ref)
    assert torch.equal(x, x0) and torch.equal(r, r0)  # inputs untouched


@pytest.mark.triton
def test_rmsnorm_strided_rows_and_3d():
    # q-norm style [T, heads, head_dim] input, and rows that are a strided view
    x, _, _ = _inputs(6, 9 * 64, torch.bfloat16)
    w = torch.rand(64, device=DEVICE).to(torch.bfloat16)
    x3 = x.view(6, 9, 64)
    assert_close(rmsnorm(x3, w), rmsnorm_ref(x3, w))
    big = torch.randn(5, 400, device=DEVICE)
    view = big[:, 50:350]  # row stride 400
    w2 = torch.randn(300, device=DEVICE)
    assert_close(rmsnorm(view, w2), rmsnorm_ref(view, w2))


@pytest.mark.triton
def test_rmsnorm_empty_and_bad_weight():
    w = torch.ones(64, device=DEVICE)
    assert rmsnorm(torch.empty(0, 64, device=DEVICE), w).shape == (0, 64)
    with pytest.raises(ValueError, match="weight shape"):
        rmsnorm(torch.randn(2, 64, device=DEVICE), torch.ones(65, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES)
def test_ref_matches_hf_module(dtype):
    x, r, w = _inputs(9, 256, dtype, seed=1)
    torch.testing.assert_close(rmsnorm_ref(x, w, 1e-6), _hf_rmsnorm(x, w, 1e-6), atol=1e-6, rtol=1e-6)
    y, new_r = add_rmsnorm_ref(x, r, w, 1e-6)
    torch.testing.assert_close(new_r, x + r, atol=0, rtol=0)
    torch.testing.assert_close(y, _hf_rmsnorm(x + r, w, 1e-6), atol=1e-6, rtol=1e-6)
