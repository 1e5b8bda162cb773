"""dllm.eval: perplexity against HF transformers' logits, per-token NLLs and their prefixes,
greedy agreement. A tiny random llama (the session's HF oracle model)."""
import math

import pytest
import torch
import torch.nn.functional as F

from dllm.eval import greedy_agreement, perplexity, perplexity_of, token_nll
from dllm.model.stage import StageModel

IDS = [(11 * i + 3) % 97 for i in range(300)]  # longer than one LOGIT_ROWS pass of the head


@pytest.fixture(scope="module")
def llama(tiny_models):
    d, hf = tiny_models["llama"]
    return StageModel.from_pretrained(d), hf


def test_perplexity_matches_hf_logits(llama):
    stage, hf = llama
    with torch.no_grad():
        logits = hf(torch.tensor([IDS])).logits[0, :-1].float()
    ref = F.cross_entropy(logits, torch.tensor(IDS[1:]), reduction="none")
    nll = token_nll(stage, IDS)
    assert len(nll) == len(IDS) - 1
    torch.testing.assert_close(torch.tensor(nll), ref, rtol=1e-4, atol=1e-4)
    assert perplexity(stage, IDS) == pytest.approx(math.exp(ref.mean().item()), rel=1e-4)


def test_prefix_perplexity_from_one_pass_equals_a_pass_over_the_prefix(llama):
    stage, _ = llama
    nll = token_nll(stage, IDS)
    for n in (2, 40, 257, len(IDS)):
        assert perplexity_of(nll, n) == pytest.approx(perplexity(stage, IDS[:n]), rel=1e-5)
    assert perplexity_of(nll) == perplexity_of(nll, len(IDS))
    for bad in (1, len(IDS) + 1):
        with pytest.raises(ValueError, match="tokens"):
            perplexity_of(nll, bad)


def test_perplexity_refuses_what_it_cannot_score(llama, tiny_models):
    stage, _ = llama
    with pytest.raises(ValueError, match="at least two tokens"):
        perplexity(stage, [5])
    d, _ = tiny_models["llama"]
    part = StageModel.from_pretrained(d, layers=range(0, 1), embed=True, head=False)
    with pytest.raises(ValueError, match="whole model"):
        perplexity(part, IDS)


def test_greedy_agreement():
    assert greedy_agreement([1, 2, 3, 4], [1, 2, 3, 4]) == {"share": 1.0, "prefix": 4, "tokens": 4}
    assert greedy_agreement([1, 2, 3, 4], [1, 9, 3, 4]) == {"share": 0.75, "prefix": 1, "tokens": 4}
    assert greedy_agreement([1, 2, 3], [1, 2]) == {"share": 1.0, "prefix": 2, "tokens": 2}
    assert greedy_agreement([], []) == {"share": 1.0, "prefix": 0, "tokens": 0}
