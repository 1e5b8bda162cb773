"""Speculative decoding is exactly greedy for any draft; sampling keeps the target distribution."""
import math
import random

import pytest
import torch

from dllm.engine import Engine, LocalPipeline
from dllm.model.runner import StageRunner
from dllm.model.stage import StageModel
from dllm.sampling import SamplingParams, filtered_probs
from dllm.spec.drafters import ModelDrafter, NgramDrafter
from dllm.spec.tree import DraftTree, greedy_accept


class RandomTreeDrafter:
    """Random tree shapes; each node is right (oracle) with probability p_right, else random.
    ``wrong=True``: at least one node, and every node a token the oracle does not choose there."""

    def __init__(self, rng, vocab, oracle=None, p_right=0.0, max_nodes=12, wrong=False):
        self.rng, self.vocab, self.oracle, self.p_right, self.max_nodes = rng, vocab, oracle, p_right, max_nodes
        self.wrong = wrong

    def propose(self, seq_id, context, depth, width, growth=None):
        tree = DraftTree.root(context[-1])
        for _ in range(self.rng.randint(1 if self.wrong else 0, self.max_nodes)):
            parent = self.rng.randrange(len(tree))
            if tree.depths()[parent] >= depth:
                continue
            if self.wrong:
                path = [tree.tokens[i] for i in tree.path(parent)]
                right = self.oracle(context + path[1:])
                tree.add(parent, (right + self.rng.randrange(1, self.vocab)) % self.vocab)
                continue
            tok = self.rng.randrange(self.vocab)
            if self.oracle is not None and self.rng.random() < self.p_right:
                path = [tree.tokens[i] for i in tree.path(parent)]
                tok = self.oracle(context + path[1:])
            tree.add(parent, tok)
        return tree

    def release(self, seq_id):
        pass


def greedy_oracle(stage):
    def next_token(ctx):
        r = StageRunner.for_tokens(stage, 512, 4)
        from dllm.batch import SeqChunk

        x = r.forward(stage.embed(torch.tensor(ctx)), [SeqChunk(0, 0, len(ctx))])
        return int(stage.logits(x[-1:])[0].argmax())
    return next_token


def build(d, split):
    head = StageModel.from_pretrained(d, layers=range(*split[0]))
    rest = [StageRunner.for_tokens(StageModel.from_pretrained(d, layers=range(a, b), embed=False, head=False), 1024, 4)
            for a, b in split[1:]]
    return head, rest


SPLITS = {1: [(0, 4)], 2: [(0, 2), (2, 4)], 3: [(0, 1), (1, 3), (3, 4)]}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("stages", [1, 2, 3])
def test_any_draft_gives_greedy_output(tiny_models, arch, stages):
    d, _ = tiny_models[arch]
    whole = StageModel.from_pretrained(d)
    oracle = greedy_oracle(whole)
    rng = random.Random(stages * 7 + len(arch))
    cases = 0
    for kind, p_right in [("wrong", 0.0), ("random", 0.3), ("mostly-right", 0.8), ("oracle", 1.0)]:
        for trial in range(9):
            prompt = [rng.randrange(128) for _ in range(rng.randint(1, 12))]
            n = rng.randint(1, 16)
            ref = Engine(StageRunner.for_tokens(whole, 512, 4)).generate_all(prompt, SamplingParams(max_tokens=n))
            head, rest = build(d, SPLITS[stages])
            drafter = RandomTreeDrafter(rng, 128, oracle if p_right else None, p_right)
            eng = Engine(StageRunner.for_tokens(head, 1024, 4), LocalPipeline(rest) if rest else None,
                         drafter=drafter, spec_depth=rng.randint(1, 5))
            assert eng.generate_all(prompt, SamplingParams(max_tokens=n)) == ref, (kind, trial)
            cases += 1
    assert cases == 36


