"""Remote drafters and the forest: merge drafts that arrive before a deadline; ignore the rest.

``ForestDrafter`` asks every remote drafter first (they work while the local draft runs), then
waits at most ``deadline_s`` for their replies. The local drafter's tree is the floor: its
nodes are always kept, remote nodes only fill the remaining node budget, and every remote reply
is validated (token range, parent order, size) before use. A slow, dead or malicious drafter
therefore costs at most the deadline and can never change the output — verification does that.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time

import torch

from dllm.errors import DllmError
from dllm.net.crypto import Identity, PeerAddress
from dllm.net.link import Link, LinkClosed
from dllm.net.loop import BackgroundLoop
from dllm.net.wire import Frame, FrameKind
from dllm.spec.tree import DraftTree

log = logging.getLogger("dllm.forest")


class RemoteDrafterClient:
    """One remote drafter node, spoken to over a sealed link from a background loop."""

    def __init__(self, addr: PeerAddress, identity: Identity, loop: BackgroundLoop, vocab_size: int,
                 max_nodes: int = 64, emulate_rtt_ms: float = 0.0):
        self.addr, self.identity, self.bg = addr, identity, loop
        self.vocab_size, self.max_nodes = vocab_size, max_nodes
        self.delay_s = emulate_rtt_ms / 2000.0
        self.link: Link | None = None
        self.sent: dict[int, int] = {}  # seq -> tokens the drafter holds
        self._reqs = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self.stats = {"used": 0, "late": 0, "invalid": 0, "down": 0}
        self._next_try = 0.0

    async def _ensure(self) -> bool:
        if self.link is not None and self.link.is_open:
            return True
        if time.monotonic() < self._next_try:
            return False  # recently failed: do not stall every pass on a dead peer
        try:
            self.link = await asyncio.wait_for(Link.connect(self.identity, self.addr, self.delay_s), 2.0)
            self.sent.clear()
            asyncio.ensure_future(self._read(self.link))
            return True
        except (LinkClosed, DllmError, asyncio.TimeoutError, OSError):
            self.link = None
            self._next_try = time.monotonic() + 5.0
            return False

    async def _read(self, link: Link) -> None:
        async for frame in link:
            fut = self._waiting.pop(frame.meta.get("req"), None) if isinstance(frame.meta.get("req"), int) else None
            if fut is not None and not fut.done():
                fut.set_result(frame)
            elif frame.kind == FrameKind.DRAFT_REPLY:
                self.stats["late"] += 1

    async def request(self, seq: int, context: list[int], depth: int, width: int) -> asyncio.Future | None:
        if not await self._ensure():
            self.stats["down"] += 1
            return None
        start = min(self.sent.get(seq, 0), len(context) - 1)
        req = next(self._reqs)
        fut = asyncio.get_running_loop().create_future()
        self._waiting[req] = fut
        try:
            await self.link.send(Frame(FrameKind.DRAFT_REQUEST, {"seq": seq, "req": req, "start": start,
                                                                 "depth": depth, "width": width},
                                       torch.tensor(context[start:], dtype=torch.int64)))
        except LinkClosed:
            self._waiting.pop(req, None)
            return None
        self.sent[seq] = len(context)
        return fut

    def parse(self, seq: int, frame: Frame, root: int) -> DraftTree | None:
        """A validated tree from a reply, or None (counted) if it is malformed in any way."""
        if frame.kind == FrameKind.ERROR:
            self.sent.pop(seq, None)  # drafter lost our context: resend in full next time
            return None
        try:
            toks = frame.tensor.tolist() if frame.tensor is not None else []
            parents, scores = frame.meta.get("parents"), frame.meta.get("scores")
            if (frame.kind != FrameKind.DRAFT_REPLY or frame.tensor is None or frame.tensor.dtype != torch.int64
                    or frame.tensor.dim() != 1 or not isinstance(parents, list) or len(parents) != len(toks)
                    or len(toks) > self.max_nodes or not isinstance(scores, list) or len(scores) != len(toks)):
                raise ValueError("shape")
            tree = DraftTree.root(root)
            index = [0]
            for i, (t, p, sc) in enumerate(zip(toks, parents, scores)):
                if not (isinstance(p, int) and 0 <= p <= i and 0 <= t < self.vocab_size
                        and isinstance(sc, (int, float))):
                    raise ValueError("node")
                index.append(tree.add(index[p], int(t), float(sc)))
            return tree
        except (ValueError, TypeError, AttributeError):
            self.stats["invalid"] += 1
            return None

    def release(self, seq: int) -> None:
        self.sent.pop(seq, None)
        if self.link is not None and self.link.is_open:
            asyncio.run_coroutine_threadsafe(self.link.send(Frame(FrameKind.CLOSE_SESSION, {"seqs": [seq]})),
                                             self.bg.loop)


class ForestDrafter:
    """Local drafter (the floor) + remote drafters merged under a deadline and a node budget."""

    def __init__(self, local, remotes: list[str], identity: Identity | None = None, vocab_size: int = 1 << 31,
                 deadline_s: float = 0.05, max_nodes: int = 64, emulate_rtt_ms: float = 0.0):
        self.local = local
        self.bg = BackgroundLoop("dllm-forest")
        ident = identity or Identity.generate()
        self.remotes = [RemoteDrafterClient(PeerAddress.parse(a) if isinstance(a, str) else a, ident, self.bg,
                                            vocab_size, max_nodes, emulate_rtt_ms) for a in remotes]
        self.deadline_s, self.max_nodes = deadline_s, max_nodes

    def propose(self, seq_id: int, context: list[int], depth: int, width: int, growth=None) -> DraftTree:
        """``growth`` (a GrowthRule) shapes the local tree; remote drafters are asked for its
        planned shape (the wire carries a shape, not a rule)."""
        ask_depth, ask_width = (depth, width) if growth is None else (min(depth, growth.depth), min(width, growth.width))

        async def ask():
            return await asyncio.gather(*(r.request(seq_id, context, ask_depth, ask_width) for r in self.remotes))

        t_end = time.monotonic() + self.deadline_s
        try:
            futs = self.bg.call(ask(), self.deadline_s + 5)
        except Exception:
            futs = [None] * len(self.remotes)
        tree = self.local.propose(seq_id, context, depth, width, growth) if self.local is not None else DraftTree.root(context[-1])

        async def collect():
            live = [f for f in futs if f is not None]
            if live:
                await asyncio.wait(live, timeout=max(0.0, t_end - time.monotonic()))
            return [f.result() if f is not None and f.done() and not f.cancelled() and f.exception() is None
                    else None for f in futs]

        replies = self.bg.call(collect(), self.deadline_s + 5)
        budget = self.max_nodes - len(tree)
        for r, reply in zip(self.remotes, replies):
            if reply is None:
                continue
            other = r.parse(seq_id, reply, context[-1])
            if other is None:
                continue
            r.stats["used"] += 1
            budget = _graft(tree, other, budget, depth)
        return tree

    def release(self, seq_id: int) -> None:
        if self.local is not None:
            self.local.release(seq_id)
        for r in self.remotes:
            r.release(seq_id)

    def close(self) -> None:
        async def shut():
            for r in self.remotes:
                if r.link is not None:
                    await r.link.close()
        try:
            self.bg.call(shut(), 5)
        finally:
            self.bg.stop()


def _graft(tree: DraftTree, other: DraftTree, budget: int, max_depth: int) -> int:
    """Add ``other``'s nodes (best score first, parents before children) while budget lasts."""
    mapped = {0: 0}
    depths = other.depths()
    for i in sorted(range(1, len(other)), key=lambda i: (depths[i], -other.scores[i])):
        p = other.parents[i]
        if p not in mapped or depths[i] > max_depth:
            continue
        before = len(tree)
        if budget <= 0 and not any(tree.tokens[c] == other.tokens[i] for c in tree.children(mapped[p])):
            continue
        mapped[i] = tree.add(mapped[p], other.tokens[i], other.scores[i])
        budget -= len(tree) - before
    return budget
