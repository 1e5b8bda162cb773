"""Drafters: propose a DraftTree of candidate continuations for a sequence's context.

All drafters share one call, ``propose(seq_id, context, depth, width, growth=None) -> DraftTree``,
whose root is ``context[-1]``; ``depth`` and ``width`` bound the tree, and a ``GrowthRule``
(dllm.spec.planner) lets a drafter that knows its own probabilities stop short of them. Drafts
only ever change speed: the verify walk keeps the target's own tokens, so a bad drafter costs
time, never correctness.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Protocol

import torch

from dllm.batch import SeqChunk
from dllm.errors import ConfigError
from dllm.model.runner import StageRunner
from dllm.model.stage import StageModel
from dllm.spec.planner import GrowthRule
from dllm.spec.tree import DraftTree


class Drafter(Protocol):
    def propose(self, seq_id: int, context: list[int], depth: int, width: int,
                growth: GrowthRule | None = None) -> DraftTree: ...

    def release(self, seq_id: int) -> None: ...


class NgramDrafter:
    """Prompt lookup: continue the latest earlier occurrence of the context's suffix.

    Needs no model; strong on code and on answers that quote the prompt. Up to ``width``
    distinct earlier matches become branches. It has no probabilities, so under a growth rule
    it keeps to the rule's planned shape.
    """

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, seq_id: int, context: list[int], depth: int, width: int,
                growth: GrowthRule | None = None) -> DraftTree:
        if growth is not None:
            depth, width = min(depth, growth.depth), min(width, growth.width)
        tree = DraftTree.root(context[-1])
        n_ctx = len(context)
        for n in range(min(self.max_ngram, n_ctx - 1), self.min_ngram - 1, -1):
            suffix = context[n_ctx - n:]
            branches = 0
            # scan backwards: the most recent occurrence is the best guess
            for i in range(n_ctx - n - 1, -1, -1):
                if context[i:i + n] == suffix:
                    cont = context[i + n:i + n + depth]
                    if cont:
                        score = float(n) - 0.01 * branches
                        tree.add_path(cont, [score - 0.001 * k for k in range(len(cont))])
                        branches += 1
                        if branches >= max(1, width):
                            break
            if branches:
                break
        return tree

    def release(self, seq_id: int) -> None:
        pass


class ModelDrafter:
    """A small local model with its own KV cache: a greedy chain plus top-k side leaves.

    Each level costs one single-token draft step; the runner-up tokens at each level are added
    as leaves so a miss on the main chain can still be rescued by a sibling. With a growth rule,
    a candidate is kept only when its path probability (under the draft) is worth a verified
    node, and drafting goes one level deeper only while the main path's is worth a step.
    """

    def __init__(self, model: StageModel, kv_tokens: int = 8192, block_size: int = 16):
        self.model = model
        self.runner = StageRunner.for_tokens(model, kv_tokens, block_size)
        self.cached: dict[int, list[int]] = {}  # tokens whose KV the draft holds, per sequence

    @classmethod
    def from_pretrained(cls, model_dir, dtype="float32", quant: str | None = None, **kw) -> "ModelDrafter":
        """``dtype`` / ``quant`` as dllm.launch.resolve_precision takes them: ``dtype="auto"`` on
        CPU drafts with int4 weights (the fast path; a draft only changes speed, never output)."""
        from dllm.launch import resolve_precision

        dtype, quant = resolve_precision(dtype, quant, model_dir=model_dir)
        return cls(StageModel.from_pretrained(model_dir, dtype=dtype, quant=quant), **kw)

    @torch.inference_mode()
    def _step(self, seq_id: int, start: int, tokens: list[int]) -> torch.Tensor:
        x = self.runner.forward(self.model.embed(torch.tensor(tokens, device=self.model.device)),
                                [SeqChunk(seq_id, start, len(tokens))])
        return torch.log_softmax(self.model.logits(x[-1:])[0], dim=-1)

    def propose(self, seq_id: int, context: list[int], depth: int, width: int,
                growth: GrowthRule | None = None) -> DraftTree:
        tree = DraftTree.root(context[-1])
        if depth <= 0:
            return tree
        have = self.cached.get(seq_id, [])
        lcp = 0
        for a, b in zip(have, context):
            if a != b:
                break
            lcp += 1
        start = min(lcp, len(context) - 1)  # the root must be fed to get its logits
        logp = self._step(seq_id, start, context[start:])
        fed = list(context)
        node, score = 0, 0.0  # score: the draft's log-probability of the path root..node
        for level in range(depth):
            top = torch.topk(logp, max(1, width))
            toks, lps = top.indices.tolist(), top.values.tolist()
            if growth is not None and not growth.worth_node(math.exp(score + lps[0])):
                break
            main = tree.add(node, toks[0], score + lps[0])
            for t, lp in zip(toks[1:], lps[1:]):
                if growth is None or growth.worth_node(math.exp(score + lp)):
                    tree.add(node, t, score + lp)
            node, score = main, score + lps[0]
            if level + 1 == depth or (growth is not None and not growth.worth_step(math.exp(score))):
                break
            logp = self._step(seq_id, len(fed), [toks[0]])
            fed.append(toks[0])
        self.cached[seq_id] = fed
        return _main_chain_first(tree)

    def release(self, seq_id: int) -> None:
        self.cached.pop(seq_id, None)
        self.runner.free(seq_id)


def _main_chain_first(tree: DraftTree) -> DraftTree:
    """Reorder nodes so the first-child chain is 0..d: when it is accepted, KV needs no compaction."""
    chain, node = [0], 0
    while kids := tree.children(node):
        node = kids[0]
        chain.append(node)
    order = chain + [i for i in range(len(tree)) if i not in set(chain)]
    remap = {old: new for new, old in enumerate(order)}
    return DraftTree([tree.tokens[i] for i in order], [remap.get(tree.parents[i], -1) for i in order],
                     [tree.scores[i] for i in order])


def tokenizer_vocab(model_dir) -> dict[str, int]:
    """token string -> id from tokenizer.json (model vocab + added tokens)."""
    p = Path(model_dir) / "tokenizer.json"
    if not p.is_file():
        raise ConfigError(f"no tokenizer.json in {model_dir}")
    d = json.loads(p.read_text())
    vocab = dict(d.get("model", {}).get("vocab", {}))
    for t in d.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
    return vocab


def check_draft_compatible(target_dir, draft_dir) -> None:
    """A draft must share the target's tokenizer. Vocab *padding* may differ (151936 vs 152064
    rows): only real tokens are compared, and every draft id must be a valid target row."""
    from dllm.config import ModelConfig

    tv, dv = tokenizer_vocab(target_dir), tokenizer_vocab(draft_dir)
    if tv != dv:
        diff = len(set(tv.items()) ^ set(dv.items()))
        raise ConfigError(f"draft model {draft_dir} has a different tokenizer from the target "
                          f"({len(dv)} vs {len(tv)} tokens, {diff} entries differ): it cannot draft for it")
    tcfg, dcfg = ModelConfig.from_dir(target_dir), ModelConfig.from_dir(draft_dir)
    if max(dv.values()) >= tcfg.vocab_size or max(dv.values()) >= dcfg.vocab_size:
        raise ConfigError(f"token ids up to {max(dv.values())} do not fit the embedding rows "
                          f"(target {tcfg.vocab_size}, draft {dcfg.vocab_size})")