def test_wrong_and_oracle_drafts_bound_acceptance(tiny_models):
    d, _ = tiny_models["llama"]
    whole = StageModel.from_pretrained(d)
    oracle = greedy_oracle(whole)
    prompt = [5, 6, 7]
    for p_right, check in [(0.0, lambda m: m == 1.0), (1.0, lambda m: m > 3.0)]:
        eng = Engine(StageRunner.for_tokens(whole, 1024, 4),
                     drafter=RandomTreeDrafter(random.Random(1), 128, oracle, p_right, max_nodes=40), spec_depth=5)
        eng.generate_all(prompt, SamplingParams(max_tokens=30))
        assert check(eng.stats.mean_accepted), (p_right, eng.stats.mean_accepted)


def test_many_sequences_batched_with_trees(tiny_models):
    d, _ = tiny_models["qwen3"]
    stage = StageModel.from_pretrained(d)
    rng = random.Random(5)
    prompts = [[rng.randrange(128) for _ in range(rng.randint(2, 10))] for _ in range(6)]
    solo = [Engine(StageRunner.for_tokens(stage, 512, 4)).generate_all(p, SamplingParams(max_tokens=12)) for p in prompts]
    eng = Engine(StageRunner.for_tokens(stage, 4096, 4), drafter=RandomTreeDrafter(rng, 128, greedy_oracle(stage), 0.5),
                 spec_depth=3)
    seqs = [eng.add(p, SamplingParams(max_tokens=12)) for p in prompts]
    while eng.has_work:
        eng.step()
    assert [s.output for s in seqs] == solo
    assert eng.head.blocks.num_free == eng.head.blocks.num_blocks


@pytest.mark.parametrize("drafter_kind", ["ngram", "model"])
def test_real_drafters_keep_greedy(tiny_models, drafter_kind):
    d, _ = tiny_models["qwen2"]
    stage = StageModel.from_pretrained(d)
    prompt = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]
    ref = Engine(StageRunner.for_tokens(stage, 512, 4)).generate_all(prompt, SamplingParams(max_tokens=40))
    drafter = NgramDrafter() if drafter_kind == "ngram" else ModelDrafter(StageModel.from_pretrained(d), 1024, 4)
    for width in (1, 3):
        eng = Engine(StageRunner.for_tokens(stage, 1024, 4), drafter=drafter, spec_depth=4, spec_width=width)
        assert eng.generate_all(prompt, SamplingParams(max_tokens=40)) == ref
    if drafter_kind == "model":  # the target drafting for itself is always right
        assert eng.stats.mean_accepted > 4.5


def test_greedy_accept_walk():
    t = DraftTree.root(10)
    a = t.add(0, 11)
    t.add(0, 12)
    b = t.add(a, 13)
    t.add(b, 14)
    # target says: after root 11, after 11 -> 13, after 13 -> 99 (bonus)
    nxt = {0: 11, a: 13, b: 99}
    accepted, bonus = greedy_accept(t, [nxt.get(i, -1) for i in range(len(t))])
    assert accepted == [0, a, b] and bonus == 99


