"""Attention over the paged KV cache: per-batch metadata, the Triton path and the torch reference.

One forward call carries a varlen batch: T new tokens from several sequences, flat. Each
sequence's new tokens were just written to the cache, so attention for sequence i reads its
whole context (ctx_len tokens, the new ones last) through its block table.

Two forms of the same metadata (the runner builds one of them):
- kernel form (`block_tables` set): tensors on the model's device that the Triton kernels read
  (dllm/kernels/paged_attention.py, tree_attention.py); no host sync, so a CUDA graph can
  replay it with the tensors updated in place;
- torch form (`seqs`): one SeqAttention per sequence for SDPA, with explicit masks. It also
  serves sliding windows, which the kernels do not implement. Sequences that decode one token
  each (two or more) go in `decode_blocks` + `decode_mask` instead: one padded SDPA over their
  KV blocks; `seqs` then holds the rest of the pass (prompts joining the batch, draft trees).

The mask of sequence i is [q_len, ctx_len] (True = may attend):
- decode (q_len 1): no mask;
- prefill from position 0: causal, SDPA's own fast path;
- a chunk after earlier context, or a draft tree: explicit mask (context columns all True,
  the new block causal or the tree's ancestor mask).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dllm import kernels


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
    seqs: list[SeqAttention] = field(default_factory=list)  # torch form
    # ---- kernel form (all on the model's device) ----
    block_tables: torch.Tensor | None = None  # [S, max_blocks] int32
    context_lens: torch.Tensor | None = None  # [S] int32, new tokens included
    cu_seqlens_q: torch.Tensor | None = None  # [S+1] int32
    mask: torch.Tensor | None = None          # flat uint8 [sum q_len_i^2] (pack_masks); None = causal
    mask_offsets: torch.Tensor | None = None  # [S+1] int32
    decode: bool = False                      # every q_len is 1: the decode kernel
    # ---- torch form, several sequences decoding one token each: one padded SDPA ----
    decode_blocks: torch.Tensor | None = None  # [S * B] int64 cache blocks of each sequence, B per sequence
    decode_mask: torch.Tensor | None = None    # [S, 1, 1, B * block_size] additive: 0, or -inf on padding
    decode_rows: torch.Tensor | None = None    # [S] int64 their rows in q when `seqs` has the others, else None
    # host-side bounds, so the kernels plan their grids without reading the GPU
    max_q_len: int = 1
    max_context_len: int = 0
    max_position: int = 0

    @property
    def kernel_form(self) -> bool:
        return self.block_tables is not None


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Write new K/V rows [T, n_kv, hd] into their slots of the paged cache [blocks, bs, n_kv, hd]."""
    n_kv, hd = k.shape[-2:]
    k_cache.view(-1, n_kv, hd).index_copy_(0, slots, k)
    v_cache.view(-1, n_kv, hd).index_copy_(0, slots, v)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, n_heads, hd] -> [T, n_heads, hd]: the Triton kernels for kernel-form metadata."""
    if not meta.kernel_form:
        return paged_attention_torch(q, k_cache, v_cache, meta, scale)
    if meta.decode:
        return kernels.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                              scale=scale, max_context_len=meta.max_context_len)
    # trees come topologically ordered (parent < child), so masks are lower triangular
    return kernels.tree_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.cu_seqlens_q,
                                  meta.mask, meta.mask_offsets, scale=scale, max_q_len=meta.max_q_len,
                                  max_context_len=meta.max_context_len, lower_triangular=True)


def paged_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, n_heads, hd] -> out [T, n_heads, hd], reading K/V through each sequence's slots."""
    n_kv, hd = k_cache.shape[-2:]
    k_flat = k_cache.view(-1, n_kv, hd)
    v_flat = v_cache.view(-1, n_kv, hd)
    gqa = q.shape[1] != n_kv
    if meta.decode_blocks is not None and meta.decode_rows is None:
        return _attend_decode_batch(q, k_cache, v_cache, meta, scale)
    if meta.decode_blocks is None and len(meta.seqs) == 1 and meta.seqs[0].q_start == 0:
        return _attend(q, k_flat, v_flat, meta.seqs[0], scale, gqa)
    out = torch.empty_like(q)
    if meta.decode_blocks is not None:
        out[meta.decode_rows] = _attend_decode_batch(q[meta.decode_rows], k_cache, v_cache, meta, scale)
    for s in meta.seqs:
        out[s.q_start:s.q_start + s.q_len] = _attend(q[s.q_start:s.q_start + s.q_len], k_flat, v_flat, s, scale, gqa)
    return out


def _attend_decode_batch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                         scale: float) -> torch.Tensor:
    """S sequences, one query token each: q [S, heads, hd] -> [S, heads, hd] in one SDPA.

    K/V: whole blocks gathered, [S * B, bs, n_kv, hd] -> [S, n_kv, B * bs, hd]. GQA: the
    heads / n_kv query heads that share a KV head go in as that head's query rows
    ([S, n_kv, group, hd]), which is the same attention without SDPA repeating K and V per
    query head (with enable_gqa SDPA took ~1.2x as long, SmolLM2 at 8 and 32 sequences)."""
    S, heads, hd = q.shape
    n_kv = k_cache.shape[-2]
    k = k_cache.index_select(0, meta.decode_blocks).view(S, -1, n_kv, hd).transpose(1, 2)
    v = v_cache.index_select(0, meta.decode_blocks).view(S, -1, n_kv, hd).transpose(1, 2)
    q = q.view(S, n_kv, heads // n_kv, hd)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=meta.decode_mask, scale=scale)
    return o.reshape(S, heads, hd)


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
