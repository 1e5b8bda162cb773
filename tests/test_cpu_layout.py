"""The two fp32 CPU weight layouts (StageModel.optimize_cpu_layout): "batched" (oneDNN packed,
a row the same bits alone or batched) and "single" (input-major for MKL's sgemv, one sequence
without drafts). Both compute the same model: the same greedy tokens, HF's included."""
import pytest
import torch

from dllm.engine import Engine
from dllm.errors import ConfigError
from dllm.launch import local_engine
from dllm.model.quant import GemvWeight, PackedWeight
from dllm.model.runner import StageRunner
from dllm.model.stage import StageModel
from dllm.sampling import SamplingParams
from dllm.spec.drafters import NgramDrafter

from .conftest import TINY_ARCHS
from .models import model_dir_or_skip


@pytest.mark.parametrize("shape", [(96, 64), (960, 576), (577, 1536), (17, 33)])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_gemv_weight_matches_the_dense_matmul(shape, rows):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=g)
    x = torch.randn(rows, shape[1], generator=g)
    gw = GemvWeight(w)
    torch.testing.assert_close(gw.forward(x), x @ w.t(), atol=1e-4, rtol=1e-4)
    assert torch.equal(gw.dense(), w)


def layout_kinds(stage: StageModel) -> set[type]:
    return {type(m) for m in stage.modules() if isinstance(m, (GemvWeight, PackedWeight))}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_single_layout_decodes_what_the_batched_one_does(tiny_models, arch):
    d, _ = tiny_models[arch]
    prompt = [3, 17, 99, 4, 56, 8, 1, 120, 33]
    out = {}
    for layout in ("batched", "single"):
        engine = local_engine(d, dtype="float32", kv_tokens=256, cpu_layout=layout)
        assert engine.model.cpu_layout == layout
        assert layout_kinds(engine.model) == {GemvWeight if layout == "single" else PackedWeight}
        out[layout] = engine.generate_all(prompt, SamplingParams(max_tokens=24, ignore_eos=True))
    assert out["single"] == out["batched"]


def test_single_layout_round_trips_to_the_batched_one(tiny_models):
    d, _ = tiny_models["qwen2"]
    stage = StageModel.from_pretrained(d)
    dense = {n: w.dense() for n, w in stage.named_modules() if isinstance(w, PackedWeight)}
    stage.optimize_cpu_layout("single")
    assert {n: w.dense() for n, w in stage.named_modules() if isinstance(w, GemvWeight)}.keys() == dense.keys()
    stage.optimize_cpu_layout("batched")
    for n, w in stage.named_modules():
        if isinstance(w, PackedWeight):
            assert torch.equal(w.dense(), dense[n]), n
    with pytest.raises(ValueError, match="unknown CPU layout 'fast'"):
        stage.optimize_cpu_layout("fast")


def test_single_layout_refuses_drafts_and_batches(tiny_models):
    d, _ = tiny_models["llama"]
    with pytest.raises(ConfigError, match="cannot verify drafts"):
        local_engine(d, kv_tokens=128, cpu_layout="single", drafter=NgramDrafter())
    with pytest.raises(ConfigError, match="one sequence at a time"):
        local_engine(d, kv_tokens=128, cpu_layout="single", max_seqs=4)
    assert local_engine(d, kv_tokens=128, cpu_layout="single").max_seqs == 1


def test_one_shot_run_takes_the_single_layout_only_without_a_drafter(tiny_models):
    from dllm.cli import build_engine

    d, _ = tiny_models["llama"]
    cases = [(dict(one_sequence=True), "single"), (dict(one_sequence=True, draft="ngram"), "batched"),
             (dict(one_sequence=False), "batched"), (dict(one_sequence=True, quant="int8"), None)]
    for kw, layout in cases:
        engine, cleanup = build_engine(d, dtype="float32", kv_tokens=128, **kw)
        try:
            assert engine.model.cpu_layout == layout, kw
        finally:
            cleanup()


def test_single_layout_greedy_64_tokens_identical_to_hf_smollm2():
    from .models import hf_gguf_model
    from .test_real_models import hf_greedy, prompts_for

    model_dir = model_dir_or_skip("smollm2")
    hf = hf_gguf_model("smollm2")
    stage = StageModel.from_pretrained(model_dir, cpu_layout="single")
    assert layout_kinds(stage) == {GemvWeight}
    for ids in prompts_for(model_dir)[:2]:
        engine = Engine(StageRunner.for_tokens(stage, 1024), max_seqs=1)
        ours = engine.generate_all(ids, SamplingParams(max_tokens=64, ignore_eos=True))
        assert ours == hf_greedy(hf, ids, 64)
