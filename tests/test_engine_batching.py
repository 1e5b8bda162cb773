"""Batched decoding computes what solo decoding does, on the CPU path: the packed fp32 matmul
gives every row the same bits whatever the batch, and the one padded SDPA over several
sequences' gathered KV blocks equals attending each sequence alone."""
import pytest
import torch

from dllm.batch import SeqChunk
from dllm.model.quant import PackedWeight
from dllm.model.runner import StageRunner
from dllm.model.stage import StageModel

from .conftest import TINY_ARCHS


@pytest.mark.parametrize("shape", [(96, 64), (960, 576), (576, 1536)])
def test_packed_weight_rows_do_not_depend_on_the_batch(shape):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=g)
    x = torch.randn(40, shape[1], generator=g)
    packed = PackedWeight(w)
    whole = packed.forward(x)
    torch.testing.assert_close(whole, x @ w.t(), atol=1e-3, rtol=1e-4)
    for n in (1, 2, 3, 4, 5, 8, 17):
        for start in (0, 3):
            assert torch.equal(packed.forward(x[start:start + n]), whole[start:start + n]), (n, start)
    assert torch.equal(packed.dense(), w)


def grown_runner(stage: StageModel, lengths: list[int]) -> StageRunner:
    """A runner holding len(lengths) sequences whose block tables interleave (block size 4): each
    is prefilled with 3 tokens, then all grow one token at a time, round robin."""
    runner = StageRunner.for_tokens(stage, 1024, block_size=4)
    ids = torch.Generator().manual_seed(1)
    for s in range(len(lengths)):
        runner.forward(stage.embed(torch.randint(0, 128, (3,), generator=ids)), [SeqChunk(s, 0, 3)])
    for pos in range(3, max(lengths)):
        for s, n in enumerate(lengths):
            if pos < n:
                runner.forward(stage.embed(torch.randint(0, 128, (1,), generator=ids)), [SeqChunk(s, pos, 1)])
    return runner


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_batched_decode_step_equals_each_sequence_alone(tiny_models, arch):
    d, _ = tiny_models[arch]
    stage = StageModel.from_pretrained(d)
    lengths = [5, 14, 7, 22]  # mistral's window is 9: its longer ones take the per-sequence path
    runner = grown_runner(stage, lengths)
    assert any(t != list(range(t[0], t[0] + len(t))) for t in (runner.blocks.block_table(s) for s in range(4)))
    chunks = [SeqChunk(s, n, 1) for s, n in enumerate(lengths)]
    meta = runner.prepare(chunks)
    if stage.config.sliding_window is None:
        assert meta.decode_blocks is not None and meta.decode_rows is None and not meta.seqs
    else:  # the two inside the window share one SDPA, the two past it need the window mask
        assert meta.decode_rows.tolist() == [0, 2] and [s.q_start for s in meta.seqs] == [1, 3]
    # a new prompt (6 tokens) and a draft tree (3 nodes) joining the decoding sequences
    chunks += [SeqChunk(4, 0, 6), SeqChunk(1, lengths[1], 3, parents=(-1, 0, 0))]
    mixed = runner.prepare([chunks[0], chunks[4], chunks[2], chunks[5]])
    assert mixed.decode_rows.tolist() == [0, 7] and len(mixed.seqs) == 2
    x = stage.embed(torch.tensor([3, 50, 7, 99] + list(range(10, 16)) + [5, 6, 8]))
    rows = [[0], [1], [2], [3], list(range(4, 10)), [10, 11, 12]]
    for batch in ([0, 1, 2, 3], [0, 2], [0, 4, 2, 5], [4, 0, 3]):
        got = runner.forward(x[[r for i in batch for r in rows[i]]], [chunks[i] for i in batch])
        # the same positions again, one sequence at a time (each pass first cuts its sequence back)
        alone = torch.cat([runner.forward(x[rows[i]], [chunks[i]]) for i in batch])
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)
