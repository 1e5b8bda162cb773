"""StageRunner: a StageModel with its own paged KV cache, driven by SeqChunks.

This is what a stage does per forward pass, locally or behind the network: apply pending
commits, make room in the block manager (which also rolls back), build the attention
metadata, run the layers. The same object serves the coordinator's first layer range, a
stage server, and single-process generation.

On CUDA with the Triton kernels, a pass of one sequence with 1..64 new tokens (a decode step or
a draft tree) replays a CUDA graph of its size bucket (dllm/model/cuda_graph.py); `eager=True`
or `DLLM_EAGER=1` turns that off.
"""
from __future__ import annotations

import itertools
import os

import torch

from dllm.batch import SeqChunk
from dllm.kv.block_manager import BlockManager
from dllm.model.attention import AttentionMetadata, SeqAttention
from dllm.model.stage import StageModel


def ancestor_mask(parents: tuple[int, ...]) -> torch.Tensor:
    """[n, n] bool: node i may attend to node j iff j is i or an ancestor of i."""
    n = len(parents)
    m = torch.zeros(n, n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            m[i] = m[p]
        m[i, i] = True
    return m


def chunk_mask(c: SeqChunk) -> torch.Tensor:
    """[length, length] bool over a chunk's new tokens: ancestors for a tree, causal otherwise."""
    if c.parents is not None:
        return ancestor_mask(c.parents)
    return torch.ones(c.length, c.length, dtype=torch.bool).tril()


class Placed:
    """Host-side result of placing one chunk in the cache: rope positions, write slots, table."""
    __slots__ = ("positions", "slots", "table", "end")

    def __init__(self, positions: list[int], slots: list[int], table: list[int], end: int):
        self.positions, self.slots, self.table, self.end = positions, slots, table, end


class StageRunner:
    def __init__(self, model: StageModel, num_blocks: int, block_size: int = 16, eager: bool | None = None):
        self.model = model
        self.block_size = block_size
        self.blocks = BlockManager(num_blocks, block_size)
        self.kv = model.new_kv_cache(num_blocks, block_size)
        self.graphs = None
        if eager is None:
            eager = os.environ.get("DLLM_EAGER", "0") not in ("", "0")
        if not eager and model.use_kernels and model.device.type == "cuda":
            from dllm.model.cuda_graph import GraphRunner

            self.graphs = GraphRunner(self) if GraphRunner.supports(model) else None

    @classmethod
    def for_tokens(cls, model: StageModel, max_tokens: int, block_size: int = 16, eager: bool | None = None) -> "StageRunner":
        return cls(model, -(-max_tokens // block_size), block_size, eager)

    # ---- sequence lifecycle ------------------------------------------------------------------
    def free(self, seq_id: int) -> None:
        self.blocks.free(seq_id)

    def seq_len(self, seq_id: int) -> int:
        return self.blocks.length(seq_id)

    def _commit(self, c: SeqChunk) -> None:
        tree_start, kept = c.commit
        if not self.blocks.has(c.seq_id):
            return
        length = self.blocks.length(c.seq_id)
        if kept and tree_start + kept[-1] >= length:
            raise IndexError(f"seq {c.seq_id}: commit keeps node {kept[-1]} past its {length - tree_start} tree nodes")
        moves = [(tree_start + k, tree_start + i) for i, k in enumerate(kept) if k != i]
        if moves:
            self.kv.move_slots([self.blocks.slot(c.seq_id, s) for s, _ in moves],
                               [self.blocks.slot(c.seq_id, d) for _, d in moves])
        self.blocks.truncate(c.seq_id, tree_start + len(kept))

    def place(self, c: SeqChunk, pad_to: int | None = None) -> Placed:
        """Apply c's commit, make positions start..start+length (or +pad_to) writable; host lists."""
        if c.commit is not None:
            self._commit(c)
        end = c.start + (pad_to or c.length)
        self.kv.copy_blocks(self.blocks.prepare_write(c.seq_id, c.start, end))
        bs = self.block_size
        table = self.blocks.seqs[c.seq_id].blocks
        positions = [c.start + d for d in c.depths()]
        slots = [table[p // bs] * bs + p % bs for p in range(c.start, end)]
        return Placed(positions, slots, table, end)

    # ---- one pass ----------------------------------------------------------------------------
    def kernel_form_ok(self, chunks: list[SeqChunk]) -> bool:
        """The Triton attention kernels have no sliding window: use them while no key falls out."""
        window = self.model.config.sliding_window
        return self.model.use_kernels and (window is None or all(c.start + c.length <= window for c in chunks))

    def prepare(self, chunks: list[SeqChunk]) -> AttentionMetadata:
        kernel_form = self.kernel_form_ok(chunks)
        placed = [self.place(c) for c in chunks]
        if kernel_form:
            return self._kernel_meta(chunks, placed)
        return self._torch_meta(chunks, placed)

    def _kernel_meta(self, chunks: list[SeqChunk], placed: list[Placed]) -> AttentionMetadata:
        """Tensors for dllm/kernels/: block_tables [S, max_blocks] int32, context_lens [S] int32,
        cu_seqlens_q [S+1] int32, packed masks (only when a tree is in the batch)."""
        device = self.model.device
        n_blocks = [self.blocks.blocks_needed(p.end) for p in placed]
        max_blocks = max(n_blocks)
        tables = [p.table[:n] + [0] * (max_blocks - n) for p, n in zip(placed, n_blocks)]
        cu = [0]
        for c in chunks:
            cu.append(cu[-1] + c.length)

        def dev(values, dtype):  # pageable host -> device without waiting for the GPU
            t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
            return t.to(device, non_blocking=True)

        mask = offsets = None
        if any(c.parents is not None for c in chunks):
            from dllm import kernels

            mask, offsets = (dev(t, None) for t in kernels.pack_masks([chunk_mask(c) for c in chunks]))
        positions = [q for p in placed for q in p.positions]
        return AttentionMetadata(
            positions=dev(positions, torch.long), slot_mapping=dev([s for p in placed for s in p.slots], torch.long),
            block_tables=dev(tables, torch.int32), context_lens=dev([p.end for p in placed], torch.int32),
            cu_seqlens_q=dev(cu, torch.int32), mask=mask, mask_offsets=offsets,
            decode=all(c.length == 1 for c in chunks), max_q_len=max(c.length for c in chunks),
            max_context_len=max(p.end for p in placed), max_position=max(positions),
        )

    def _torch_meta(self, chunks: list[SeqChunk], placed: list[Placed]) -> AttentionMetadata:
        device = self.model.device
        positions = [q for p in placed for q in p.positions]
        meta = AttentionMetadata(
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            slot_mapping=torch.tensor([s for p in placed for s in p.slots], dtype=torch.long, device=device),
            max_position=max(positions),
        )
        starts = list(itertools.accumulate([0] + [c.length for c in chunks]))[:-1]
        # sequences decoding one plain token share one SDPA; prefill chunks and trees go one by one
        single = [i for i, (c, p) in enumerate(zip(chunks, placed)) if self._plain_decode(c, p)]
        batched = set(single) if len(single) > 1 else set()
        if batched:
            self._batched_decode(meta, [placed[i] for i in single])
            if len(single) < len(chunks):  # a mixed pass: new prompts joined the running batch
                meta.decode_rows = torch.tensor([starts[i] for i in single], device=device)
        meta.seqs = [self._seq_attention(c, pl, q0) for i, (c, pl, q0) in enumerate(zip(chunks, placed, starts))
                     if i not in batched]
        return meta

    def _seq_attention(self, c: SeqChunk, pl: Placed, q_start: int) -> SeqAttention:
        """One sequence's SDPA operands: its K/V as a slice or gather index, and its mask."""
        device, bs = self.model.device, self.block_size
        window = self.model.config.sliding_window
        end, table, pos = pl.end, pl.table, pl.positions
        n_blocks = self.blocks.blocks_needed(end)
        if table[:n_blocks] == list(range(table[0], table[0] + n_blocks)):
            kv_slice, kv_index = (table[0] * bs, table[0] * bs + end), None
        else:
            kv_slice = None
            kv_index = torch.tensor([table[p // bs] * bs + p % bs for p in range(end)], device=device)
        mask, causal = None, False
        if c.parents is not None:
            mask = torch.ones(c.length, end, dtype=torch.bool)
            mask[:, c.start:] = ancestor_mask(c.parents)
        elif c.length > 1:
            if c.start == 0:
                causal = True
            else:
                mask = torch.ones(c.length, end, dtype=torch.bool).tril(diagonal=c.start)
        if window is not None and end > window:
            # key at position kp is visible to a query at qp only if qp - kp < window
            key_pos = torch.cat([torch.arange(c.start), torch.tensor(pos)])
            in_window = (torch.tensor(pos)[:, None] - key_pos[None, :]) < window
            base = mask if mask is not None else (
                torch.ones(c.length, end, dtype=torch.bool).tril(diagonal=c.start))
            mask, causal = base & in_window, False
        return SeqAttention(q_start, c.length, end, kv_slice, kv_index,
                            None if mask is None else mask.to(device), causal)

    def _plain_decode(self, c: SeqChunk, pl: Placed) -> bool:
        """One token, not a tree, every key inside the sliding window (if any): no mask needed."""
        window = self.model.config.sliding_window
        return c.length == 1 and c.parents is None and (window is None or pl.end <= window)

    def _batched_decode(self, meta: AttentionMetadata, placed: list[Placed]) -> None:
        """Block ids [S * B] and an additive key mask [S, 1, 1, B * block_size] for one SDPA over
        all decoding sequences (B = the longest one's blocks; shorter tables are padded with
        their own first block, masked out). Gathering whole blocks is one contiguous copy per
        block: SmolLM2, 8 sequences of ~70 tokens, K and V of one layer in ~37 us, where indexing
        every token slot took ~160 us (at 32 sequences ~0.3 vs ~1.4 ms), once per layer per step."""
        bs = self.block_size
        n_blocks = [self.blocks.blocks_needed(p.end) for p in placed]
        longest = max(n_blocks)
        blocks = [b for p, n in zip(placed, n_blocks) for b in p.table[:n] + [p.table[0]] * (longest - n)]
        ends = torch.tensor([p.end for p in placed])
        hidden = torch.arange(longest * bs)[None, :] >= ends[:, None]  # [S, B * bs] padding
        mask = torch.zeros(hidden.shape).masked_fill_(hidden, float("-inf"))
        meta.decode_blocks = torch.tensor(blocks, dtype=torch.long, device=self.model.device)
        meta.decode_mask = mask[:, None, None, :].to(self.model.device, self.model.dtype)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, chunks: list[SeqChunk]) -> torch.Tensor:
        """x [T, H] (T = sum of chunk lengths) -> [T, H] after this stage's layers."""
        total = sum(c.length for c in chunks)
        if x.shape[0] != total:
            raise ValueError(f"{x.shape[0]} hidden rows for chunks totalling {total} tokens")
        x = x.to(self.model.device)
        if self.graphs is not None:
            n = self.graphs.bucket(chunks)
            if n is not None:
                return self.graphs.run(x, chunks[0], n)
        meta = self.prepare(chunks)
        return self.model(x, self.kv, meta)
