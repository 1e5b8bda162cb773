import pytest
import torch

from dllm.kernels.w4a16_matmul import (
    W4Packed, dequantize_w4_ref, quantize_w4, unpack_w4_ref, w4a16_matmul, w4a16_matmul_ref,
)
from tests.kernels import DEVICE, assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _weight(n_out, n_in, dtype, seed=0):
    return (torch.randn(n_out, n_in, generator=torch.Generator().manual_seed(seed)) * 0.05).to(dtype)


def test_quantize_rejects_ragged_in_features():
    with pytest.raises(ValueError, match="not a multiple of the group size 128"):
        quantize_w4(torch.randn(8, 200))
    with pytest.raises(ValueError, match=r"\[out, in\]"):
        quantize_w4(torch.randn(128))


def test_packing_layout_by_hand():
    # k = 128 g + 16 i + r  ->  nibble i of qweight[16 g + r, n]; Python ints, no torch shifts
    w = _weight(3, 256, torch.float16)
    p = quantize_w4(w)
    assert p.qweight.shape == (32, 3) and p.qweight.dtype == torch.int32
    assert p.scales.shape == (2, 3) and p.zeros.shape == (2, 3) and p.zeros.dtype == torch.uint8
    codes = unpack_w4_ref(p)
    for n in range(3):
        for k in range(256):
            g, i, r = k // 128, (k % 128) // 16, k % 16
            s, z = float(p.scales[g, n]), int(p.zeros[g, n])
            word = int(p.qweight[16 * g + r, n]) & 0xFFFFFFFF
            nib = (word >> (4 * i)) & 0xF
            assert nib == int(codes[n, k])
            assert nib == max(0, min(15, round(float(w[n, k]) / s) + z))
            assert float(dequantize_w4_ref(p, torch.float32)[n, k]) == (nib - z) * s


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequant_error_and_exact_grid(dtype):
    w = _weight(40, 384, dtype)
    p = quantize_w4(w)
    assert p.scales.dtype == dtype
    err = (dequantize_w4_ref(p).float() - w.float()).abs()
    bound = p.scales.t().float().repeat_interleave(128, dim=1)  # half a step + zero rounding
    assert torch.all(err <= bound * 1.01 + 1e-6)


def test_ref_matmul_matches_dense():
    w0 = _weight(24, 256, torch.float32)
    p = quantize_w4(w0)
    x = torch.randn(5, 256)
    assert_close(w4a16_matmul_ref(x, p), x @ dequantize_w4_ref(p).t())
    # and stays within quantisation noise of the unquantised product
    exact = x @ w0.t()
    rel = (w4a16_matmul_ref(x, p) - exact).norm() / exact.norm()
    assert rel < 0.15, f"int4 relative error {rel:.3f}"  # 4-bit: ~0.1 expected


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 3, 16, 17, 40, 64, 70])
def test_w4a16_matches_ref(M, dtype):
    n_out, n_in = 100, 384  # n_out not a multiple of the 64-wide tile
    p = quantize_w4(_weight(n_out, n_in, dtype)).to(DEVICE)
    x = torch.randn(M, n_in, generator=torch.Generator().manual_seed(M)).to(dtype).to(DEVICE)
    ref = w4a16_matmul_ref(x, p)
    for split_k in (None, 1, 2):
        assert_close(w4a16_matmul(x, p, split_k=split_k), ref)
    # split-K reduced by a second kernel instead of the last program of each tile
    assert_close(w4a16_matmul(x, p, split_k=3, config={"locks": False}), ref)
    assert int(p.locks.abs().sum()) == 0, "every tile's last program must reset its counter"
    if M == 1:  # M == 1 normally takes the CUDA-core GEMV kernel; check the tl.dot path too
        assert_close(w4a16_matmul(x, p, config={"gemv": False}), ref)
        for split_k in (1, 2):  # and the fp16x2 GEMV (H2; interpreter: its plain-Triton twin)
            assert_close(w4a16_matmul(x, p, split_k=split_k, config={"h2": True}), ref)


