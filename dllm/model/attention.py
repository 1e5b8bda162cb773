"""Attention over the paged KV cache: per-batch metadata and the torch reference path.

One forward call carries a varlen batch: T new tokens from several sequences, flat. Each
sequence's new tokens were just written to the cache, so attention for sequence i reads its
whole context (ctx_len tokens, the new ones last) through its block table.

The mask of sequence i is [q_len, ctx_len] (True = may attend):
- decode (q_len 1): no mask;
- prefill from position 0: causal, SDPA's own fast path;
- a chunk after earlier context, or a draft tree: explicit mask (context columns all True,
  the new block causal or the tree's ancestor mask).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SeqAttention:
    q_start: int            # first row of this sequence in the flat [T, ...] batch
    q_len: int              # new tokens
    ctx_len: int            # tokens in the cache after the write, new ones included
    kv_slice: tuple[int, int] | None  # contiguous flat-slot range, when the blocks happen to be contiguous
    kv_index: torch.Tensor | None     # [ctx_len] flat slot of each context token otherwise
    mask: torch.Tensor | None         # [q_len, ctx_len] bool, None when not needed
    causal: bool = False              # q_len == ctx_len and plain causal: let SDPA build it


@dataclass
class AttentionMetadata:
    positions: torch.Tensor     # [T] int64 rope positions (context length + depth for tree nodes)
    slot_mapping: torch.Tensor  # [T] int64 flat cache slot each new token's K/V is written to
    seqs: list[SeqAttention]
    block_tables: torch.Tensor | None = None  # [num_seqs, max_blocks] int32, for the GPU kernels
    context_lens: torch.Tensor | None = None  # [num_seqs] int32


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Write new K/V rows [T, n_kv, hd] into their slots of the paged cache [blocks, bs, n_kv, hd]."""
    n_kv, hd = k.shape[-2:]
    k_cache.view(-1, n_kv, hd).index_copy_(0, slots, k)
    v_cache.view(-1, n_kv, hd).index_copy_(0, slots, v)


def paged_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, n_heads, hd] -> out [T, n_heads, hd], reading K/V through each sequence's slots."""
    n_kv, hd = k_cache.shape[-2:]
    k_flat = k_cache.view(-1, n_kv, hd)
    v_flat = v_cache.view(-1, n_kv, hd)
    gqa = q.shape[1] != n_kv
    if len(meta.seqs) == 1 and meta.seqs[0].q_start == 0:
        return _attend(q, k_flat, v_flat, meta.seqs[0], scale, gqa)
    out = torch.empty_like(q)
    for s in meta.seqs:
        out[s.q_start:s.q_start + s.q_len] = _attend(q[s.q_start:s.q_start + s.q_len], k_flat, v_flat, s, scale, gqa)
    return out


def _attend(q, k_flat, v_flat, s: SeqAttention, scale: float, gqa: bool) -> torch.Tensor:
    if s.kv_slice is not None:
        k, v = k_flat[s.kv_slice[0]:s.kv_slice[1]], v_flat[s.kv_slice[0]:s.kv_slice[1]]
    else:
        k, v = k_flat[s.kv_index], v_flat[s.kv_index]
    # [len, heads, hd] -> [1, heads, len, hd]
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
        attn_mask=s.mask, is_causal=s.causal, scale=scale, enable_gqa=gqa,
    )
    return o.squeeze(0).transpose(0, 1)
