"""StageRunner: a StageModel with its own paged KV cache, driven by SeqChunks.

This is what a stage does per forward pass, locally or behind the network: apply pending
commits, make room in the block manager (which also rolls back), build the attention
metadata, run the layers. The same object serves the coordinator's first layer range, a
stage server, and single-process generation.
"""
from __future__ import annotations

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


class StageRunner:
    def __init__(self, model: StageModel, num_blocks: int, block_size: int = 16):
        self.model = model
        self.block_size = block_size
        self.blocks = BlockManager(num_blocks, block_size)
        self.kv = model.new_kv_cache(num_blocks, block_size)

    @classmethod
    def for_tokens(cls, model: StageModel, max_tokens: int, block_size: int = 16) -> "StageRunner":
        return cls(model, -(-max_tokens // block_size), block_size)

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

    # ---- one pass ----------------------------------------------------------------------------
    def prepare(self, chunks: list[SeqChunk]) -> AttentionMetadata:
        device = self.model.device
        bs = self.block_size
        window = self.model.config.sliding_window
        positions, slots, seqs = [], [], []
        q_start = 0
        for c in chunks:
            if c.commit is not None:
                self._commit(c)
            end = c.start + c.length
            self.kv.copy_blocks(self.blocks.prepare_write(c.seq_id, c.start, end))
            depths = c.depths()
            pos = [c.start + d for d in depths]
            positions += pos
            table = self.blocks.seqs[c.seq_id].blocks
            slots += [table[p // bs] * bs + p % bs for p in range(c.start, end)]
            n_blocks = -(-end // bs)
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
            seqs.append(SeqAttention(q_start, c.length, end, kv_slice, kv_index,
                                     None if mask is None else mask.to(device), causal))
            q_start += c.length
        return AttentionMetadata(
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            seqs=seqs,
        )

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, chunks: list[SeqChunk]) -> torch.Tensor:
        """x [T, H] (T = sum of chunk lengths) -> [T, H] after this stage's layers."""
        total = sum(c.length for c in chunks)
        if x.shape[0] != total:
            raise ValueError(f"{x.shape[0]} hidden rows for chunks totalling {total} tokens")
        meta = self.prepare(chunks)
        return self.model(x, self.kv, meta)
