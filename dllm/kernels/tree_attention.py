"""Tree-verify attention over the paged KV cache (also chunked prefill).

Shapes:
  q             [T, n_heads, hd]   flat over the batch; seq i owns rows cu_seqlens_q[i]:[i+1]
  cu_seqlens_q  [S+1] int32        q_len_i = cu[i+1] - cu[i] (1..64+ tree nodes, or a chunk)
  k/v_cache, block_tables, context_lens: as paged_decode_attention; context_lens counts
                the new tokens too, which the runtime already wrote to the LAST q_len_i slots
  mask          flat bool/uint8 [sum q_len_i^2]; seq i's [q_len_i, q_len_i] row-major matrix
                starts at mask_offsets[i]; mask[j, k] = new token j may see new token k
                (ancestor-or-self for a tree). mask=None means causal (k <= j): chunked
                prefill without building a q_len^2 buffer.
  out           [T, n_heads, hd]   new tensor, dtype of q
Query j of seq i sees the prefix (first ctx - q_len tokens) plus the new tokens its mask
row allows.

Grid (m_tiles, S, n_kv * num_splits). Rows of a query tile pack (token, head-in-group):
row r -> token r // G, head r % G, so one K/V tile serves all G query heads of a kv head
(G = 5 for Qwen2.5-32B: a 64-node tree is 320 rows = 5 tiles of 64). The context is
split as in paged_attention (flash-decoding) and merged by the same combine kernel.
lower_triangular=True lets a tile skip new tokens after its last query row; it is
exact whenever mask[j, k] is False for k > j (topologically ordered trees, causal).
"""

from __future__ import annotations

import math

import torch

from .paged_attention import (
    LOG2E, _load_kv_tile, _softmax_step, attention_ref, check_paged_cache, combine_splits,
    gather_kv_ref, split_buffers,
)
from .utils import (
    cdiv, check_last_dim_contiguous, device_sms, dot, fix_partition, next_power_of_2,
    plan_kv_splits, require_triton, tl, triton,
)


