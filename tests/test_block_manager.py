"""BlockManager: pure-Python bookkeeping, no torch."""
import random

import pytest

from dllm.errors import KVBudgetExceeded
from dllm.kv.block_manager import BlockManager


def test_allocate_append_slots():
    bm = BlockManager(8, 4)
    assert bm.prepare_write(1, 0, 6) == []
    assert bm.length(1) == 6 and len(bm.block_table(1)) == 2
    t = bm.block_table(1)
    assert bm.slot(1, 5) == t[1] * 4 + 1
    bm.prepare_write(1, 6, 9)
    assert len(bm.block_table(1)) == 3 and bm.num_free == 5
    bm.check()


def test_truncate_rollback_frees_blocks():
    bm = BlockManager(8, 4)
    bm.prepare_write(1, 0, 12)
    bm.truncate(1, 5)
    assert bm.length(1) == 5 and len(bm.block_table(1)) == 2 and bm.num_free == 6
    # a write at an earlier start is an implicit rollback
    bm.prepare_write(1, 2, 3)
    assert bm.length(1) == 3 and len(bm.block_table(1)) == 1
    bm.check()


def test_gap_rejected():
    bm = BlockManager(8, 4)
    bm.prepare_write(1, 0, 3)
    with pytest.raises(ValueError, match="gap"):
        bm.prepare_write(1, 5, 6)


def test_fork_shares_and_copy_on_write():
    bm = BlockManager(8, 4)
    bm.prepare_write(1, 0, 6)
    bm.fork(1, 2)
    t1 = bm.block_table(1)
    assert bm.block_table(2) == t1 and all(bm.refcount(b) == 2 for b in t1)
    # seq 2 writes into the shared partial block -> one copy of that block
    copies = bm.prepare_write(2, 6, 7)
    assert copies == [(t1[1], bm.block_table(2)[1])]
    assert bm.block_table(2)[0] == t1[0] and bm.refcount(t1[0]) == 2 and bm.refcount(t1[1]) == 1
    bm.free(1)
    bm.free(2)
    assert bm.num_free == 8
    bm.check()


def test_budget_exceeded_changes_nothing():
    bm = BlockManager(4, 4)
    bm.prepare_write(1, 0, 10)
    before = (bm.block_table(1), bm.length(1), bm.num_free)
    with pytest.raises(KVBudgetExceeded, match="KV cache full"):
        bm.prepare_write(2, 0, 9)
    assert (bm.block_table(1), bm.length(1), bm.num_free) == before and not bm.has(2)
    bm.check()


def test_truncate_then_grow_within_budget_counts_freed_blocks():
    bm = BlockManager(4, 4)
    bm.prepare_write(1, 0, 16)  # all 4 blocks
    bm.prepare_write(1, 4, 16)  # rollback to 4 then regrow: must fit
    assert bm.length(1) == 16
    bm.check()


def test_random_operations_keep_invariants():
    rng = random.Random(0)
    for trial in range(200):
        bm = BlockManager(rng.randint(4, 24), rng.choice([1, 2, 4, 16]))
        lengths: dict[int, int] = {}
        for _ in range(40):
            op = rng.random()
            sid = rng.randint(1, 5)
            try:
                if op < 0.5:
                    start = rng.randint(0, lengths.get(sid, 0))
                    end = start + rng.randint(1, 9)
                    bm.prepare_write(sid, start, end)
                    lengths[sid] = end
                elif op < 0.65 and sid in lengths:
                    n = rng.randint(0, lengths[sid])
                    bm.truncate(sid, n)
                    lengths[sid] = n
                elif op < 0.8 and sid in lengths:
                    dst = rng.randint(6, 1000)
                    if dst not in lengths:
                        bm.fork(sid, dst)
                        lengths[dst] = lengths[sid]
                elif sid in lengths:
                    bm.free(sid)
                    del lengths[sid]
            except KVBudgetExceeded:
                pass
            bm.check()
            for s, n in lengths.items():
                assert bm.length(s) == n
        for s in list(lengths):
            bm.free(s)
        assert bm.num_free == bm.num_blocks
