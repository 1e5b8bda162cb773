"""Speculation on real checkpoints is exactly plain greedy: SmolLM2 under random, always-wrong
and oracle draft trees over 1, 2 and 3 stages, and the real Qwen2.5-Coder-0.5B -> 1.5B pair
with planner-grown trees over 2 stages (fp32)."""
import random

import pytest

from dllm.engine import Engine, LocalPipeline
from dllm.model.runner import StageRunner
from dllm.model.stage import StageModel
from dllm.sampling import SamplingParams
from dllm.tokenizer import Tokenizer
from tests.models import model_dir_or_skip
from tests.test_speculative import RandomTreeDrafter

PROMPTS = ["Write a Python function that reverses a string.", "Why is the sea salty? Answer briefly."]
NEW_TOKENS = 24


def stages(d, split, kv_tokens=1024):
    """(head runner, pipeline or None) for ``split``, stage 0 holding embedding and head."""
    head = StageModel.from_pretrained(d, layers=range(*split[0]))
    rest = [StageRunner.for_tokens(StageModel.from_pretrained(d, layers=range(a, b), embed=False, head=False),
                                   kv_tokens, 16) for a, b in split[1:]]
    return StageRunner.for_tokens(head, kv_tokens, 16), LocalPipeline(rest) if rest else None


def ref_oracle(full: list[int], rng: random.Random, vocab: int):
    """Greedy's next token for any prefix of the reference sequence ``full``; off it (below a
    node greedy would not take) any token does, since the walk never gets there."""
    def next_token(ctx):
        return full[len(ctx)] if len(ctx) < len(full) and full[:len(ctx)] == ctx else rng.randrange(vocab)
    return next_token


@pytest.mark.parametrize("split", [[(0, 30)], [(0, 15), (15, 30)], [(0, 8), (8, 21), (21, 30)]],
                         ids=["1-stage", "2-stage", "3-stage"])
def test_smollm2_any_draft_tree_gives_greedy(split):
    d = model_dir_or_skip("smollm2")
    tok = Tokenizer.from_dir(d)
    head, pipe = stages(d, split)
    vocab = head.model.config.vocab_size
    rng = random.Random(len(split))
    cases = 0
    for text in PROMPTS:
        prompt = tok.encode_chat([{"role": "user", "content": text}])
        ref = Engine(head, pipe).generate_all(prompt, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
        oracle = ref_oracle(prompt + ref, rng, vocab)
        for kind, p_right, wrong in [("wrong", 0.0, True), ("random", 0.0, False), ("mostly-right", 0.7, False),
                                     ("oracle", 1.0, False)]:
            drafter = RandomTreeDrafter(rng, vocab, oracle, p_right, max_nodes=10, wrong=wrong)
            eng = Engine(head, pipe, drafter=drafter, spec_depth=rng.randint(2, 6))
            out = eng.generate_all(prompt, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
            assert out == ref, (kind, text)
            if kind == "wrong":
                assert eng.stats.mean_accepted == 1.0  # every pass commits only the bonus token
            if kind == "oracle":
                assert eng.stats.mean_accepted > 2.0
            cases += 1
    assert cases == 8


def test_real_draft_pair_with_grown_trees_gives_greedy():
    """Qwen2.5-Coder-0.5B drafts (int4, as `dllm run` drafts) for Qwen2.5-Coder-1.5B split over
    two stages, trees grown by the planner's rule: the target's plain greedy tokens."""
    from dllm.spec.drafters import ModelDrafter, check_draft_compatible
    from dllm.spec.planner import TreePlanner

    target, draft = model_dir_or_skip("qwen-coder-1.5b"), model_dir_or_skip("qwen-coder-0.5b")
    check_draft_compatible(target, draft)
    tok = Tokenizer.from_dir(target)
    head, pipe = stages(target, [(0, 14), (14, 28)])
    drafter = ModelDrafter.from_pretrained(draft, dtype="auto")
    for text in PROMPTS:
        prompt = tok.encode_chat([{"role": "user", "content": text}])
        ref = Engine(head, pipe).generate_all(prompt, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
        eng = Engine(head, pipe, drafter=drafter, planner=TreePlanner(max_depth=12, max_width=3))
        assert eng.generate_all(prompt, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)) == ref, text
        assert eng.stats.mean_accepted > 1.5, eng.stats.mean_accepted  # the real pair does agree
