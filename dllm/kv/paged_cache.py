"""PagedKVCache: the K/V tensors of one stage's layers, addressed through block tables.

Layout (per layer): k, v [num_blocks, block_size, num_kv_heads, head_dim] — the layout the
Triton paged-attention kernels read. All layers live in one tensor
[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim] so a block copy (copy-on-write,
tree compaction) is one indexed assignment across every layer.
"""
from __future__ import annotations

import torch


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.data = torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
        # per-layer (k, v) views made once: indexing data[i, 0] costs ~4 us, twice a layer per step
        self._layers = [(self.data[i, 0], self.data[i, 1]) for i in range(num_layers)]

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return num_layers * 2 * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._layers[i]

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks src -> dst in every layer (copy-on-write after a fork)."""
        if not pairs:
            return
        src = torch.tensor([p[0] for p in pairs], device=self.data.device)
        dst = torch.tensor([p[1] for p in pairs], device=self.data.device)
        self.data[:, :, dst] = self.data[:, :, src]

    def move_slots(self, src_slots: list[int], dst_slots: list[int]) -> None:
        """Move single token slots (flat index block*block_size+offset) in every layer.

        Used to compact an accepted tree path onto contiguous positions. Gathers before it
        scatters, so overlapping source and destination ranges are safe.
        """
        if not src_slots:
            return
        flat = self.data.view(self.num_layers, 2, self.num_blocks * self.block_size, *self.data.shape[-2:])
        src = torch.tensor(src_slots, device=self.data.device)
        dst = torch.tensor(dst_slots, device=self.data.device)
        flat[:, :, dst] = flat[:, :, src].clone()
