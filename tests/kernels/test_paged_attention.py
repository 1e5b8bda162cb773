import math

import pytest
import torch
import torch.nn.functional as F

from dllm.kernels.paged_attention import paged_decode_attention, paged_decode_attention_ref
from tests.kernels import assert_close, make_paged_kv, to_dev

# (n_heads, n_kv, head_dim, block_size, context_lens): GQA 3/7/1/8/4/5, odd head counts,
# partial last blocks, block_size 16/32 and 5, seqs of different lengths
CASES = [
    (9, 3, 64, 16, [1, 17, 40]),
    (14, 2, 128, 32, [33, 5, 64]),
    (5, 5, 32, 16, [16, 31]),
    (8, 1, 64, 16, [100]),
    (8, 2, 128, 5, [12, 3, 26]),
    (40, 8, 128, 16, [70]),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _setup(n_heads, n_kv, hd, bs, ctx, dtype, seed=0):
    kd, vd, kc, vc, bt, cl = make_paged_kv(ctx, n_kv, hd, bs, dtype, seed=seed)
    q = torch.randn(len(ctx), n_heads, hd, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    return kd, vd, *to_dev(q, kc, vc, bt, cl)


@pytest.mark.triton
@pytest.mark.parametrize("splits", [None, 3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_heads,n_kv,hd,bs,ctx", CASES)
def test_paged_decode_matches_ref(n_heads, n_kv, hd, bs, ctx, dtype, splits):
    _, _, q, kc, vc, bt, cl = _setup(n_heads, n_kv, hd, bs, ctx, dtype)
    out = paged_decode_attention(q, kc, vc, bt, cl, num_splits=splits)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, paged_decode_attention_ref(q, kc, vc, bt, cl))


@pytest.mark.triton
def test_paged_decode_split_plan_and_bounds():
    # auto plan with a tight max_context_len, an explicit scale, a strided q
    _, _, q, kc, vc, bt, cl = _setup(8, 2, 64, 16, [300, 7, 129], torch.float32)
    qs = torch.cat([q, q], dim=-1)[..., :64]  # token stride 2*64*heads
    ref = paged_decode_attention_ref(q, kc, vc, bt, cl, scale=0.3)
    for kw in ({}, {"max_context_len": 300}, {"num_splits": 5}, {"num_splits": 1}):
        assert_close(paged_decode_attention(qs, kc, vc, bt, cl, scale=0.3, **kw), ref)


@pytest.mark.triton
def test_paged_decode_empty_seq_gives_zeros():
    _, _, q, kc, vc, bt, cl = _setup(4, 2, 32, 16, [9, 1], torch.float32)
    cl[1] = 0  # a padding slot in a captured batch
    for splits in (1, 2):
        out = paged_decode_attention(q, kc, vc, bt, cl, num_splits=splits)
        assert torch.all(out[1] == 0)
        assert_close(out, paged_decode_attention_ref(q, kc, vc, bt, cl))


def test_paged_decode_rejects_bad_layout():
    _, _, q, kc, vc, bt, cl = _setup(6, 4, 32, 16, [5], torch.float32)
    with pytest.raises(ValueError, match="multiple of n_kv"):
        paged_decode_attention(q, kc, vc, bt, cl)
    _, _, q, kc, vc, bt, cl = _setup(8, 4, 32, 16, [5], torch.float32)
    with pytest.raises(ValueError, match="int32"):
        paged_decode_attention(q, kc, vc, bt.long(), cl)


@pytest.mark.parametrize("n_heads,n_kv,hd,bs,ctx", CASES)
def test_ref_matches_dense_sdpa(n_heads, n_kv, hd, bs, ctx):
    kd, vd, q, kc, vc, bt, cl = _setup(n_heads, n_kv, hd, bs, ctx, torch.float32)
    ref = paged_decode_attention_ref(q, kc, vc, bt, cl)
    for s in range(len(ctx)):
        qs = q[s].cpu()[None, :, None, :]  # [1, H, 1, hd]
        k = kd[s].transpose(0, 1)[None]  # [1, n_kv, ctx, hd]
        v = vd[s].transpose(0, 1)[None]
        dense = F.scaled_dot_product_attention(qs, k, v, scale=1 / math.sqrt(hd), enable_gqa=True)
        assert_close(ref[s].cpu(), dense[0, :, 0])
