"""DrafterServer: a node that proposes draft trees for coordinators (a tree of the forest).

Protocol (inside a sealed link)::

    DRAFT_REQUEST  meta {"seq": id, "req": n, "start": p, "depth": d, "width": w}
                   tensor tokens [T] int64 = the sequence's committed tokens from position p on
    DRAFT_REPLY    meta {"seq": id, "req": n, "parents": [...], "scores": [...]}
                   tensor tokens [n] int64: the tree's nodes after the root, parents index the
                   full tree (0 = the root, the context's last token)
    ERROR          meta {"req": n, "code": "resend"} when it lacks the context before p

The coordinator sends only what the drafter has not seen; committed tokens never change, so
the drafter just truncates to ``start`` and appends.
"""
from __future__ import annotations

import asyncio
import logging

import torch
from aiohttp import web

from dllm.net.crypto import Identity
from dllm.net.link import WS_PATH, Link, LinkClosed
from dllm.net.wire import Frame, FrameKind

log = logging.getLogger("dllm.drafter")
MAX_CONTEXT = 1 << 17


class DrafterServer:
    def __init__(self, drafter, identity: Identity, *, allowed=None, emulate_rtt_ms: float = 0.0, max_seqs: int = 1024):
        self.drafter = drafter
        self.identity = identity
        self.allowed = allowed
        self.delay_s = emulate_rtt_ms / 2000.0
        self.max_seqs = max_seqs
        self.contexts: dict[tuple[str, int], list[int]] = {}
        self._ids: dict[tuple[str, int], int] = {}
        self._lock = asyncio.Lock()  # one draft computation at a time: the drafter holds one KV cache

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(WS_PATH, self._handle)
        return app

    async def _handle(self, request):
        link = await Link.accept(request, self.identity, self.allowed, self.delay_s)
        if link is None:
            return web.Response(status=403)
        try:
            async for frame in link:
                if frame.kind == FrameKind.HELLO:
                    await link.send(Frame(FrameKind.HELLO, {"role": "drafter"}))
                elif frame.kind == FrameKind.PING:
                    await link.send(Frame(FrameKind.PONG, {"t": frame.meta.get("t")}))
                elif frame.kind == FrameKind.DRAFT_REQUEST:
                    await self._draft(link, frame)
                elif frame.kind == FrameKind.CLOSE_SESSION:
                    for sid in frame.meta.get("seqs", []):
                        self._forget(link.peer, sid)
        except LinkClosed:  # an answer could not be sent: the peer is gone
            pass
        finally:
            await link.close()
        return link.ws

    def _forget(self, origin: str, seq) -> None:
        key = (origin, seq)
        self.contexts.pop(key, None)
        if key in self._ids:
            self.drafter.release(self._ids.pop(key))

    async def _draft(self, link: Link, frame: Frame) -> None:
        m = frame.meta
        try:
            seq, req, start = int(m["seq"]), int(m["req"]), int(m["start"])
            depth, width = max(0, min(int(m["depth"]), 32)), max(1, min(int(m["width"]), 8))
            new = frame.tensor.tolist() if frame.tensor is not None else []
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            await link.send(Frame(FrameKind.ERROR, {"req": m.get("req"), "code": "bad_request", "message": str(e)}))
            return
        key = (link.peer, seq)
        ctx = self.contexts.get(key, [])
        if start > len(ctx) or start + len(new) > MAX_CONTEXT or not (ctx[:start] + new):
            await link.send(Frame(FrameKind.ERROR, {"req": req, "seq": seq, "code": "resend"}))
            return
        ctx = ctx[:start] + new
        if key not in self._ids:
            if len(self._ids) >= self.max_seqs:
                self._forget(*next(iter(self._ids)))
            self._ids[key] = len(self._ids) + 1 + max(self._ids.values(), default=0)
        self.contexts[key] = ctx
        async with self._lock:
            tree = await asyncio.get_running_loop().run_in_executor(
                None, self.drafter.propose, self._ids[key], ctx, depth, width)
        await link.send(Frame(FrameKind.DRAFT_REPLY, {"seq": seq, "req": req, "parents": tree.parents[1:],
                                                      "scores": tree.scores[1:]},
                              torch.tensor(tree.tokens[1:], dtype=torch.int64)))
