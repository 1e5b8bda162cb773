"""Quality of the weight-only quantized CPU models against fp32 on real checkpoints.

Perplexity of the committed sample (bench/data/perplexity_sample.txt, the Apache License 2.0:
all of it, ~2.2k tokens, for SmolLM2 and Qwen2.5-Coder-0.5B; the first 256 tokens for
Qwen2.5-Coder-1.5B, whose fp32 load + prefill is the slow part of this file) and greedy
agreement of 64 tokens on a chat-templated prompt. Targets: int8 within 3% of fp32, int4
within 8%.

The first 512 tokens (the licence's preamble, which these models all but recite: fp32
perplexity 3.0 on the 0.5B) are the hardest slice for Qwen2.5-Coder-0.5B's int4: +11.0% there
against +4.9% on the whole sample, because its GGUF source is mostly 5-bit Q5_0, which 4-bit
codes cannot hold (bench/quant_quality.py's int4_ppl_by_kind shows where). One pass gives both
(dllm.eval.token_nll); the slice is pinned below so it cannot silently get worse.

Each model is loaded once per mode (fp32, int8, int4) through local_engine; perplexity runs on
the engine's stage and greedy decoding through the engine. bench/quant_quality.py measures more
(every model on the whole sample, several prompts, bytes per token).
"""
import functools
import gc
from pathlib import Path

import pytest
import torch

from .models import model_dir_or_skip

SAMPLE = Path(__file__).resolve().parent.parent / "bench" / "data" / "perplexity_sample.txt"
PPL_TOKENS = {"smollm2": None, "qwen-coder-0.5b": None, "qwen-coder-1.5b": 256}  # None: the whole sample
SLICE = 512  # the hardest prefix, also reported
GREEDY_MODELS = ("smollm2", "qwen-coder-0.5b")  # 64 fp32 decode steps of the 1.5B cost ~30 s here: bench only
GREEDY_TOKENS = 64
CHAT = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Explain in a few sentences why the sky is blue, then give one example in Python."}]

pytestmark = pytest.mark.slow


@functools.cache
def measure(name: str, mode: str) -> dict:
    """Load ``name`` once as ``mode`` and return its perplexity (and greedy tokens where wanted);
    the model itself is dropped before the next load (the 1.5B in fp32 is 6 GB)."""
    from dllm.eval import perplexity_of, token_nll
    from dllm.launch import local_engine
    from dllm.sampling import SamplingParams
    from dllm.tokenizer import Tokenizer

    model_dir = model_dir_or_skip(name)
    tok = Tokenizer.from_dir(model_dir)
    ids = tok.encode(SAMPLE.read_text())[:PPL_TOKENS[name]]
    engine = local_engine(model_dir, quant=None if mode == "fp32" else mode, kv_tokens=len(ids) + 128)
    nll = token_nll(engine.model, ids)
    out = {"ppl": perplexity_of(nll), "tokens": len(ids), "ppl_slice": perplexity_of(nll, min(SLICE, len(ids)))}
    if name in GREEDY_MODELS and mode in ("fp32", "int8"):
        prompt = tok.encode_chat(CHAT)
        out["greedy"] = engine.generate_all(prompt, SamplingParams(max_tokens=GREEDY_TOKENS, ignore_eos=True))
        if mode == "fp32":
            out["margins"] = top2_margins(engine.model, prompt, out["greedy"])
    del engine
    gc.collect()
    return out


@torch.inference_mode()
def top2_margins(model, prompt: list[int], greedy: list[int]) -> list[float]:
    """fp32 logit gap between the best and second-best token at each greedy step (one prefill)."""
    from dllm.batch import SeqChunk
    from dllm.model.runner import StageRunner

    ctx = prompt + greedy
    runner = StageRunner.for_tokens(model, len(ctx) + 16)
    hidden = runner.forward(model.embed(torch.tensor(ctx)), [SeqChunk(0, 0, len(ctx))])
    top = model.logits(hidden[len(prompt) - 1:-1]).topk(2)
    assert top.indices[:, 0].tolist() == greedy  # the prefill reproduces the decode steps
    return (top.values[:, 0] - top.values[:, 1]).tolist()


