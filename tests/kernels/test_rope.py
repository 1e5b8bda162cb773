import pytest
import torch

from dllm.kernels.rope import rope, rope_cache, rope_ref, rope_store_kv, rope_store_kv_ref
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


def _store_inputs(T, nh, nkv, hd, dtype, bias, rot_dim=None, seed=1):
    """Views of one fused qkv buffer, a paged cache with scattered slots, the fused bias."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(T, (nh + 2 * nkv) * hd, generator=g).to(dtype).to(DEVICE)
    q, k, v = (t.view(T, -1, hd) for t in qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1))
    blocks, bs = 7, 4
    k_cache = torch.randn(blocks, bs, nkv, hd, generator=g).to(dtype).to(DEVICE)
    v_cache = torch.randn(blocks, bs, nkv, hd, generator=g).to(dtype).to(DEVICE)
    slots = torch.randperm(blocks * bs, generator=g)[:T].to(DEVICE)  # arbitrary, not contiguous
    pos = torch.randint(0, 50, (T,), generator=g).to(DEVICE)
    cos, sin = (t.to(DEVICE) for t in rope_cache(50, rot_dim or hd))
    b = torch.randn((nh + 2 * nkv) * hd, generator=g).to(dtype).to(DEVICE) if bias else None
    return qkv, q, k, v, pos, cos, sin, k_cache, v_cache, slots, b


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("T,nh,nkv,hd", CASES)
def test_rope_store_kv_matches_ref(T, nh, nkv, hd, dtype, bias):
    qkv, q, k, v, pos, cos, sin, kc, vc, slots, b = _store_inputs(T, nh, nkv, hd, dtype, bias)
    kv_cols = qkv[:, nh * hd:].clone()
    q_ref, kc_ref, vc_ref = q.clone(), kc.clone(), vc.clone()
    rope_store_kv_ref(q_ref, k, v, pos, cos, sin, kc_ref, vc_ref, slots, b)
    assert rope_store_kv(q, k, v, pos, cos, sin, kc, vc, slots, b) is q
    assert_close(q, q_ref)
    assert_close(kc, kc_ref)
    assert_close(vc, vc_ref)
    # k and v columns of qkv untouched; cache slots not written keep their values
    torch.testing.assert_close(qkv[:, nh * hd:], kv_cols, atol=0, rtol=0)


@pytest.mark.triton
def test_rope_store_kv_partial_rotary_with_bias():
    T, nh, nkv, hd = 5, 4, 2, 64
    qkv, q, k, v, pos, cos, sin, kc, vc, slots, b = _store_inputs(T, nh, nkv, hd, torch.float32, True, rot_dim=32)
    q_ref, kc_ref, vc_ref = q.clone(), kc.clone(), vc.clone()
    rope_store_kv_ref(q_ref, k, v, pos, cos, sin, kc_ref, vc_ref, slots, b)
    rope_store_kv(q, k, v, pos, cos, sin, kc, vc, slots, b)
    assert_close(q, q_ref)
    assert_close(kc, kc_ref)
    assert_close(vc, vc_ref)


def test_rope_store_kv_ref_is_rope_then_store():
    # the reference against the two ops it fuses: bias add, rope_ref, index_copy into the cache
    T, nh, nkv, hd = 6, 6, 2, 32
    qkv, q, k, v, pos, cos, sin, kc, vc, slots, b = _store_inputs(T, nh, nkv, hd, torch.float32, True)
    qb, kb, vb = b.split([nh * hd, nkv * hd, nkv * hd])
    q_exp, k_exp = rope_ref(q + qb.view(nh, hd), k + kb.view(nkv, hd), pos, cos, sin)
    kc_exp, vc_exp = kc.clone(), vc.clone()
    for i, s in enumerate(slots.tolist()):
        kc_exp.view(-1, nkv, hd)[s] = k_exp[i]
        vc_exp.view(-1, nkv, hd)[s] = v[i] + vb.view(nkv, hd)
    rope_store_kv_ref(q, k, v, pos, cos, sin, kc, vc, slots, b)
    assert_close(q, q_exp)
    assert_close(kc, kc_exp)
    assert_close(vc, vc_exp)


def test_rope_store_kv_bad_shapes():
    qkv, q, k, v, pos, cos, sin, kc, vc, slots, b = _store_inputs(3, 4, 2, 32, torch.float32, True)
    with pytest.raises(ValueError, match="slots"):
        rope_store_kv_ref(q, k, v, pos, cos, sin, kc, vc, slots[:2], b)
    with pytest.raises(ValueError, match="bias"):
        rope_store_kv_ref(q, k, v, pos, cos, sin, kc, vc, slots, b[:-1])
    with pytest.raises(ValueError, match="cache"):
        rope_store_kv_ref(q, k, v, pos, cos, sin, kc[..., :16], vc[..., :16], slots, b)
