"""StageModel on tiny random models of each architecture, against HF transformers."""
import random

import pytest
import torch

from dllm.batch import SeqChunk
from dllm.config import ModelConfig
from dllm.engine import Engine, LocalPipeline
from dllm.errors import ConfigError
from dllm.model.runner import StageRunner
from dllm.model.stage import StageModel
from dllm.sampling import SamplingParams

from .conftest import TINY_ARCHS


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


def full_forward(stage, runner, ids, seq_id=0):
    x = runner.forward(stage.embed(torch.tensor(ids)), [SeqChunk(seq_id, 0, len(ids))])
    return stage.logits(x)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_full_forward_matches_hf(tiny_models, arch):
    d, hf = tiny_models[arch]
    stage = StageModel.from_pretrained(d)
    runner = StageRunner.for_tokens(stage, 256, block_size=4)
    ids = torch.randint(0, 128, (23,), generator=torch.Generator().manual_seed(1)).tolist()
    torch.testing.assert_close(full_forward(stage, runner, ids), hf_logits(hf, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_step_decode_equals_full_forward(tiny_models, arch):
    d, hf = tiny_models[arch]
    stage = StageModel.from_pretrained(d)
    runner = StageRunner.for_tokens(stage, 256, block_size=4)
    ids = list(range(3, 40, 2))
    ref = hf_logits(hf, ids)
    # prompt in two chunks (the second attends to the first through the cache), then 1 token at a time
    runner.forward(stage.embed(torch.tensor(ids[:5])), [SeqChunk(7, 0, 5)])
    x = runner.forward(stage.embed(torch.tensor(ids[5:9])), [SeqChunk(7, 5, 4)])
    rows = [stage.logits(x)[-1]]
    for i in range(9, len(ids)):
        rows.append(stage.logits(runner.forward(stage.embed(torch.tensor(ids[i:i + 1])), [SeqChunk(7, i, 1)]))[0])
    torch.testing.assert_close(torch.stack(rows), ref[8:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("split", [[(0, 2), (2, 4)], [(0, 1), (1, 3), (3, 4)], [(0, 0), (0, 4)]])
def test_stages_in_sequence_equal_whole_model(tiny_models, arch, split):
    d, _ = tiny_models[arch]
    whole = StageModel.from_pretrained(d)
    ref_runner = StageRunner.for_tokens(whole, 256, 4)
    stages = [StageModel.from_pretrained(d, layers=range(a, b), embed=(i == 0), head=(i == 0)) for i, (a, b) in enumerate(split)]
    # each stage holds exactly its own layers
    assert [len(s.layers) for s in stages] == [b - a for a, b in split]
    runners = [StageRunner.for_tokens(s, 256, 4) for s in stages]
    ids = list(range(5, 30))
    ref = full_forward(whole, ref_runner, ids)
    x = stages[0].embed(torch.tensor(ids))
    for r in runners:
        x = r.forward(x, [SeqChunk(0, 0, len(ids))])
    torch.testing.assert_close(stages[0].logits(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_fragmented_paged_cache_equals_contiguous(tiny_models, arch):
    d, _ = tiny_models[arch]
    stage = StageModel.from_pretrained(d)
    ids = list(range(1, 30))
    contiguous = StageRunner.for_tokens(stage, 512, 4)
    ref = []
    for i, t in enumerate(ids):
        ref.append(stage.logits(contiguous.forward(stage.embed(torch.tensor([t])), [SeqChunk(1, i, 1)]))[0])
    # interleave two other sequences so seq 1's blocks are scattered and out of order
    frag = StageRunner.for_tokens(stage, 512, 4)
    got = []
    for i, t in enumerate(ids):
        frag.forward(stage.embed(torch.tensor([t, t])), [SeqChunk(2, i, 1), SeqChunk(3, i, 1)])
        got.append(stage.logits(frag.forward(stage.embed(torch.tensor([t])), [SeqChunk(1, i, 1)]))[0])
    table = frag.blocks.block_table(1)
    assert table != list(range(table[0], table[0] + len(table)))  # really fragmented
    torch.testing.assert_close(torch.stack(got), torch.stack(ref), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_rollback_then_redecode_gives_same_tokens(tiny_models, arch):
    d, _ = tiny_models[arch]
    stage = StageModel.from_pretrained(d)
    eng = Engine(StageRunner.for_tokens(stage, 512, 4))
    prompt = [3, 17, 42, 9, 100]
    ref = eng.generate_all(prompt, SamplingParams(max_tokens=20))
    # decode 12 tokens of a different continuation, then roll back to the prompt and redo
    runner = eng.head
    seq = prompt + [5] * 12
    runner.forward(stage.embed(torch.tensor(seq)), [SeqChunk(99, 0, len(seq))])
    out, pos, toks = [], len(prompt) - 1, list(prompt)
    for _ in range(20):
        x = runner.forward(stage.embed(torch.tensor([toks[pos]])), [SeqChunk(99, pos, 1)])
        toks.append(int(stage.logits(x)[0].argmax()))
        pos += 1
    assert toks[len(prompt):] == ref


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tree_chunk_logits_equal_sequential_paths(tiny_models, arch):
    """Each node of a tree pass sees only its ancestors: its logits equal decoding its path."""
    d, _ = tiny_models[arch]
    stage = StageModel.from_pretrained(d)
    runner = StageRunner.for_tokens(stage, 512, 4)
    prompt = list(range(10, 22))
    rng = random.Random(3)
    parents = [-1] + [rng.randrange(0, i) for i in range(1, 10)]
    tokens = [rng.randrange(128) for _ in parents]
    runner.forward(stage.embed(torch.tensor(prompt)), [SeqChunk(1, 0, len(prompt))])
    x = runner.forward(stage.embed(torch.tensor(tokens)), [SeqChunk(1, len(prompt), len(tokens), tuple(parents))])
    tree_logits = stage.logits(x)
    for i in range(len(tokens)):
        path, j = [], i
        while j >= 0:
            path.append(tokens[j])
            j = parents[j]
        seqd = StageRunner.for_tokens(stage, 512, 4)
        full = prompt + path[::-1]
        ref = full_forward(stage, seqd, full)[-1]
        torch.testing.assert_close(tree_logits[i], ref, atol=1e-4, rtol=1e-4)
    # commit the path to node 9 and continue: equals plain decoding of that path
    path, j = [], 9
    while j >= 0:
        path.append(j)
        j = parents[j]
    keep = tuple(sorted(path))
    nxt = 7
    x = runner.forward(stage.embed(torch.tensor([nxt])),
                       [SeqChunk(1, len(prompt) + len(keep), 1, commit=(len(prompt), keep))])
    full = prompt + [tokens[k] for k in keep] + [nxt]
    torch.testing.assert_close(stage.logits(x)[0], full_forward(stage, StageRunner.for_tokens(stage, 512, 4), full)[-1],
                               atol=1e-4, rtol=1e-4)


def test_mistral_sliding_window_matters(tiny_models):
    """The window is really applied: turning it off changes logits past the window."""
    d, hf = tiny_models["mistral"]
    ids = list(range(1, 30))
    cfg = ModelConfig.from_dir(d)
    assert cfg.sliding_window == 9
    cfg.sliding_window = None
    stage = StageModel.from_pretrained(d, config=cfg)
    no_window = full_forward(stage, StageRunner.for_tokens(stage, 256, 4), ids)
    assert (no_window[-1] - hf_logits(hf, ids)[-1]).abs().max() > 1e-3


def test_batched_engine_equals_solo(tiny_models):
    d, _ = tiny_models["qwen2"]
    stage = StageModel.from_pretrained(d)
    prompts = [[1, 2, 3], list(range(5, 25)), [7] * 9, [100, 3]]
    solo = [Engine(StageRunner.for_tokens(stage, 512, 4)).generate_all(p, SamplingParams(max_tokens=15)) for p in prompts]
    eng = Engine(StageRunner.for_tokens(stage, 2048, 4), max_batch_tokens=16)
    seqs = [eng.add(p, SamplingParams(max_tokens=15)) for p in prompts]
    while eng.has_work:
        eng.step()
    assert [s.output for s in seqs] == solo
    assert eng.head.blocks.num_free == eng.head.blocks.num_blocks  # finished sequences freed their KV


def test_split_engine_equals_single(tiny_models):
    d, _ = tiny_models["llama"]
    whole = StageModel.from_pretrained(d)
    ref = Engine(StageRunner.for_tokens(whole, 512)).generate_all([4, 8, 15, 16, 23, 42], SamplingParams(max_tokens=24))
    head = StageModel.from_pretrained(d, layers=range(0, 1))
    rest = [StageModel.from_pretrained(d, layers=range(a, b), embed=False, head=False) for a, b in [(1, 3), (3, 4)]]
    eng = Engine(StageRunner.for_tokens(head, 512), LocalPipeline([StageRunner.for_tokens(s, 512) for s in rest]))
    assert eng.generate_all([4, 8, 15, 16, 23, 42], SamplingParams(max_tokens=24)) == ref


def test_seeded_sampling_is_reproducible(tiny_models):
    d, _ = tiny_models["qwen3"]
    stage = StageModel.from_pretrained(d)
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=20)
    a = Engine(StageRunner.for_tokens(stage, 512)).generate_all([1, 2, 3], p)
    b = Engine(StageRunner.for_tokens(stage, 512)).generate_all([1, 2, 3], p)
    c = Engine(StageRunner.for_tokens(stage, 512)).generate_all([1, 2, 3], SamplingParams(temperature=1.0, seed=99, max_tokens=20))
    assert a == b and a != c


def test_layer_range_out_of_bounds(tiny_models):
    d, _ = tiny_models["llama"]
    with pytest.raises(ValueError, match="outside the model's 0:4"):
        StageModel.from_pretrained(d, layers=range(2, 9))


def test_unsupported_architecture_named():
    with pytest.raises(ConfigError, match="supported: llama, mistral, qwen2, qwen3"):
        ModelConfig.from_hf({"model_type": "gpt2", "hidden_size": 8, "num_attention_heads": 2,
                             "num_hidden_layers": 1, "intermediate_size": 8, "vocab_size": 8})