def loss(name: str, mode: str) -> float:
    """Relative perplexity increase of ``mode`` over fp32 on the same tokens."""
    return measure(name, mode)["ppl"] / measure(name, "fp32")["ppl"] - 1


def report(record_property, name, mode):
    m, ref = measure(name, mode), measure(name, "fp32")
    text = (f"{name} {mode}: ppl {m['ppl']:.3f} vs fp32 {ref['ppl']:.3f} "
            f"({100 * loss(name, mode):+.1f}%, {m['tokens']} tokens)")
    record_property(f"{name}-{mode}", text)
    print(text)
    return text


@pytest.mark.parametrize("name", ["smollm2", "qwen-coder-0.5b", "qwen-coder-1.5b"])
def test_int8_perplexity_within_3_percent(name, record_property):
    text = report(record_property, name, "int8")
    assert loss(name, "int8") < 0.03, text


@pytest.mark.parametrize("name", ["smollm2", "qwen-coder-0.5b", "qwen-coder-1.5b"])
def test_int4_perplexity_within_8_percent(name, record_property):
    text = report(record_property, name, "int4")
    assert loss(name, "int4") < 0.08, text


def test_int4_qwen_coder_05b_hardest_slice_is_as_reported(record_property):
    """Its first 512 tokens: +11.0% measured (3.004 -> 3.334), pinned so it cannot grow unnoticed."""
    m, ref = measure("qwen-coder-0.5b", "int4"), measure("qwen-coder-0.5b", "fp32")
    slice_loss = m["ppl_slice"] / ref["ppl_slice"] - 1
    text = f"qwen-coder-0.5b int4, first {SLICE} tokens: {100 * slice_loss:+.1f}% ({ref['ppl_slice']:.3f} -> {m['ppl_slice']:.3f})"
    record_property("qwen-coder-0.5b-int4-slice", text)
    print(text)
    assert 0 < slice_loss < 0.13, text


def agreement(name, record_property):
    from dllm.eval import greedy_agreement

    ref = measure(name, "fp32")
    a = greedy_agreement(ref["greedy"], measure(name, "int8")["greedy"])
    text = (f"{name} int8 vs fp32 greedy, {GREEDY_TOKENS} tokens of a chat prompt: "
            f"share {a['share']}, prefix {a['prefix']}")
    if a["prefix"] < a["tokens"]:
        text += f", fp32 top-2 margin there {ref['margins'][a['prefix']]:.3f}"
    record_property(f"{name}-greedy", text)
    print(text)
    assert a["tokens"] == GREEDY_TOKENS
    return a, ref["margins"], text


# position-by-position share: once the two continuations part, the rest is shifted and mostly counts as
# different, so the share mostly says where the first near-tie came
@pytest.mark.parametrize("name", [
    "smollm2",  # measured share 0.594, prefix 36 (fp32 margin 0.16 there)
    pytest.param("qwen-coder-0.5b", marks=pytest.mark.xfail(
        strict=False, reason="measured share 0.453, prefix 27: fp32's own top two tokens at step 27 are 0.055 "
                             "logits apart (' that' 17.295, ' of' 17.240) and int8 swaps them; a near-tie, so "
                             "another CPU's rounding may land either way (hence not strict)")),
])
def test_int8_greedy_share_at_least_half(name, record_property):
    a, _, text = agreement(name, record_property)
    assert a["share"] >= 0.5, text


@pytest.mark.parametrize("name", GREEDY_MODELS)
def test_int8_changes_greedy_only_at_a_near_tie(name, record_property):
    """The first token where int8 parts from fp32 is one where fp32 itself was nearly undecided."""
    a, margins, text = agreement(name, record_property)
    if a["prefix"] < a["tokens"]:
        assert margins[a["prefix"]] < 0.5, text
