"""Shared builders for the kernel parity tests (paged caches, trees, tolerances)."""

from __future__ import annotations

import importlib
import os
import sys

import torch


def use_interpreter_without_gpu() -> None:
    """Without CUDA, run the Triton kernels through triton's interpreter. TRITON_INTERPRET must be
    set before `@triton.jit` runs (triton picks the interpreter at decoration time), so kernel
    modules imported before it was set are reloaded: utils first (the ops import from it), the
    package that re-exports them last. Whether to reload is decided once, from utils as it was
    first imported (reloading it flips INTERPRETED_AT_IMPORT)."""
    if torch.cuda.is_available():
        return
    os.environ.setdefault("TRITON_INTERPRET", "1")
    utils = sys.modules.get("dllm.kernels.utils")
    if utils is None or utils.INTERPRETED_AT_IMPORT:
        return
    ops = sorted(n for n in sys.modules if n.startswith("dllm.kernels.") and n != "dllm.kernels.utils")
    for name in ["dllm.kernels.utils", *ops, "dllm.kernels"]:
        if name in sys.modules:
            importlib.reload(sys.modules[name])


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (atol, rtol) per dtype: fp32 is tight; half types get ~2-4 ulps of their 8/11-bit mantissas.
TOL = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, scale: float = 1.0):
    atol, rtol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol * scale, rtol=rtol * scale)


def make_paged_kv(ctx_lens: list[int], n_kv: int, head_dim: int, block_size: int,
                  dtype=torch.float32, seed: int = 0, extra_blocks: int = 3):
    """Dense per-seq K/V [ctx_i, n_kv, hd] scattered into a paged cache with a shuffled
    (fragmented) block table. Unused slots and padding entries hold garbage.
    Returns (k_dense, v_dense, k_cache, v_cache, block_tables int32, context_lens int32)."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-c // block_size) for c in ctx_lens]
    num_blocks = sum(need) + extra_blocks
    max_blocks = max(need + [1]) + 1  # one padding column
    k_cache = torch.randn(num_blocks, block_size, n_kv, head_dim, generator=g) * 3  # garbage
    v_cache = torch.randn(num_blocks, block_size, n_kv, head_dim, generator=g) * 3
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.randint(0, num_blocks, (len(ctx_lens), max_blocks), generator=g)  # padding = garbage ids
    k_dense, v_dense, used = [], [], 0
    for i, c in enumerate(ctx_lens):
        k = torch.randn(c, n_kv, head_dim, generator=g)
        v = torch.randn(c, n_kv, head_dim, generator=g)
        blocks = perm[used : used + need[i]]
        used += need[i]
        tables[i, : need[i]] = blocks
        for t in range(c):
            k_cache[blocks[t // block_size], t % block_size] = k[t]
            v_cache[blocks[t // block_size], t % block_size] = v[t]
        k_dense.append(k.to(dtype))
        v_dense.append(v.to(dtype))
    return (k_dense, v_dense, k_cache.to(dtype), v_cache.to(dtype),
            tables.to(torch.int32), torch.tensor(ctx_lens, dtype=torch.int32))


def random_parents(n: int, g: torch.Generator) -> list[int]:
    """Random tree in topological order: parents[0] = -1, parents[i] in [0, i)."""
    return [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)]


def ancestor_mask(parents: list[int]) -> torch.Tensor:
    """bool [n, n]: mask[i, j] = j is i or an ancestor of i."""
    n = len(parents)
    m = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j >= 0:
            m[i, j] = True
            j = parents[j]
    return m


def path_to_root(parents: list[int], i: int) -> list[int]:
    """Node indices from the root down to i."""
    path = []
    while i >= 0:
        path.append(i)
        i = parents[i]
    return path[::-1]


def to_dev(*ts):
    return tuple(t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in ts)
