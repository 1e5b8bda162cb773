"""TreePlanner: pick the draft tree's depth and width from measured costs. Pure Python.

Sequoia-style cost model. One speculative pass costs

    T(d, w) = draft(d, w) + verify(n)        with n = 1 + d * w nodes,
    verify(n) = c0 + c1 * n                  (c0 holds the network round trip),

and commits E(d, w) tokens in expectation. The planner maximises E / T. With acceptance a1
for the main chain's next token and as for "a runner-up sibling is right when the main one
is not", the expected committed tokens of a chain of depth d with (w - 1) side leaves per level:

    E = 1 + sum_{k=1..d} a1^(k-1) * (a1 + (1 - a1) * as_w)

(1 for the bonus token; a side leaf ends the walk, so it adds one token and stops). Higher RTT
raises c0, which makes each pass dearer and favours deeper and wider trees; a poor drafter
lowers a1 and the planner shrinks the tree toward a plain step.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _LinearFit:
    """Online least squares y = c0 + c1 * x with exponential forgetting."""

    decay: float = 0.95
    sw: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0

    def add(self, x: float, y: float) -> None:
        d = self.decay
        self.sw, self.sx, self.sy = d * self.sw + 1, d * self.sx + x, d * self.sy + y
        self.sxx, self.sxy = d * self.sxx + x * x, d * self.sxy + x * y

    def coef(self, default: tuple[float, float]) -> tuple[float, float]:
        if self.sw < 2:
            return default
        var = self.sxx / self.sw - (self.sx / self.sw) ** 2
        if var <= 1e-12:  # only one x seen so far: attribute everything to the intercept
            return max(self.sy / self.sw - default[1] * self.sx / self.sw, 0.0), default[1]
        c1 = (self.sxy / self.sw - self.sx * self.sy / self.sw ** 2) / var
        c1 = max(c1, 0.0)
        return max(self.sy / self.sw - c1 * self.sx / self.sw, 0.0), c1


class TreePlanner:
    def __init__(self, max_depth: int = 8, max_width: int = 4, max_nodes: int = 64,
                 prior_a1: float = 0.6, prior_as: float = 0.2, ema: float = 0.05,
                 prior_verify: tuple[float, float] = (0.02, 0.001), prior_draft_step: float = 0.002):
        self.max_depth, self.max_width, self.max_nodes = max_depth, max_width, max_nodes
        self.a1, self.a_side = prior_a1, prior_as
        self.ema = ema
        self.verify_fit = _LinearFit()
        self.prior_verify = prior_verify
        self.draft_step = prior_draft_step
        self._shape = (min(4, max_depth), 1)
        self._calls = 0

    # ---- observations ----------------------------------------------------------------------------
    def observe(self, tree, accepted: list[int]) -> None:
        """Update acceptance rates from one verified tree (DraftTree, accepted node path)."""
        e = self.ema
        for k in range(len(accepted)):
            node = accepted[k]
            kids = tree.children(node)
            if not kids:
                break
            main = kids[0]
            nxt = accepted[k + 1] if k + 1 < len(accepted) else None
            hit_main = nxt == main
            self.a1 += e * ((1.0 if hit_main else 0.0) - self.a1)
            if not hit_main and len(kids) > 1:
                self.a_side += e * ((1.0 if nxt is not None else 0.0) - self.a_side)
        self._shape = self._best()

    def observe_verify(self, n_nodes: int, seconds: float) -> None:
        """Wall time of one pass over n nodes through every stage (round trip included)."""
        self.verify_fit.add(n_nodes, seconds)
        self._shape = self._best()

    def observe_draft(self, depth: int, seconds: float) -> None:
        if depth > 0:
            self.draft_step += self.ema * (seconds / depth - self.draft_step)

    # ---- decision ---------------------------------------------------------------------------------
    def expected_tokens(self, depth: int, width: int) -> float:
        side = self.a_side if width > 1 else 0.0
        return 1.0 + sum(self.a1 ** (k - 1) * (self.a1 + (1 - self.a1) * side) for k in range(1, depth + 1))

    def pass_time(self, depth: int, width: int) -> float:
        c0, c1 = self.verify_fit.coef(self.prior_verify)
        return self.draft_step * depth + c0 + c1 * (1 + depth * width)

    def _best(self) -> tuple[int, int]:
        best, best_rate = (0, 1), 1.0 / self.pass_time(0, 1)
        for d in range(1, self.max_depth + 1):
            for w in range(1, self.max_width + 1):
                if 1 + d * w > self.max_nodes:
                    continue
                rate = self.expected_tokens(d, w) / self.pass_time(d, w)
                if rate > best_rate * 1.0001:
                    best, best_rate = (d, w), rate
        return best

    def shape(self) -> tuple[int, int]:
        """(depth, width) for the next pass. When drafting does not pay, still probe a depth-1
        draft every 16th pass so a drafter that improves (new context, new topic) is noticed."""
        self._calls += 1
        if self._shape[0] == 0 and self._calls % 16 == 0:
            return (1, 1)
        return self._shape
