import math

import pytest
import torch
import torch.nn.functional as F

from dllm.kernels.tree_attention import pack_masks, tree_attention, tree_attention_ref
from tests.kernels import (
    ancestor_mask, assert_close, make_paged_kv, path_to_root, random_parents, to_dev,
)

# (n_heads, n_kv, head_dim, block_size, [(prefix_len, q_len) per seq], mask kind)
#   tree   : random parent arrays in topological order (parent index < child index)
#   perm   : the same trees with nodes relabelled in random order (not lower-triangular)
#   causal : a chain, i.e. the lower-triangular mask of a chunked prefill
CASES = [
    (9, 3, 64, 16, [(20, 4), (0, 7), (37, 1)], "tree"),
    (14, 2, 128, 32, [(50, 16)], "tree"),
    (5, 5, 32, 16, [(3, 5), (17, 12)], "perm"),
    (8, 1, 64, 5, [(13, 9), (0, 3)], "causal"),
    (10, 2, 128, 16, [(30, 64)], "tree"),  # Qwen2.5-32B group of 5, a 64-node tree
    (8, 2, 64, 16, [(10, 65), (2, 2)], "perm"),
]
IDS = [f"{c[0]}h{c[1]}kv-d{c[2]}-bs{c[3]}-{c[5]}-{len(c[4])}seq" for c in CASES]


def _parents(n, kind, g):
    if kind == "causal":
        return [i - 1 for i in range(n)]
    p = random_parents(n, g)
    if kind == "perm":  # relabel: new node k is old node order[k]
        order = torch.randperm(n, generator=g).tolist()
        new_of = {old: new for new, old in enumerate(order)}
        p = [-1 if p[old] < 0 else new_of[p[old]] for old in order]
    return p


def _setup(n_heads, n_kv, hd, bs, seqs, kind, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ctx = [pre + ql for pre, ql in seqs]
    kd, vd, kc, vc, bt, cl = make_paged_kv(ctx, n_kv, hd, bs, dtype, seed=seed)
    q_lens = [ql for _, ql in seqs]
    cu = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    q = torch.randn(int(cu[-1]), n_heads, hd, generator=g).to(dtype)
    parents = [_parents(ql, kind, g) for ql in q_lens]
    mask, moff = pack_masks([ancestor_mask(p) for p in parents])
    return kd, vd, parents, to_dev(q, kc, vc, bt, cl, cu, mask, moff)


@pytest.mark.triton
@pytest.mark.parametrize("splits", [None, 3])
@pytest.mark.parametrize("n_heads,n_kv,hd,bs,seqs,kind", CASES, ids=IDS)
def test_tree_attention_matches_ref(n_heads, n_kv, hd, bs, seqs, kind, splits):
    _, _, _, (q, kc, vc, bt, cl, cu, mask, moff) = _setup(n_heads, n_kv, hd, bs, seqs, kind)
    ref = tree_attention_ref(q, kc, vc, bt, cl, cu, mask, moff)
    out = tree_attention(q, kc, vc, bt, cl, cu, mask, moff, num_splits=splits)
    assert_close(out, ref)
    if kind != "perm":  # topologically ordered: the lower-triangular skip is exact
        assert_close(tree_attention(q, kc, vc, bt, cl, cu, mask.bool(), moff, num_splits=splits,
                                    lower_triangular=True), ref)
    if kind == "causal":  # mask=None builds the causal mask in the kernel
        assert_close(tree_attention(q, kc, vc, bt, cl, cu, num_splits=splits), ref)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[5]], ids=[IDS[0], IDS[3], IDS[5]])
def test_tree_attention_half_dtypes(case, dtype):
    n_heads, n_kv, hd, bs, seqs, kind = case
    _, _, _, (q, kc, vc, bt, cl, cu, mask, moff) = _setup(n_heads, n_kv, hd, bs, seqs, kind, dtype)
    ref = tree_attention_ref(q, kc, vc, bt, cl, cu, mask, moff)
    for splits in (None, 2):
        assert_close(tree_attention(q, kc, vc, bt, cl, cu, mask, moff, num_splits=splits), ref)


@pytest.mark.triton
def test_tree_attention_host_bounds_and_scale():
    _, _, _, (q, kc, vc, bt, cl, cu, mask, moff) = _setup(9, 3, 64, 16, CASES[0][4], "tree")
    ref = tree_attention_ref(q, kc, vc, bt, cl, cu, mask, moff, scale=0.2)
    out = tree_attention(q, kc, vc, bt, cl, cu, mask, moff, scale=0.2, max_q_len=7, max_context_len=38)
    assert_close(out, ref)


def test_tree_attention_rejects_bad_metadata():
    _, _, _, (q, kc, vc, bt, cl, cu, mask, moff) = _setup(9, 3, 64, 16, CASES[0][4], "tree")
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        tree_attention(q, kc, vc, bt, cl, cu.long(), mask, moff)
    with pytest.raises(ValueError, match="mask_offsets"):
        tree_attention(q, kc, vc, bt, cl, cu, mask, None)


@pytest.mark.parametrize("n_heads,n_kv,hd,bs,seqs,kind", CASES, ids=IDS)
def test_ref_matches_per_path_causal_attention(n_heads, n_kv, hd, bs, seqs, kind):
    # Each node attends exactly to prefix + its root-to-node path: run that path alone.
    kd, vd, parents, (q, kc, vc, bt, cl, cu, mask, moff) = _setup(n_heads, n_kv, hd, bs, seqs, kind)
    ref = tree_attention_ref(q, kc, vc, bt, cl, cu, mask, moff).cpu()
    q = q.cpu()
    for i, (pre, ql) in enumerate(seqs):
        for node in range(ql):
            path = path_to_root(parents[i], node)
            idx = list(range(pre)) + [pre + p for p in path]
            k = kd[i][idx].transpose(0, 1)[None]  # [1, n_kv, len, hd]
            v = vd[i][idx].transpose(0, 1)[None]
            qn = q[int(cu[i]) + node][None, :, None, :]  # the node is the last token of its path
            dense = F.scaled_dot_product_attention(qn, k, v, scale=1 / math.sqrt(hd), enable_gqa=True)
            assert_close(ref[int(cu[i]) + node], dense[0, :, 0])


def test_ref_causal_equals_sdpa_prefill():
    # prefix 0 + causal mask = ordinary causal prefill
    kd, vd, _, (q, kc, vc, bt, cl, cu, mask, moff) = _setup(8, 2, 32, 16, [(0, 11)], "causal")
    ref = tree_attention_ref(q, kc, vc, bt, cl, cu).cpu()
    dense = F.scaled_dot_product_attention(q.cpu().transpose(0, 1)[None], kd[0].transpose(0, 1)[None],
                                           vd[0].transpose(0, 1)[None], is_causal=True, enable_gqa=True)
    assert_close(ref, dense[0].transpose(0, 1))