def test_speculative_sampling_matches_target_distribution(tiny_models):
    """Chi-square: tokens emitted by speculative sampling follow the target's distribution."""
    d, _ = tiny_models["llama"]
    stage = StageModel.from_pretrained(d)
    params = SamplingParams(temperature=1.5, max_tokens=2)
    prompt = [3, 9, 27]
    # exact target distribution of the 2nd generated token given the 1st, and of the 1st
    from dllm.batch import SeqChunk

    def dist(ctx):
        r = StageRunner.for_tokens(stage, 256, 4)
        x = r.forward(stage.embed(torch.tensor(ctx)), [SeqChunk(0, 0, len(ctx))])
        return filtered_probs(stage.logits(x[-1:])[0], params)

    p1 = dist(prompt)
    # a drafter that proposes the target's most likely tokens (high acceptance) plus junk siblings
    top = torch.topk(p1, 3).indices.tolist()

    class Fixed:
        def propose(self, seq_id, context, depth, width, growth=None):
            t = DraftTree.root(context[-1])
            for tok in top:
                t.add(0, tok)
            return t

        def release(self, seq_id):
            pass

    n = 3000
    counts = torch.zeros_like(p1)
    eng = Engine(StageRunner.for_tokens(stage, 2048, 4), drafter=Fixed(), spec_depth=1)
    for i in range(n):
        out = eng.generate_all(prompt, SamplingParams(temperature=1.5, max_tokens=1, seed=i))
        counts[out[0]] += 1
    # chi-square over tokens with expected count >= 5, the rest pooled
    exp = p1 * n
    big = exp >= 5
    obs_b, exp_b = counts[big], exp[big]
    chi2 = float(((obs_b - exp_b) ** 2 / exp_b).sum())
    rest_o, rest_e = float(counts[~big].sum()), float(exp[~big].sum())
    if rest_e > 0:
        chi2 += (rest_o - rest_e) ** 2 / rest_e
    dof = int(big.sum()) + (1 if rest_e > 0 else 0) - 1
    # 99.9% quantile of chi2(dof) via Wilson–Hilferty
    z = 3.09
    crit = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < crit, (chi2, crit, dof)


def test_planner_grows_tree_with_rtt_and_shrinks_with_bad_drafts():
    from dllm.spec.planner import TreePlanner

    def shape_for(rtt, a1):
        p = TreePlanner(prior_a1=a1, prior_as=0.3, ema=0.0)
        for n in (1, 5, 9, 17, 33):
            p.observe_verify(n, rtt + 0.004 + 0.0005 * n)
        p.observe_draft(4, 4 * 0.003)
        return p._best()

    low, high = shape_for(0.0, 0.7), shape_for(0.05, 0.7)
    assert 1 + high[0] * high[1] > 1 + low[0] * low[1], (low, high)  # higher RTT -> bigger tree
    assert shape_for(0.0, 0.02)[0] == 0  # hopeless drafter -> plain steps
    assert shape_for(0.05, 0.9)[0] >= 6  # good drafter + long RTT -> deep chain


def test_planner_learns_acceptance_from_trees():
    from dllm.spec.planner import TreePlanner

    p = TreePlanner(prior_a1=0.5, ema=0.2)
    tree = DraftTree.chain(0, [1, 2, 3, 4])
    for _ in range(30):
        p.observe(tree, [0, 1, 2, 3, 4])  # all accepted
    assert p.a1 > 0.95
    for _ in range(30):
        p.observe(tree, [0])  # nothing accepted
    assert p.a1 < 0.05


def test_planner_leaves_its_priors_within_a_few_passes():
    """A request's first passes are planned from what they measure, not from the priors:
    early observations are averaged (the prior weighs as a few of them), not EMA'd at 5%."""
    from dllm.spec.planner import TreePlanner

    p = TreePlanner(prior_a1=0.6, ema=0.05)
    tree = DraftTree.chain(0, [1, 2, 3, 4])
    for _ in range(3):
        p.observe(tree, [0, 1, 2, 3, 4])  # 12 main-chain hits
    assert p.a1 > 0.85, p.a1
    for _ in range(3):
        p.observe_draft(4, 4 * 0.030)
    assert abs(p.draft_step - 0.030) < 0.01, p.draft_step


def test_planner_draft_cost_shrugs_off_slow_first_steps():
    """The first draft steps on new shapes run several times slower than the rest: two such
    passes must not make drafting look dear for the passes after them."""
    from dllm.spec.planner import TreePlanner

    p = TreePlanner(prior_a1=0.8, prior_as=0.2, ema=0.05)
    for n in (1, 5, 9, 17):
        p.observe_verify(n, 0.2 + 0.002 * n)  # a 50 ms RTT chain of a slow CPU target
    for _ in range(2):
        p.observe_draft(4, 4 * 0.084)  # warm-up
    for _ in range(3):
        p.observe_draft(4, 4 * 0.014)
    assert abs(p.draft_step - 0.014) < 1e-9, p.draft_step
    assert p._best()[0] >= 4, p._best()


