"""StageServer: serves one layer range over authenticated WebSocket links.

Routing is carried by the frames, so a stage keeps no chain configuration::

    FORWARD  meta {"origin": coordinator key, "step": n, "chunks": [SeqChunk…], "route": [addr…]}
             tensor hidden [T, H] (fp16, or bf16/fp32 when fp16 would overflow)

The stage runs its layers, then sends FORWARD to ``route[0]`` with ``route[1:]`` (dialling that
peer if needed), or — when the route is empty — RESULT straight to the origin over the link the
coordinator opened to it. Errors go to the origin too (ERROR / BUSY with the step number), so a
coordinator hears about a failure from the stage that saw it.

Each coordinator's sequences live in their own namespace: KV is keyed by (origin, seq_id).
CLOSE_SESSION frees a sequence on this stage; sequences idle for ``session_ttl_s`` are freed.

A FORWARD is computed on the event loop's own thread, as soon as it is read: a hand-off to an
executor thread and back cost 0.2-0.6 ms per pass, and a thread woken from a halted vCPU computes
slower than one that stayed busy. The loop polls while it expects traffic (dllm.net.loop.BusyPoll,
``busy_poll_ms``), so the frame is picked up within microseconds by a hot thread. While a pass
computes, the loop serves nothing else; passes are milliseconds to seconds, and every peer's
timeouts are far longer. Frames of one link are handled in order; passes never overlap.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time

import torch
from aiohttp import web

from dllm.batch import ChunkError, SeqChunk
from dllm.errors import DllmError, KVBudgetExceeded
from dllm.model.runner import StageRunner
from dllm.net import wire
from dllm.net.crypto import Identity, PeerAddress, SecureChannel
from dllm.net.link import WS_PATH, Link, LinkClosed
from dllm.net.loop import add_warmer, install_busy_poll
from dllm.net.wire import Frame, FrameKind

log = logging.getLogger("dllm.stage")


class StageServer:
    def __init__(self, runner: StageRunner, identity: Identity, *, model_name: str = "", allowed=None,
                 emulate_rtt_ms: float = 0.0, session_ttl_s: float = 600.0, busy_poll_ms: float | None = None):
        self.runner = runner
        self.identity = identity
        self.model_name = model_name
        self.allowed = allowed
        self.delay_s = emulate_rtt_ms / 2000.0  # one hop is half a round trip
        self.session_ttl_s = session_ttl_s
        self.inbound: dict[str, Link] = {}     # peer key -> newest link it opened to us
        self.outbound: dict[str, Link] = {}    # "key@host:port" -> link we opened
        self._ids = itertools.count(1)
        self._seq_ids: dict[tuple[str, int], int] = {}  # (origin, their seq id) -> our KV id
        self._last_used: dict[int, float] = {}
        self.busy_poll_ms = busy_poll_ms  # None: $DLLM_BUSY_POLL_MS or 250 ms; 0: block at once
        self._tasks: list[asyncio.Task] = []
        self.frames_done = 0
        self._warm_kit = None

    # ---- app -------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_get(WS_PATH, self._handle)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app) -> None:
        loop = asyncio.get_running_loop()
        install_busy_poll(loop, None if self.busy_poll_ms is None else self.busy_poll_ms / 1000)
        add_warmer(loop, self._warm)
        self._tasks = [asyncio.ensure_future(self._expire_loop())]

    async def _stop(self, app) -> None:
        for t in self._tasks:
            t.cancel()
        for link in list(self.inbound.values()) + list(self.outbound.values()):
            await link.close()

    @property
    def layers(self) -> tuple[int, int]:
        r = self.runner.model.layer_range
        return r.start, r.stop

    def hello_meta(self) -> dict:
        return {"model": self.model_name, "layers": list(self.layers), "proto": 1,
                "kv_free_tokens": self.runner.blocks.num_free * self.runner.block_size}

    # ---- connections -----------------------------------------------------------------------------
    async def _handle(self, request: web.Request):
        link = await Link.accept(request, self.identity, self.allowed, self.delay_s)
        if link is None:
            return web.Response(status=403)
        self.inbound[link.peer] = link
        try:
            async for frame in link:
                await self._dispatch(link, frame)
        except LinkClosed:  # our answer could not be sent: the peer is gone
            pass
        finally:
            if self.inbound.get(link.peer) is link:
                del self.inbound[link.peer]
            await link.close()
        return link.ws

    async def _dispatch(self, link: Link, frame: Frame) -> None:
        k = frame.kind
        if k == FrameKind.HELLO:
            await link.send(Frame(FrameKind.HELLO, self.hello_meta()))
        elif k == FrameKind.PING:
            await link.send(Frame(FrameKind.PONG, {"t": frame.meta.get("t"), "layers": list(self.layers),
                                                   "sessions": len(self._seq_ids),
                                                   "kv_free_tokens": self.runner.blocks.num_free * self.runner.block_size}))
        elif k == FrameKind.FORWARD:
            await self._forward(link, frame)
        elif k == FrameKind.CLOSE_SESSION:
            for sid in frame.meta.get("seqs", []):
                self._free(link.peer, sid)
        else:
            await link.send(Frame(FrameKind.ERROR, {"code": "unexpected_frame", "message": f"unexpected {k.name}"}))

    def _kv_id(self, origin: str, seq_id: int) -> int:
        key = (origin, seq_id)
        if key not in self._seq_ids:
            self._seq_ids[key] = next(self._ids)
        sid = self._seq_ids[key]
        self._last_used[sid] = time.monotonic()
        return sid

    def _free(self, origin: str, seq_id) -> None:
        sid = self._seq_ids.pop((origin, seq_id), None)
        if sid is not None:
            self.runner.free(sid)
            self._last_used.pop(sid, None)

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, self.session_ttl_s / 4))
            cutoff = time.monotonic() - self.session_ttl_s
            for (origin, seq_id), sid in list(self._seq_ids.items()):
                if self._last_used.get(sid, 0) < cutoff:
                    log.info("expiring idle sequence %s of %s…", seq_id, origin[:12])
                    self._free(origin, seq_id)

    async def _peer(self, addr: str) -> Link:
        link = self.outbound.get(addr)
        if link is None or not link.is_open:
            link = await Link.connect(self.identity, PeerAddress.parse(addr), self.delay_s)
            self.outbound[addr] = link
            asyncio.ensure_future(self._drain(addr, link))
        return link

    async def _drain(self, addr: str, link: Link) -> None:
        """Read (and drop) what a downstream peer sends us, so its socket never backs up."""
        async for _ in link:
            pass
        if self.outbound.get(addr) is link:
            del self.outbound[addr]

    # ---- compute ---------------------------------------------------------------------------------
    async def _forward(self, link: Link, frame: Frame) -> None:
        meta = frame.meta
        origin = meta.get("origin") if isinstance(meta.get("origin"), str) else link.peer
        step = meta.get("step")
        try:
            chunks = [SeqChunk.from_dict(c) for c in meta.get("chunks", [])]
            route = meta.get("route", [])
            if not isinstance(route, list) or not all(isinstance(r, str) for r in route):
                raise ChunkError("route must be a list of PUBKEY@host:port strings")
            local = [SeqChunk(self._kv_id(origin, c.seq_id), c.start, c.length, c.parents, c.commit) for c in chunks]
            x = wire.unpack_hidden(frame.tensor, self.runner.model.dtype)
            hidden = wire.pack_hidden(self._run(x, local))
            if route:
                out_meta = {"origin": origin, "step": step, "chunks": meta.get("chunks"), "route": route[1:]}
                try:
                    nxt = await self._peer(route[0])
                    await nxt.send(Frame(FrameKind.FORWARD, out_meta, hidden))
                except (LinkClosed, DllmError) as e:
                    await self._to_origin(origin, link, Frame(FrameKind.ERROR, {
                        "step": step, "code": "downstream_unreachable", "peer": route[0], "message": str(e)}))
            else:
                await self._to_origin(origin, link, Frame(FrameKind.RESULT, {"step": step}, hidden))
            self.frames_done += 1
        except KVBudgetExceeded as e:
            await self._to_origin(origin, link, Frame(FrameKind.BUSY, {"step": step, "message": str(e),
                                                                      "retry_after_ms": 200}))
        except (DllmError, ValueError, IndexError, KeyError, TypeError) as e:
            log.warning("step %s from %s… failed: %s", step, origin[:12], e)
            await self._to_origin(origin, link, Frame(FrameKind.ERROR, {"step": step, "code": "bad_request",
                                                                       "message": f"{type(e).__name__}: {e}"}))
        except Exception as e:  # a bug or the device failing: tell the coordinator, keep serving
            log.exception("step %s from %s… crashed", step, origin[:12])
            await self._to_origin(origin, link, Frame(FrameKind.ERROR, {"step": step, "code": "internal_error",
                                                                       "message": f"{type(e).__name__}: {e}"}))

    def _warm(self) -> None:
        """While idle: run a FORWARD's receive path (open, decode, chunks, cast) on a dummy frame
        over a private channel, so the real one finds it in cache (see dllm.net.loop)."""
        if self._warm_kit is None:
            cid = os.urandom(15)
            me = self.identity
            meta = {"origin": me.public_key, "step": 0, "chunks": [{"s": 0, "a": 0, "n": 1}], "route": []}
            hidden = torch.zeros(1, self.runner.model.config.hidden_size, dtype=torch.float16)
            self._warm_kit = (SecureChannel(me, me.public_key, cid, True), SecureChannel(me, me.public_key, cid, False),
                              wire.encode(Frame(FrameKind.FORWARD, meta, hidden)))
        tx, rx, data = self._warm_kit
        frame = wire.decode(rx.open(tx.seal(data)))
        [SeqChunk.from_dict(c) for c in frame.meta["chunks"]]
        wire.unpack_hidden(frame.tensor, self.runner.model.dtype)

    def _run(self, x: torch.Tensor, chunks: list[SeqChunk]) -> torch.Tensor:
        return self.runner.forward(x, chunks)

    async def _to_origin(self, origin: str, fallback: Link, frame: Frame) -> None:
        link = self.inbound.get(origin)
        with contextlib.suppress(LinkClosed):
            await (link if link is not None and link.is_open else fallback).send(frame)


async def serve_stage(server, host: str, port: int) -> web.AppRunner:
    """Start a node's app (a StageServer, or any server with ``.app()``) on host:port."""
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner
