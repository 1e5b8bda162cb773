"""Quality measures for a model variant (a quantization, a dtype) against its reference.

``perplexity`` scores a token sequence with one prefill of a StageModel (next-token NLL over
every position; ``token_nll`` keeps them per token, so one pass also gives every prefix's); ``greedy_agreement`` compares two greedy continuations token by token. Used by
the quantization tests and bench/quant_quality.py.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dllm.batch import SeqChunk
from dllm.model.runner import StageRunner
from dllm.model.stage import StageModel

LOGIT_ROWS = 256  # head rows per pass: [256, 151936] fp32 logits is 155 MB


@torch.inference_mode()
def token_nll(model: StageModel, ids: list[int]) -> list[float]:
    """Next-token NLL of ids[1:] under a whole model (embedding + all layers + head), one
    prefill: entry i scores ids[i + 1] given ids[:i + 1], so a prefix's NLLs are a prefix of
    these (causal attention)."""
    if not (model.has_embed and model.has_head and len(model.layers) == model.config.num_layers):
        raise ValueError("perplexity needs a whole model (embedding, every layer and the head)")
    if len(ids) < 2:
        raise ValueError("perplexity needs at least two tokens")
    runner = StageRunner.for_tokens(model, len(ids) + 16)
    hidden = runner.forward(model.embed(torch.tensor(ids)), [SeqChunk(0, 0, len(ids))])
    targets = torch.tensor(ids[1:])
    nll = []
    for i in range(0, len(ids) - 1, LOGIT_ROWS):
        logits = model.logits(hidden[i:min(i + LOGIT_ROWS, len(ids) - 1)])
        nll += F.cross_entropy(logits, targets[i:i + logits.shape[0]], reduction="none").tolist()
    return nll


def perplexity_of(nll: list[float], tokens: int | None = None) -> float:
    """exp(mean NLL) of the first ``tokens`` tokens (all by default) from token_nll's list."""
    n = len(nll) if tokens is None else tokens - 1
    if not 1 <= n <= len(nll):
        raise ValueError(f"{tokens} tokens: the list scores {len(nll) + 1}")
    return math.exp(math.fsum(nll[:n]) / n)


def perplexity(model: StageModel, ids: list[int]) -> float:
    """exp(mean next-token NLL) of ``ids`` under a whole model (embedding + all layers + head)."""
    return perplexity_of(token_nll(model, ids))


def greedy_agreement(reference: list[int], candidate: list[int]) -> dict:
    """share: fraction of positions with the same token; prefix: tokens before the first difference."""
    n = min(len(reference), len(candidate))
    same = [a == b for a, b in zip(reference[:n], candidate[:n])]
    prefix = same.index(False) if False in same else n
    return {"share": round(sum(same) / n, 3) if n else 1.0, "prefix": prefix, "tokens": n}
