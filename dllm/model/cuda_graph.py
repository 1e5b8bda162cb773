"""CUDA graphs of a stage's forward pass for one sequence at fixed query sizes (buckets).

At batch 1 a 64-layer decode step launches ~700 small kernels; eager launch costs ~5-10 us
each on the host, which is a third of a 20 ms bf16 step on an H100 and most of a 6 ms int4
one. A graph replays them with one launch. Each bucket n (1 = decode, 4/16/64 = draft trees)
has static buffers that the host updates in place before each replay:

  x            [n, H]              hidden rows (rows past the chunk's length are padding)
  pos_slots    [2n] int64          rope positions | cache write slots
  tables       [max_blocks + 1] int32   the sequence's block table | its context length
  mask         [n*n] uint8         ancestor (or causal) mask of the new tokens (n > 1)

Padding: a chunk of m < n tokens is run as n; the padded rows write K/V into the slots just
past the chunk (allocated for the pass, truncated after it), see the context and themselves
only, and their outputs are dropped, so the real rows' results do not change.
Graphs need the kernel-form metadata (no host reads inside the pass) and a rope table sized
once up front; `supports` refuses models with a sliding window (torch attention path).
"""
from __future__ import annotations

import torch

from dllm.batch import SeqChunk
from dllm.model.attention import AttentionMetadata
from dllm.model.runner import chunk_mask

BUCKETS = (1, 4, 16, 64)


class _Bucket:
    def __init__(self, n: int, hidden: int, dtype: torch.dtype, max_blocks: int, device):
        self.n = n
        self.x = torch.zeros(n, hidden, dtype=dtype, device=device)
        self.pos_slots = torch.zeros(2 * n, dtype=torch.long, device=device)
        self.tables = torch.zeros(max_blocks + 1, dtype=torch.int32, device=device)
        self.cu = torch.tensor([0, n], dtype=torch.int32, device=device)
        self.mask = torch.ones(n * n, dtype=torch.uint8, device=device)
        self.mask_offsets = torch.tensor([0, n * n], dtype=torch.int32, device=device)
        self.graph = None
        self.out: torch.Tensor | None = None

    def meta(self, max_blocks: int, block_size: int, max_position: int) -> AttentionMetadata:
        n = self.n
        return AttentionMetadata(
            positions=self.pos_slots[:n], slot_mapping=self.pos_slots[n:],
            block_tables=self.tables[:max_blocks].view(1, max_blocks), context_lens=self.tables[max_blocks:],
            cu_seqlens_q=self.cu, mask=None if n == 1 else self.mask,
            mask_offsets=None if n == 1 else self.mask_offsets, decode=n == 1, max_q_len=n,
            max_context_len=max_blocks * block_size, max_position=max_position,
        )


class GraphRunner:
    """Owned by a StageRunner: `bucket(chunks)` says whether a pass fits, `run` replays it."""

    def __init__(self, runner, buckets=BUCKETS, max_context: int | None = None, capture: bool | None = None):
        self.runner = runner
        model = runner.model
        bs = runner.block_size
        self.buckets = tuple(sorted(buckets))
        slots = runner.blocks.num_blocks * bs
        self.max_blocks = -(-min(max_context or slots, slots) // bs)
        self.capacity = self.max_blocks * bs
        self.capture = model.device.type == "cuda" if capture is None else capture
        # the rope table must exist at full size before capture: a graph holds its address (kept
        # alive here even if an eager pass ever regrows the model's table)
        self._rope = model.rotary.kernel_table(slots, model.device)
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self._buckets: dict[int, _Bucket] = {}
        self.replays = 0

    @staticmethod
    def supports(model) -> bool:
        return model.use_kernels and model.config.sliding_window is None and len(model.layers) > 0

    def bucket(self, chunks: list[SeqChunk]) -> int | None:
        """The bucket size for this pass, or None to run it eagerly."""
        if len(chunks) != 1:
            return None
        c = chunks[0]
        n = next((b for b in self.buckets if b >= c.length), None)
        if n is None or c.start + n > self.capacity:
            return None
        blocks = self.runner.blocks
        if n > c.length and blocks.blocks_needed(c.start + n) - blocks.blocks_needed(c.start + c.length) > blocks.num_free:
            return None  # no room for the padding
        return n

    def _get(self, n: int) -> _Bucket:
        b = self._buckets.get(n)
        if b is None:
            m = self.runner.model
            b = self._buckets[n] = _Bucket(n, m.config.hidden_size, m.dtype, self.max_blocks, m.device)
        return b

    def run(self, x: torch.Tensor, c: SeqChunk, n: int) -> torch.Tensor:
        """x [m, H] -> [m, H] through the stage, replaying bucket n (n >= m)."""
        m = c.length
        b = self._get(n)
        p = self.runner.place(c, pad_to=n)
        nb = -(-p.end // self.runner.block_size)
        b.pos_slots.copy_(torch.tensor(p.positions + [c.start] * (n - m) + p.slots, dtype=torch.long), non_blocking=True)
        b.tables.copy_(torch.tensor(p.table[:nb] + [0] * (self.max_blocks - nb) + [p.end], dtype=torch.int32),
                       non_blocking=True)
        if n > 1:
            mask = torch.eye(n, dtype=torch.bool)
            mask[:m, :m] = chunk_mask(c)
            b.mask.copy_(mask.view(-1).to(torch.uint8), non_blocking=True)
        b.x[:m].copy_(x)
        self._replay(b)
        self.replays += 1
        if n > m:
            self.runner.blocks.truncate(c.seq_id, c.start + m)
        return b.out[:m].clone()

    def _replay(self, b: _Bucket) -> None:
        model, kv = self.runner.model, self.runner.kv
        meta = b.meta(self.max_blocks, self.runner.block_size, self.capacity - 1)
        if not self.capture:  # CPU: same buffers and metadata, run directly (tests the plumbing)
            b.out = model(b.x, kv, meta)
            return
        if b.graph is None:
            # warm-up on a side stream compiles the Triton kernels; it writes this pass's K/V,
            # which the replay then writes again with the same values
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                model(b.x, kv, meta)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                b.out = model(b.x, kv, meta)
            b.graph = g
        b.graph.replay()
