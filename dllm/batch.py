"""SeqChunk: one sequence's share of a forward pass, as every stage sees it. Pure Python.

A stage receives hidden states [T, H] for a varlen batch plus one SeqChunk per sequence. The
chunk says where its ``length`` rows go: positions ``start .. start+length`` of the sequence's
KV. The stage first cuts that sequence's KV back to ``start`` tokens, so rollback after a
rejected draft needs no message of its own.

Tree chunks (speculative verification) carry ``parents``: parent index of each node within the
chunk, -1 for a node hanging off the committed context. Node i is stored in KV slot start+i but
takes rope position start+depth(i), and attends to the context and its own ancestors only.
``commit`` = (tree_start, kept node indices) rides on the next chunk: the stage moves the kept
nodes' KV to tree_start, tree_start+1, … and truncates, so acceptance costs no round trip.
"""
from __future__ import annotations

from dataclasses import dataclass

from dllm.errors import DllmError


class ChunkError(DllmError):
    """A chunk description is inconsistent (from a buggy or hostile peer)."""


@dataclass(frozen=True)
class SeqChunk:
    seq_id: int
    start: int
    length: int
    parents: tuple[int, ...] | None = None
    commit: tuple[int, tuple[int, ...]] | None = None

    def __post_init__(self):
        if not isinstance(self.seq_id, int) or not isinstance(self.start, int) or not isinstance(self.length, int):
            raise ChunkError("seq_id, start and length must be integers")
        if self.start < 0 or self.length < 1:
            raise ChunkError(f"seq {self.seq_id}: bad range start={self.start} length={self.length}")
        if self.parents is not None:
            if len(self.parents) != self.length:
                raise ChunkError(f"seq {self.seq_id}: {len(self.parents)} parents for {self.length} nodes")
            for i, p in enumerate(self.parents):
                if not isinstance(p, int) or not -1 <= p < i:
                    raise ChunkError(f"seq {self.seq_id}: node {i} has parent {p}; parents must precede their children")
        if self.commit is not None:
            tree_start, kept = self.commit
            if tree_start < 0 or any(not isinstance(k, int) or k < 0 for k in kept) or list(kept) != sorted(set(kept)):
                raise ChunkError(f"seq {self.seq_id}: bad commit {self.commit}")
            if self.start > tree_start + len(kept):
                raise ChunkError(f"seq {self.seq_id}: start {self.start} is past the committed length {tree_start + len(kept)}")

    def depths(self) -> list[int]:
        if self.parents is None:
            return list(range(self.length))
        d: list[int] = []
        for p in self.parents:
            d.append(0 if p < 0 else d[p] + 1)
        return d

    def to_dict(self) -> dict:
        d = {"s": self.seq_id, "a": self.start, "n": self.length}
        if self.parents is not None:
            d["p"] = list(self.parents)
        if self.commit is not None:
            d["c"] = [self.commit[0], list(self.commit[1])]
        return d

    @classmethod
    def from_dict(cls, d) -> "SeqChunk":
        if not isinstance(d, dict):
            raise ChunkError(f"chunk must be an object, got {type(d).__name__}")
        try:
            parents = tuple(d["p"]) if d.get("p") is not None else None
            commit = (d["c"][0], tuple(d["c"][1])) if d.get("c") is not None else None
            return cls(d["s"], d["a"], d["n"], parents, commit)
        except (KeyError, IndexError, TypeError) as e:
            raise ChunkError(f"malformed chunk {str(d)[:200]}: {e}") from None
