"""TreePlanner: pick the draft tree's depth and width from measured costs. Pure Python.

Sequoia-style cost model. One speculative pass costs

    T(d, w) = draft(d, w) + verify(n)        with n = 1 + d * w nodes,
    verify(n) = c0 + c1 * n                  (c0 holds the network round trip),

and commits E(d, w) tokens in expectation. The planner maximises E / T. With acceptance a1
for the main chain's next token and as for "a runner-up sibling is right when the main one
is not", the expected committed tokens of a chain of depth d with (w - 1) side leaves per level:

    E = 1 + sum_{k=1..d} A_(k-1) * (a_k + (1 - a_k) * as_w),    A_k = a_1 * ... * a_k

(1 for the bonus token; a side leaf ends the walk, so it adds one token and stops), with a_k
the main child's acceptance at depth k, measured per depth (it is not one constant: misses
cluster) and shrunk toward the overall rate a1 where a depth has few observations. Higher RTT
raises c0, which makes each pass dearer and favours deeper and wider trees; a poor drafter
lowers a1 and the planner shrinks the tree toward a plain step.

Acceptance estimates move by ``max(ema, 1 / (observations + prior_weight))``: a plain average over
the first passes (the prior counts as ``prior_weight`` observations), an exponential one after.
A fixed small rate alone would plan a request's first few dozen passes from the priors.
The draft-step cost is the median of the last DRAFT_WINDOW measurements (the prior until the
first): a draft's first steps on a new row count or after a long idle run several times slower
(Qwen2.5-Coder-0.5B int4 on 2 cores: 84 ms a step in the first passes, 14 ms after), and a mean
carried those into a dozen passes planned as if drafting did not pay.

The shape above is a plan for an average pass. Inside one pass the drafter knows more: its own
probability of each candidate. ``growth()`` hands it a ``GrowthRule`` (EAGLE-2-style dynamic
trees, decided by marginal value): a node whose path the draft gives probability q is worth
verifying when q >= R * c1, and one more draft step when the main path's probability is still
>= R * (draft step + c1), where R is the rate (tokens/s) passes achieve now. That is the
ratio-maximising (Dinkelbach) test: an item raises tokens / time iff its own tokens / time beats
the current ratio. So confident stretches get deep chains, uncertain levels get siblings, and
drafting stops where the draft starts guessing. Replayed on the real Qwen2.5-Coder-0.5B ->
1.5B pair with this machine's costs (14 ms a draft step, 135 ms + 4.4 ms a node of verify): a
fixed depth-4 chain commits 3.56 tokens a pass, the best fixed chain (depth 6) 4.36, the rule
5.2-5.6, which is 1.21-1.28x the depth-4 chain's tokens/s at RTT 0-50 ms, stable for R within
0.6-1.0x of its own rate.
"""
from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

DRAFT_WINDOW = 15  # recent draft steps whose median is the draft-step cost
NODE_COST_FLOOR = 0.002  # a verified node costs at least this share of a pass's fixed cost c0
RATE_EMA = 0.1  # weight of the newest pass in the measured tokens/s that growth rules must beat


