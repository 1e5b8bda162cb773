"""DraftTree: candidate continuations verified in one pass. Pure Python.

Node 0 is the root: the last committed token, whose KV is not yet on the stages. Every other
node is a drafted token whose parent precedes it. One verify pass runs all nodes with
positions = root position + depth and an ancestor mask (``SeqChunk.parents``); the target's
prediction at node i is its next token after the path root..i.

Greedy acceptance walks from the root, following the child whose token equals the target's
argmax, and ends with the bonus token (the target's own choice after the last accepted node).
So every committed token is exactly what plain greedy decoding would produce — whatever the
drafts were.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DraftTree:
    tokens: list[int]
    parents: list[int]  # parents[0] == -1
    scores: list[float] = field(default_factory=list)  # draft log-prob of the path, for merging/pruning

    @classmethod
    def root(cls, token: int) -> "DraftTree":
        return cls([token], [-1], [0.0])

    @classmethod
    def chain(cls, root: int, drafts: list[int]) -> "DraftTree":
        t = cls.root(root)
        parent = 0
        for d in drafts:
            parent = t.add(parent, d)
        return t

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, parent: int, token: int, score: float = 0.0) -> int:
        """Add ``token`` under ``parent``; an identical sibling is reused, not duplicated."""
        if not 0 <= parent < len(self.tokens):
            raise IndexError(f"parent {parent} not in tree of {len(self.tokens)} nodes")
        for c in self.children(parent):
            if self.tokens[c] == token:
                return c
        self.tokens.append(token)
        self.parents.append(parent)
        self.scores.append(score)
        return len(self.tokens) - 1

    def children(self, node: int) -> list[int]:
        return [i for i, p in enumerate(self.parents) if p == node]

    def depths(self) -> list[int]:
        d: list[int] = []
        for p in self.parents:
            d.append(0 if p < 0 else d[p] + 1)
        return d

    def path(self, node: int) -> list[int]:
        """Node indices from the root to ``node``."""
        out = []
        while node >= 0:
            out.append(node)
            node = self.parents[node]
        return out[::-1]

    def add_path(self, tokens: list[int], scores: list[float] | None = None, parent: int = 0) -> None:
        """Merge a drafted continuation below ``parent`` (sharing common prefixes)."""
        for i, t in enumerate(tokens):
            parent = self.add(parent, t, scores[i] if scores else 0.0)

    def prune(self, max_nodes: int) -> "DraftTree":
        """Keep the root and the best-scoring nodes whose ancestors are kept (at most max_nodes)."""
        if len(self) <= max_nodes:
            return self
        order = sorted(range(1, len(self)), key=lambda i: -self.scores[i])
        keep = {0}
        for i in order:
            if len(keep) >= max_nodes:
                break
            if all(a in keep for a in self.path(i)[:-1]):
                keep.add(i)
        idx = sorted(keep)
        remap = {old: new for new, old in enumerate(idx)}
        return DraftTree([self.tokens[i] for i in idx], [remap.get(self.parents[i], -1) for i in idx],
                         [self.scores[i] for i in idx])


def greedy_accept(tree: DraftTree, target_next: list[int]) -> tuple[list[int], int]:
    """Walk the tree against the target's argmax at each node.

    Returns (accepted node indices starting with the root, bonus token). The committed new
    tokens are ``[tree.tokens[i] for i in accepted[1:]] + [bonus]``.
    """
    node, accepted = 0, [0]
    while True:
        want = target_next[node]
        nxt = next((c for c in tree.children(node) if tree.tokens[c] == want), None)
        if nxt is None:
            return accepted, want
        accepted.append(nxt)
        node = nxt