@pytest.mark.triton
@pytest.mark.parametrize("M", [2, 16])
@pytest.mark.parametrize("n_out,n_in", [(520, 128), (100, 512)])
def test_w4a16_wide_and_tall_tiles(M, n_out, n_in):
    # up to 16 rows, a wide matrix (out >= 4 in) and a tall one (in >= 4 out) take 256-wide
    # tiles (kernels/w4a16_matmul.py _plan); partial last tiles both
    p = quantize_w4(_weight(n_out, n_in, torch.bfloat16)).to(DEVICE)
    x = torch.randn(M, n_in, generator=torch.Generator().manual_seed(M)).to(torch.bfloat16).to(DEVICE)
    ref = w4a16_matmul_ref(x, p)
    for split_k in (None, 1, 3):
        assert_close(w4a16_matmul(x, p, split_k=split_k), ref)


@pytest.mark.triton
@pytest.mark.parametrize("M", [1, 5])
def test_w4a16_small_groups(M):
    # group 32: too small for tl.dot's K >= 16 on GPU, so every row takes the GEMV kernel
    p = quantize_w4(_weight(40, 96, torch.bfloat16), group=32).to(DEVICE)
    x = torch.randn(M, 96, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).to(DEVICE)
    assert_close(w4a16_matmul(x, p), w4a16_matmul_ref(x, p))
    assert_close(w4a16_matmul(x, p, split_k=3), w4a16_matmul_ref(x, p))
    assert_close(w4a16_matmul(x, p, split_k=3, config={"h2": "auto"}), w4a16_matmul_ref(x, p))


@pytest.mark.triton
@pytest.mark.parametrize("kind", ["unit", "tiny", "huge", "outliers"])
def test_w4_gemv_fp16x2_sums_stay_accurate(kind):
    # The H2 GEMV (fp16x2 FMAs on x scaled by a power of two per program) against the exact
    # product, in fp16 (11-bit outputs, finer than the bf16 it serves): a wrong scale shows as
    # inf/0 or a large error; x of 1e-5 or 300 or with 100x channels must not matter.
    g = torch.Generator().manual_seed(7)
    p = quantize_w4(_weight(72, 1024, torch.float16)).to(DEVICE)
    x = torch.randn(1, 1024, generator=g)
    if kind == "outliers":
        x[0, torch.randperm(1024, generator=g)[:4]] *= 100.0
    else:
        x *= {"unit": 1.0, "tiny": 1e-5, "huge": 300.0}[kind]
    x = x.to(torch.float16).to(DEVICE)
    exact = x.double() @ dequantize_w4_ref(p, torch.float64).t()
    for split_k in (1, 3):
        got = w4a16_matmul(x, p, split_k=split_k, config={"h2": True}).double()
        err = ((got - exact).abs().max() / exact.abs().max()).item()
        assert err < 3e-3, f"{kind}, split {split_k}: relative error {err:.2e}"


@pytest.mark.triton
def test_w4a16_strided_x_and_bad_shape():
    p = quantize_w4(_weight(64, 256, torch.float16)).to(DEVICE)
    x = torch.randn(4, 512, device=DEVICE).to(torch.float16)[:, :256]  # row stride 512
    assert_close(w4a16_matmul(x, p), w4a16_matmul_ref(x, p))
    assert w4a16_matmul(x[:0], p).shape == (0, 64)
    with pytest.raises(ValueError, match=r"\[M, 256\]"):
        w4a16_matmul(torch.randn(2, 128, device=DEVICE), p)


def test_packed_struct_fields():
    p = quantize_w4(_weight(16, 256, torch.bfloat16))
    assert isinstance(p, W4Packed) and p.shape == (16, 256) and p.group == 128
    assert (p.out_features, p.in_features) == (16, 256)
    assert int(p.zeros.max()) <= 15
