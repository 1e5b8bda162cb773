import pytest
import torch

from dllm.kernels.swiglu import swiglu, swiglu_ref
from tests.kernels import DEVICE, assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,I", [(1, 8), (7, 1000), (5, 1500), (3, 2049)])
def test_swiglu_matches_ref(T, I, dtype):
    x = (torch.randn(T, 2 * I) * 3).to(dtype).to(DEVICE)
    assert_close(swiglu(x), swiglu_ref(x))


@pytest.mark.triton
def test_swiglu_strided_rows_and_errors():
    big = torch.randn(4, 300, device=DEVICE)
    view = big[:, :200]  # [4, 2*100] with row stride 300
    assert_close(swiglu(view), swiglu_ref(view))
    assert swiglu(torch.empty(0, 16, device=DEVICE)).shape == (0, 8)
    with pytest.raises(ValueError, match=r"\[T, 2\*I\]"):
        swiglu(torch.randn(3, 7, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES)
def test_ref_matches_plain_silu_mul(dtype):
    x = (torch.randn(6, 2 * 96) * 3).to(dtype)
    gate, up = x.chunk(2, dim=-1)
    plain = torch.nn.functional.silu(gate.float()) * up.float()  # fp32 oracle
    assert_close(swiglu_ref(x), plain.to(dtype))
    if dtype != torch.float32:  # HF's two roundings differ by at most an ulp or so
        assert_close(swiglu_ref(x), torch.nn.functional.silu(gate) * up, scale=2.0)