@dataclass(frozen=True)
class GrowthRule:
    """How far a drafter grows this pass's tree (see the module doc). Probabilities are the
    draft's own path probabilities (product of its softmax along the path). A drafter without
    probabilities (n-gram lookup, a remote drafter asked over the wire) keeps to the planned
    shape instead."""

    rate: float       # tokens/s a pass achieves now: R
    node_cost: float  # s one more verified node costs: c1
    step_cost: float  # s one more draft step costs
    depth: int = 1    # the planner's shape for the pass, for drafters that cannot use the rule
    width: int = 1

    def worth_node(self, q: float) -> bool:
        """Verify a node whose path the draft gives probability ``q``."""
        return q >= self.rate * self.node_cost

    def worth_step(self, q: float) -> bool:
        """Draft one more level below a main path of probability ``q``."""
        return q >= self.rate * (self.step_cost + self.node_cost)


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
    def __init__(self, max_depth: int = 12, max_width: int = 4, max_nodes: int = 64,
                 prior_a1: float = 0.6, prior_as: float = 0.2, ema: float = 0.05,
                 prior_verify: tuple[float, float] = (0.02, 0.001), prior_draft_step: float = 0.002,
                 prior_weight: float = 4.0, dynamic: bool = True):
        self.max_depth, self.max_width, self.max_nodes = max_depth, max_width, max_nodes
        self.dynamic = dynamic  # drafters grow each tree by a GrowthRule (else: the planned shape)
        self.a1, self.a_side = prior_a1, prior_as
        self.ema = ema
        self.prior_weight = prior_weight
        self._seen = {"a1": 0, "side": 0}  # observations so far, per estimate
        # per depth k: decayed (hits, trials) of the main child at depth k given the walk got there
        self._level = [[0.0, 0.0] for _ in range(max_depth)]
        self.verify_fit = _LinearFit()
        self.prior_verify = prior_verify
        self.draft_step = prior_draft_step
        self._draft_steps: deque = deque(maxlen=DRAFT_WINDOW)
        self._shape = (min(4, max_depth), 1)
        self._calls = 0
        # measured passes, decayed: (tokens committed, seconds of draft + verify)
        self._pass_tokens = self._pass_seconds = 0.0
        self._pending_tokens, self._pending_draft_s = 0, 0.0

    # ---- observations ----------------------------------------------------------------------------
    def _rate(self, name: str, prior_weight: float) -> float:
        """Step size for the next observation of one estimate (0 when ema is 0: priors frozen)."""
        if self.ema <= 0:
            return 0.0
        n = self._seen[name]
        self._seen[name] = n + 1
        return max(self.ema, 1.0 / (n + 1 + prior_weight))

    def observe(self, tree, accepted: list[int]) -> None:
        """Update acceptance rates from one verified tree (DraftTree, accepted node path)."""
        self._pending_tokens += len(accepted)  # the accepted drafts and the bonus token
        for k in range(len(accepted)):
            node = accepted[k]
            kids = tree.children(node)
            if not kids:
                break
            main = kids[0]
            nxt = accepted[k + 1] if k + 1 < len(accepted) else None
            hit_main = nxt == main
            self.a1 += self._rate("a1", self.prior_weight) * ((1.0 if hit_main else 0.0) - self.a1)
            if self.ema > 0 and k < len(self._level):
                level = self._level[k]
                level[0] = (1 - self.ema) * level[0] + hit_main
                level[1] = (1 - self.ema) * level[1] + 1
            if not hit_main and len(kids) > 1:
                self.a_side += self._rate("side", self.prior_weight) * ((1.0 if nxt is not None else 0.0) - self.a_side)
        self._shape = self._best()

    def observe_verify(self, n_nodes: int, seconds: float) -> None:
        """Wall time of one pass over n nodes through every stage (round trip included); it
        closes the pass whose drafts and acceptance were observed since the last call."""
        self.verify_fit.add(n_nodes, seconds)
        if self._pending_tokens:
            keep = 1 - RATE_EMA
            self._pass_tokens = keep * self._pass_tokens + self._pending_tokens
            self._pass_seconds = keep * self._pass_seconds + self._pending_draft_s + seconds
        self._pending_tokens, self._pending_draft_s = 0, 0.0
        self._shape = self._best()

    def observe_draft(self, depth: int, seconds: float) -> None:
        self._pending_draft_s += seconds
        if depth > 0 and self.ema > 0:
            # a time prior is a guess about the hardware: the first measurement replaces it
            self._draft_steps.append(seconds / depth)
            self.draft_step = statistics.median(self._draft_steps)

    # ---- decision ---------------------------------------------------------------------------------
    def level_acceptance(self, k: int) -> float:
        """P(the main child at depth k is right | the walk reached depth k-1): measured per depth,
        shrunk toward the overall rate a1 where a depth has few observations. Misses cluster (a
        hard stretch of text defeats the draft at every depth), so deep levels are not a1^k."""
        if k > len(self._level):
            return self.a1
        hits, trials = self._level[k - 1]
        return (hits + self.prior_weight * self.a1) / (trials + self.prior_weight)

    def expected_tokens(self, depth: int, width: int) -> float:
        side = self.a_side if width > 1 else 0.0
        total, reach = 1.0, 1.0
        for k in range(1, depth + 1):
            a = self.level_acceptance(k)
            total += reach * (a + (1 - a) * side)
            reach *= a
        return total

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

    def rate(self) -> float:
        """Tokens/s of a speculative pass now: measured over recent passes, the model's estimate
        for the best shape before any."""
        if self._pass_seconds > 0:
            return self._pass_tokens / self._pass_seconds
        d, w = self._shape
        return self.expected_tokens(d, w) / self.pass_time(d, w)

    def growth(self) -> GrowthRule:
        """The rule a drafter grows this pass's tree by, depth up to max_depth and width up to
        max_width (the planned shape only decides whether to draft at all)."""
        c0, c1 = self.verify_fit.coef(self.prior_verify)
        # a fit over a few node counts can read a flat (or noisy negative, clamped to 0) slope;
        # no node is free, and a zero cost would grow every tree to max_nodes
        return GrowthRule(self.rate(), max(c1, NODE_COST_FLOOR * c0), self.draft_step, *self._shape)

    def next_tree(self) -> tuple[int, int, GrowthRule | None]:
        """(depth, width, growth rule) bounding the next pass's tree. When drafting pays and the
        planner is dynamic: the caps and a growth rule; otherwise the planned shape (a plain step,
        or a probe of one) and None."""
        if not self.dynamic or self._shape[0] == 0:
            return (*self.shape(), None)
        self._calls += 1
        return self.max_depth, self.max_width, self.growth()

    def shape(self) -> tuple[int, int]:
        """(depth, width) for the next pass. When drafting does not pay, still probe a depth-1
        draft every 4th pass so a drafter that improves (new context, new topic) is noticed soon
        (a probe costs one draft step and one more row); when chains win, still probe side leaves
        every 16th pass, or the sibling rate stays the prior."""
        self._calls += 1
        depth, width = self._shape
        if depth == 0 and self._calls % 4 == 0:
            return (1, 1)
        if depth > 0 and width == 1 and self.max_width > 1 and self._calls % 16 == 8:
            return (depth, 2)
        return self._shape
