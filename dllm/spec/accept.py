"""Acceptance of a verified DraftTree: greedy walk or lossless speculative sampling.

Sampling (temperature > 0) treats each drafted child as a point-mass proposal: child x is
accepted with probability p(x) under the target's (filtered) distribution p at its parent;
on rejection x is removed from p, p is renormalised and the next sibling is tried; when none
is left, the bonus token is drawn from what remains. Then P(emit y) = p(y) exactly for every
y, whatever the drafts are (SpecInfer's multi-branch rule with deterministic drafts).
"""
from __future__ import annotations

import torch

from dllm.sampling import sample_from
from dllm.spec.tree import DraftTree, greedy_accept


def sample_accept(tree: DraftTree, probs: torch.Tensor, generator: torch.Generator) -> tuple[list[int], int]:
    """probs [n_nodes, V]: target distribution after each node. Returns (accepted nodes, bonus)."""
    node, accepted = 0, [0]
    while True:
        p = probs[node]
        chosen = None
        for c in tree.children(node):
            x = tree.tokens[c]
            px = float(p[x])
            if px <= 0.0:
                continue
            if float(torch.rand((), generator=generator)) < px:
                chosen = c
                break
            p = p.clone()
            p[x] = 0.0
            p = p / p.sum()
        if chosen is None:
            return accepted, int(sample_from(p, generator))
        accepted.append(chosen)
        node = chosen


__all__ = ["greedy_accept", "sample_accept"]
