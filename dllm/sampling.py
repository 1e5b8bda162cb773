"""Token sampling: greedy, temperature, top-k, top-p, seeded — without host syncs.

Random choice uses the exponential-race trick (argmax of p / Exp(1) noise is a sample from p),
so a whole batch is chosen with tensor ops and no ``.item()``; each sequence draws its noise
from its own seeded generator, so a seeded request gives the same tokens whatever it is
batched with.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dllm.errors import RequestError


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self):
        if not 0.0 <= self.temperature <= 100.0:
            raise RequestError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1, got {self.max_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def make_generator(seed: int | None, device="cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[V] float32 logits -> [V] probabilities after temperature, top-k and top-p."""
    logits = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        cum = sorted_p.cumsum(-1)
        # keep the smallest prefix whose mass reaches top_p (the token crossing it included)
        drop = (cum - sorted_p) >= params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
        probs = probs / probs.sum()
    return probs


def sample_from(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw from probs [V] by the exponential race; returns a 0-d long tensor."""
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return torch.argmax(probs / noise)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> torch.Tensor:
    """logits [N, V] -> tokens [N] (long), one per row with that row's params."""
    out = torch.argmax(logits, dim=-1)
    for i, p in enumerate(params):
        if not p.greedy:
            out[i] = sample_from(filtered_probs(logits[i], p), generators[i])
    return out
