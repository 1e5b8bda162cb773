import pytest
import torch

from kernels.rope import rope, rope_cache, rope_ref
from tests.kernels import DEVICE, assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (T, n_heads, n_kv, head_dim): odd head counts, GQA 1/3/7, head_dim 32/64/128 and 80
CASES = [(5, 9, 3, 64), (17, 14, 2, 128), (3, 5, 5, 32), (4, 7, 1, 80)]


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _hf_rope(x, cos_half, sin_half, positions):
    """HF apply_rotary_pos_emb on [T, heads, hd] (fp32), independent of rope_ref."""
    cos = torch.cat([cos_half, cos_half], dim=-1)[positions][:, None, :]
    sin = torch.cat([sin_half, sin_half], dim=-1)[positions][:, None, :]
    return x.float() * cos + _rotate_half(x.float()) * sin


def _inputs(T, nh, nkv, hd, dtype, seed=0, max_pos=50):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, nh, hd, generator=g).to(dtype)
    k = torch.randn(T, nkv, hd, generator=g).to(dtype)
    pos = torch.randint(0, max_pos, (T,), generator=g)  # arbitrary order, repeats allowed
    cos, sin = rope_cache(max_pos, hd)
    return [t.to(DEVICE) for t in (q, k, pos, cos, sin)]


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,nh,nkv,hd", CASES)
def test_rope_matches_ref(T, nh, nkv, hd, dtype):
    q, k, pos, cos, sin = _inputs(T, nh, nkv, hd, dtype)
    q_ref, k_ref = rope_ref(q, k, pos, cos, sin)
    q_out, k_out = rope(q, k, pos, cos, sin)
    assert q_out is q and k_out is k  # in place
    assert_close(q, q_ref)
    assert_close(k, k_ref)


@pytest.mark.triton
def test_rope_on_views_of_fused_qkv():
    # q and k as strided views of one [T, (nh + 2 nkv) * hd] qkv buffer; v must not change
    T, nh, nkv, hd = 6, 9, 3, 64
    qkv = torch.randn(T, (nh + 2 * nkv) * hd, device=DEVICE)
    before = qkv.clone()
    q = qkv[:, : nh * hd].view(T, nh, hd)
    k = qkv[:, nh * hd : (nh + nkv) * hd].view(T, nkv, hd)
    pos = torch.tensor([0, 5, 5, 2, 9, 1], device=DEVICE)
    cos, sin = (t.to(DEVICE) for t in rope_cache(16, hd))
    q_ref, k_ref = rope_ref(q, k, pos, cos, sin)
    rope(q, k, pos, cos, sin)
    assert_close(q, q_ref)
    assert_close(k, k_ref)
    torch.testing.assert_close(qkv[:, (nh + nkv) * hd :], before[:, (nh + nkv) * hd :], atol=0, rtol=0)


@pytest.mark.triton
def test_rope_partial_rotary():
    q, k, pos, _, _ = _inputs(5, 4, 2, 64, torch.float32)
    cos, sin = (t.to(DEVICE) for t in rope_cache(50, 32))  # rotate the first 32 dims only
    q0 = q.clone()
    q_ref, k_ref = rope_ref(q, k, pos, cos, sin)
    rope(q, k, pos, cos, sin)
    assert_close(q, q_ref)
    assert_close(k, k_ref)
    torch.testing.assert_close(q[..., 32:], q0[..., 32:], atol=0, rtol=0)


def test_rope_bad_shapes():
    q, k, pos, cos, sin = _inputs(3, 4, 2, 32, torch.float32)
    with pytest.raises(ValueError, match="positions"):
        rope_ref(q, k, pos[:2], cos, sin)
    with pytest.raises(ValueError, match="cache length"):
        rope_ref(q, k, pos + 100, cos, sin)


@pytest.mark.parametrize("hd", [32, 64, 128])
def test_ref_matches_hf_rotate_half(hd):
    q, k, pos, cos, sin = _inputs(7, 5, 1, hd, torch.float32, seed=3)
    q_ref, k_ref = rope_ref(q, k, pos, cos, sin)
    assert_close(q_ref, _hf_rope(q, cos, sin, pos))
    assert_close(k_ref, _hf_rope(k, cos, sin, pos))
    # position 0 is the identity
    zero = torch.zeros_like(pos)
    assert_close(rope_ref(q, k, zero, cos, sin)[0], q)