@triton.jit
def _tree_attention_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, cu_ptr, mask_ptr, moff_ptr,
    out_ptr, m_ptr, l_ptr, acc_ptr,
    scale,  # softmax scale * log2(e)
    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_bt, stride_ot, stride_oh,
    n_heads, partition,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    CAUSAL: tl.constexpr, LOWER_TRI: tl.constexpr,
):
    pid_m = tl.program_id(0)
    seq = tl.program_id(1).to(tl.int64)
    kvh = (tl.program_id(2) // NUM_SPLITS).to(tl.int64)
    split = tl.program_id(2) % NUM_SPLITS
    q_start = tl.load(cu_ptr + seq)
    q_len = tl.load(cu_ptr + seq + 1) - q_start
    if pid_m * BLOCK_M >= q_len * GROUP:
        return
    ctx = tl.load(ctx_ptr + seq)
    prefix = ctx - q_len

    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    j = r // GROUP  # query token within the seq
    heads = kvh * GROUP + r % GROUP
    row_mask = j < q_len
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    rd_mask = row_mask[:, None] & d_mask[None, :]
    tok = (q_start + j).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=rd_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = bt_ptr + seq * stride_bt
    start = split * partition
    end = tl.minimum(start + partition, ctx)

    # Phase 1: prefix tokens, visible to every query.
    p_end = tl.minimum(end, prefix)
    for n0 in range(start, p_end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < p_end
        k = _load_kv_tile(k_ptr, bt_row, n, n_mask, kvh, d, d_mask, stride_kb, stride_kt, stride_kh, BLOCK_SIZE)
        s = dot(q, tl.trans(k)) * scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        v = _load_kv_tile(v_ptr, bt_row, n, n_mask, kvh, d, d_mask, stride_vb, stride_vt, stride_vh, BLOCK_SIZE)
        m_i, l_i, acc = _softmax_step(m_i, l_i, acc, s, v)

    # Phase 2: the new tokens, under the mask.
    n_lo = tl.maximum(start, prefix)
    n_hi = end
    if CAUSAL or LOWER_TRI:
        last_j = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GROUP, q_len - 1)
        n_hi = tl.minimum(n_hi, prefix + last_j + 1)
    moff = tl.load(moff_ptr + seq).to(tl.int64)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < n_hi
        kk = n - prefix  # new-token index
        if CAUSAL:
            vis = kk[None, :] <= j[:, None]
        else:
            mk = tl.load(mask_ptr + moff + j[:, None] * q_len + kk[None, :],
                         mask=row_mask[:, None] & n_mask[None, :], other=0)
            vis = mk != 0
        vis = vis & n_mask[None, :]
        k = _load_kv_tile(k_ptr, bt_row, n, n_mask, kvh, d, d_mask, stride_kb, stride_kt, stride_kh, BLOCK_SIZE)
        s = dot(q, tl.trans(k)) * scale
        s = tl.where(vis, s, float("-inf"))
        v = _load_kv_tile(v_ptr, bt_row, n, n_mask, kvh, d, d_mask, stride_vb, stride_vt, stride_vh, BLOCK_SIZE)
        m_i, l_i, acc = _softmax_step(m_i, l_i, acc, s, v)

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_ptr = out_ptr + tok[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :]
        tl.store(o_ptr, out.to(out_ptr.dtype.element_ty), mask=rd_mask)
    else:
        row = (tok * n_heads + heads) * NUM_SPLITS + split
        tl.store(m_ptr + row, m_i, mask=row_mask)
        tl.store(l_ptr + row, l_i, mask=row_mask)
        tl.store(acc_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=rd_mask)


TREE_CONFIG = dict(block_m=64, block_n=64, num_warps=4, num_stages=2, min_partition=256)


def _check_varlen(q, cu_seqlens_q, context_lens, mask, mask_offsets):
    S = context_lens.shape[0]
    if cu_seqlens_q.shape != (S + 1,) or cu_seqlens_q.dtype != torch.int32:
        raise ValueError(f"cu_seqlens_q must be int32 [{S + 1}], got {cu_seqlens_q.dtype} {tuple(cu_seqlens_q.shape)}")
    if mask is not None and (mask_offsets is None or mask_offsets.shape != (S + 1,)):
        raise ValueError(f"mask needs mask_offsets int32 [{S + 1}]")


def tree_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    block_tables: torch.Tensor, context_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
    mask: torch.Tensor | None = None, mask_offsets: torch.Tensor | None = None,
    scale: float | None = None, max_q_len: int | None = None, max_context_len: int | None = None,
    lower_triangular: bool = False, num_splits: int | None = None, config: dict | None = None,
) -> torch.Tensor:
    """q [T, n_heads, hd] -> out [T, n_heads, hd]. mask None = causal.

    max_q_len / max_context_len are host-side bounds (pass them from the scheduler to
    avoid a GPU sync; max_q_len defaults to a sync on cu_seqlens_q, max_context_len to
    max_blocks_per_seq * block_size). num_splits overrides the split plan."""
    T, n_heads, hd = q.shape
    block_size, n_kv, hd_c = check_paged_cache(k_cache, v_cache, block_tables, n_heads)
    if hd_c != hd:
        raise ValueError(f"q head_dim {hd} != cache head_dim {hd_c}")
    _check_varlen(q, cu_seqlens_q, context_lens, mask, mask_offsets)
    require_triton(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q)
    check_last_dim_contiguous(q, "q")
    out = torch.empty((T, n_heads, hd), dtype=q.dtype, device=q.device)
    S = context_lens.shape[0]
    if T == 0 or S == 0:
        return out
    if max_q_len is None:
        max_q_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    group = n_heads // n_kv
    cfg = {**TREE_CONFIG, **(config or {})}
    block_m = cfg["block_m"] if max_q_len * group > 32 else 16
    block_n = cfg["block_n"] if hd <= 128 else 32
    m_tiles = cdiv(max(max_q_len, 1) * group, block_m)
    max_len = max_context_len if max_context_len is not None else block_tables.shape[1] * block_size
    if num_splits is None:
        splits, partition = plan_kv_splits(S * n_kv * m_tiles, max_len, device_sms(q), block_n, cfg["min_partition"])
    else:
        splits, partition = fix_partition(max_len, num_splits, block_n)
    causal = mask is None
    if causal:
        mask = mask_offsets = cu_seqlens_q  # unused placeholders
    elif mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    m = l = acc = out
    if splits > 1:
        m, l, acc = split_buffers(T, n_heads, splits, hd, q.device)
    scale = (1.0 / math.sqrt(hd) if scale is None else scale) * LOG2E
    _tree_attention_kernel[(m_tiles, S, n_kv * splits)](
        q, k_cache, v_cache, block_tables, context_lens.to(torch.int32), cu_seqlens_q,
        mask, mask_offsets.to(torch.int32), out, m, l, acc,
        scale, q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        n_heads, partition,
        GROUP=group, HEAD_DIM=hd, BLOCK_SIZE=block_size, BLOCK_M=block_m,
        BLOCK_D=next_power_of_2(hd), BLOCK_N=block_n, NUM_SPLITS=splits,
        CAUSAL=causal, LOWER_TRI=bool(lower_triangular), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if splits > 1:
        combine_splits(m, l, acc, out)
    return out


def pack_masks(masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-seq bool [q_len_i, q_len_i] masks -> (flat uint8 [sum q_len_i^2], offsets int32 [S+1])."""
    sizes = [int(m.numel()) for m in masks]
    offsets = torch.tensor([0] + sizes, dtype=torch.int64).cumsum(0).to(torch.int32)
    flat = torch.cat([m.reshape(-1).to(torch.uint8) for m in masks]) if masks else torch.zeros(0, dtype=torch.uint8)
    return flat, offsets


def tree_attention_ref(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    block_tables: torch.Tensor, context_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
    mask: torch.Tensor | None = None, mask_offsets: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    T, n_heads, hd = q.shape
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    out = torch.zeros_like(q)
    for i in range(context_lens.shape[0]):
        a, b = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        ql, ctx = b - a, int(context_lens[i])
        if ql == 0:
            continue
        if ctx < ql:
            raise ValueError(f"seq {i}: context_len {ctx} < q_len {ql}")
        if mask is None:
            tree = torch.ones((ql, ql), dtype=torch.bool, device=q.device).tril()
        else:
            o = int(mask_offsets[i])
            tree = mask[o : o + ql * ql].reshape(ql, ql).bool()
        allowed = torch.cat([torch.ones((ql, ctx - ql), dtype=torch.bool, device=q.device), tree], dim=1)
        k = gather_kv_ref(k_cache, block_tables[i], ctx)
        v = gather_kv_ref(v_cache, block_tables[i], ctx)
        out[a:b] = attention_ref(q[a:b], k, v, allowed, scale).to(q.dtype)
    return out