def test_planner_probes_drafting_soon_after_giving_it_up():
    from dllm.spec.planner import TreePlanner

    p = TreePlanner(prior_a1=0.02, ema=0.0)  # a hopeless drafter: plain steps
    for n in (1, 5, 9):
        p.observe_verify(n, 0.01 * n)
    assert p._shape == (0, 1)
    shapes = [p.shape() for _ in range(8)]
    assert shapes.count((1, 1)) == 2 and shapes.count((0, 1)) == 6, shapes


def test_planner_measures_acceptance_per_depth():
    """A drafter right at depth 1 and wrong at depth 2 is worth a depth-1 draft, not a deep one:
    the overall rate (1/2) alone would predict a geometric tail."""
    from dllm.spec.planner import TreePlanner

    p = TreePlanner(prior_a1=0.5, ema=0.05)
    tree = DraftTree.chain(0, [1, 2, 3, 4])
    for _ in range(60):
        p.observe(tree, [0, 1])  # depth 1 right, depth 2 wrong
    assert p.level_acceptance(1) > 0.9 and p.level_acceptance(2) < 0.1
    assert abs(p.expected_tokens(4, 1) - p.expected_tokens(1, 1)) < 0.15
    p.observe_draft(4, 4 * 0.01)
    for n in (2, 3, 5):
        p.observe_verify(n, 0.05 + 0.001 * n)
    assert p._best() == (1, 1), p._best()


def test_growth_rule_is_the_marginal_value_test():
    from dllm.spec.planner import GrowthRule

    g = GrowthRule(rate=10.0, node_cost=0.005, step_cost=0.015)  # 10 tok/s, 5 ms a node, 15 ms a step
    assert g.worth_node(0.05) and not g.worth_node(0.049)  # 0.05 tokens for 5 ms = 10 tok/s
    assert g.worth_step(0.2) and not g.worth_step(0.19)  # a step and its node: 20 ms


def test_planner_growth_rule_uses_the_measured_rate_and_never_a_free_node():
    from dllm.spec.planner import TreePlanner

    p = TreePlanner(prior_a1=0.8, ema=0.05)
    tree = DraftTree.chain(0, [1, 2, 3, 4])
    for _ in range(20):  # passes of 4 committed tokens (3 drafts + bonus) in 10 + 40 ms
        p.observe_draft(4, 0.010)
        p.observe(tree, [0, 1, 2, 3])
        p.observe_verify(5, 0.040)
    g = p.growth()
    assert abs(g.rate - 4 / 0.050) < 1e-6, g.rate
    assert abs(g.step_cost - 0.0025) < 1e-9
    assert g.node_cost >= 0.002 * 0.04 * 0.99  # one node count only: the slope is unknown, not zero
    assert (g.depth, g.width) == p._shape  # the planned shape, for drafters without probabilities
    depth, width, rule = p.next_tree()
    assert (depth, width) == (p.max_depth, p.max_width) and rule == g
    # a static planner, or one that plans plain steps, hands out no rule
    assert TreePlanner(dynamic=False).next_tree()[2] is None
    hopeless = TreePlanner(prior_a1=0.02, ema=0.0)
    for n in (1, 5, 9):
        hopeless.observe_verify(n, 0.01 * n)
    assert hopeless.next_tree()[2] is None


def test_ngram_drafter_keeps_to_the_planned_shape_under_a_rule():
    from dllm.spec.planner import GrowthRule

    ctx = [1, 2, 3, 4, 5, 6, 7, 1, 2, 9, 9, 1, 2]  # "1 2" seen twice before: two branches
    free = NgramDrafter().propose(0, ctx, 12, 4)
    assert max(free.depths()) > 2 and len(free.children(0)) == 2
    ruled = NgramDrafter().propose(0, ctx, 12, 4, growth=GrowthRule(1.0, 0.01, 0.01, depth=2, width=1))
    assert max(ruled.depths()) == 2 and len(ruled.children(0)) == 1


def test_model_drafter_grows_its_tree_by_the_rule(tiny_models):
    """Every node a grown tree holds is worth its verify cost by the draft's own path probability,
    drafting stops where the main path is not worth a step, and a rule that accepts everything
    (rate 0) gives exactly the fixed-shape tree."""
    from dllm.spec.planner import GrowthRule

    d, _ = tiny_models["qwen2"]
    stage = StageModel.from_pretrained(d)
    ctx = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]
    fixed = ModelDrafter(stage, 1024, 4).propose(0, ctx, 6, 3)
    everything = ModelDrafter(stage, 1024, 4).propose(0, ctx, 6, 3, growth=GrowthRule(0.0, 0.001, 0.001))
    assert (everything.tokens, everything.parents) == (fixed.tokens, fixed.parents)
    assert len(ModelDrafter(stage, 1024, 4).propose(0, ctx, 6, 3, growth=GrowthRule(1e9, 1.0, 1.0))) == 1
    def main_chain(tree):
        chain, node = [], 0
        while kids := tree.children(node):
            node = kids[0]
            chain.append(node)
        return chain

    fixed_chain = main_chain(fixed)
    probs = sorted(math.exp(s) for s in fixed.scores[1:])
    for q in probs[len(probs) // 3], probs[len(probs) // 2]:  # thresholds that cut inside the tree
        rule = GrowthRule(1.0, q / 2, q / 2)  # node: q / 2, step: q
        tree = ModelDrafter(stage, 1024, 4).propose(0, ctx, 6, 3, growth=rule)
        assert 1 < len(tree) < len(fixed)
        assert all(rule.worth_node(math.exp(s)) for s in tree.scores[1:])
        chain = main_chain(tree)
        assert [tree.tokens[i] for i in chain] == [fixed.tokens[i] for i in fixed_chain[:len(chain)]]
        assert all(rule.worth_step(math.exp(tree.scores[i])) for i in chain[:-1])
        if len(chain) < 6:  # it stopped: no step was worth it, or the next main node was not
            assert not rule.worth_step(math.exp(tree.scores[chain[-1]])) \
                or not rule.worth_node(math.exp(fixed.scores[fixed_chain[len(chain)]]))


def test_dynamic_trees_keep_greedy_on_a_real_model():
    """SmolLM2 drafting for itself with planner-grown trees over a 2-stage split: the output is
    plain greedy's, and the trees really grew (deeper than one level, wider than a chain)."""
    from dllm.spec.planner import TreePlanner
    from tests.models import model_dir_or_skip

    d = model_dir_or_skip("smollm2")
    whole = StageModel.from_pretrained(d)
    prompt = whole_prompt = [1, 504, 3458, 282, 4649, 314, 4265, 30, 198]  # "The capital of France is"-like ids
    ref = Engine(StageRunner.for_tokens(whole, 512, 16)).generate_all(whole_prompt, SamplingParams(max_tokens=40))
    head, rest = build(d, [(0, 15), (15, 30)])
    shapes = []

    class Recording(ModelDrafter):
        def propose(self, *a, **kw):
            t = super().propose(*a, **kw)
            shapes.append((max(t.depths()), len(t)))
            return t

    drafter = Recording(StageModel.from_pretrained(d, layers=range(0, 8)), 1024, 16)  # a shallow, cheap self-draft
    eng = Engine(StageRunner.for_tokens(head, 1024, 16), LocalPipeline(rest), drafter=drafter,
                 planner=TreePlanner(max_depth=10, max_width=3))
    assert eng.generate_all(prompt, SamplingParams(max_tokens=40)) == ref
    assert max(dep for dep, _ in shapes) > 1 and any(n > dep + 1 for dep, n in shapes), shapes
