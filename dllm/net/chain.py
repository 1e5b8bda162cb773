"""RemoteChain: the coordinator's view of the stages after its own layers, as a Pipeline.

One forward pass crosses the network once: coordinator -> stage 1 -> … -> stage N -> coordinator.
The coordinator sends FORWARD to stage 1 with the route of the remaining stages; the last
stage sends RESULT straight back over the link the coordinator opened to it. The coordinator
holds a link to every stage (and to spares) for results, errors, pings and session closes —
hidden states never pass through it mid-chain.

The engine thread calls ``forward(x, chunks)`` synchronously and runs the network itself: the
asyncio loop is an InlineLoop (dllm.net.loop) that runs in the calling thread for the length of
the call and busy-polls while it waits, so a pass costs no thread hand-off and the thread that
computes next never goes idle in between. Between calls the loop is still; frames nobody waits
for (CLOSE_SESSION) go out at once rather than after the emulated delay, so they do not wait
for the next call. A pass that fails or stalls past ``deadline_s`` raises StageFailure;
``recover()`` then pings the chain, swaps each dead stage for a live spare serving the same
layers, and the engine replays its sequences through the new chain.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time

import torch

from dllm.batch import SeqChunk
from dllm.errors import ChainError, DllmError, StageBusy, StageFailure
from dllm.net import wire
from dllm.net.crypto import Identity, PeerAddress, SecureChannel
from dllm.net.link import Link, LinkClosed
from dllm.net.loop import InlineLoop, add_warmer
from dllm.net.wire import Frame, FrameKind

log = logging.getLogger("dllm.chain")


def _fail(fut: asyncio.Future, exc: Exception) -> None:
    if not fut.done():
        fut.set_exception(exc)


class _Peer:
    def __init__(self, addr: PeerAddress):
        self.addr = addr
        self.key = addr.public_key
        self.link: Link | None = None
        self.layers: tuple[int, int] | None = None
        self.rtt_s: float | None = None


class RemoteChain:
    def __init__(self, identity: Identity, peers: list[str | PeerAddress], first_layer: int, num_layers: int,
                 *, emulate_rtt_ms: float = 0.0, deadline_s: float = 30.0, connect_timeout_s: float = 10.0,
                 busy_poll_ms: float | None = None):
        self.identity = identity
        self.peers = [_Peer(p if isinstance(p, PeerAddress) else PeerAddress.parse(p)) for p in peers]
        self.first_layer, self.num_layers = first_layer, num_layers
        self.delay_s = emulate_rtt_ms / 2000.0
        self.deadline_s = deadline_s
        self.connect_timeout_s = connect_timeout_s
        self.chain: list[_Peer] = []
        self._steps = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._bg = InlineLoop(None if busy_poll_ms is None else busy_poll_ms / 1000)
        self._loop = self._bg.loop
        self._warm_kit = None  # (sealer, opener, sealed-able RESULT bytes, dtype) once a pass has run
        add_warmer(self._loop, self._warm)
        self.last_pass_s = 0.0
        self.passes = 0
        self._call(self._connect_all(), self.connect_timeout_s + 5)
        self.chain = self._plan()

    # ---- plumbing --------------------------------------------------------------------------------
    def _call(self, coro, timeout: float):
        return self._bg.call(coro, timeout)

    async def _connect(self, p: _Peer) -> bool:
        if p.link is not None and p.link.is_open:
            return True
        try:
            p.link = await asyncio.wait_for(Link.connect(self.identity, p.addr, self.delay_s), self.connect_timeout_s)
            await p.link.send(Frame(FrameKind.HELLO, {"role": "coordinator"}))
            hello = await asyncio.wait_for(p.link.recv(), self.connect_timeout_s)
            if hello.kind != FrameKind.HELLO or not isinstance(hello.meta.get("layers"), list):
                raise LinkClosed(f"{p.addr} did not answer HELLO")
            p.layers = tuple(hello.meta["layers"])
            asyncio.ensure_future(self._read(p, p.link))
            return True
        except (LinkClosed, DllmError, asyncio.TimeoutError, OSError) as e:
            log.warning("peer %s unavailable: %s", p.addr, e)
            p.link = None
            return False

    async def _connect_all(self) -> None:
        await asyncio.gather(*(self._connect(p) for p in self.peers))

    async def _read(self, p: _Peer, link: Link) -> None:
        async for frame in link:
            step = frame.meta.get("step")
            if frame.kind == FrameKind.PONG:
                fut = self._pending.pop(("ping", p.key, frame.meta.get("t")), None)
            else:
                fut = self._pending.pop(step, None)
            if fut is not None and not fut.done():
                fut.set_result((p, frame))
        # a chain stage's link is gone: fail the pass in flight now rather than at the deadline
        if p not in self.chain:
            return
        for key, fut in list(self._pending.items()):
            if not isinstance(key, tuple) and not fut.done():
                fut.set_exception(StageFailure(f"link to stage {p.addr} closed: {link.closed_reason}"))

    def _plan(self) -> list[_Peer]:
        """Live peers covering [first_layer, num_layers) contiguously; lowest RTT first among equals."""
        chain, at = [], self.first_layer
        while at < self.num_layers:
            options = [p for p in self.peers if p.link is not None and p.link.is_open and p.layers
                       and p.layers[0] == at and p.layers[1] > at]
            if not options:
                raise ChainError(f"no live peer serves layers starting at {at} (model has {self.num_layers}); "
                                 f"peers: {[(str(p.addr), p.layers) for p in self.peers]}")
            options.sort(key=lambda p: (p.rtt_s is None, p.rtt_s or 0.0, -p.layers[1]))
            chain.append(options[0])
            at = options[0].layers[1]
        return chain

    def _warm(self) -> None:
        """While waiting for a RESULT: run the RESULT's receive path (open, decode, cast) on a
        dummy frame over a private channel, so the real one finds it in cache (dllm.net.loop)."""
        kit = self._warm_kit
        if kit is not None:
            tx, rx, data, dtype = kit
            wire.unpack_hidden(wire.decode(rx.open(tx.seal(data))).tensor, dtype)

    def _make_warm_kit(self, x: torch.Tensor):
        cid = os.urandom(15)
        tx = SecureChannel(self.identity, self.identity.public_key, cid, True)
        rx = SecureChannel(self.identity, self.identity.public_key, cid, False)
        data = wire.encode(Frame(FrameKind.RESULT, {"step": 0}, torch.zeros(1, x.shape[-1], dtype=torch.float16)))
        return tx, rx, data, x.dtype

    # ---- Pipeline ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, chunks: list[SeqChunk]) -> torch.Tensor:
        """x [T, H] -> [T, H] after every remote stage (one trip around the ring)."""
        if self._warm_kit is None or self._warm_kit[3] != x.dtype:
            self._warm_kit = self._make_warm_kit(x)
        t0 = time.perf_counter()
        try:
            y = self._call(self._forward(wire.pack_hidden(x), chunks), self.deadline_s + 1)
        except TimeoutError:
            raise StageFailure(f"chain pass stalled past its {self.deadline_s:.0f} s deadline") from None
        self.last_pass_s = time.perf_counter() - t0
        self.passes += 1
        return wire.unpack_hidden(y, x.dtype, x.device)

    async def _forward(self, hidden: torch.Tensor, chunks: list[SeqChunk]) -> torch.Tensor:
        if not self.chain:
            raise StageFailure("no chain")
        step = next(self._steps)
        fut = self._loop.create_future()
        self._pending[step] = fut
        meta = {"origin": self.identity.public_key, "step": step, "chunks": [c.to_dict() for c in chunks],
                "route": [str(p.addr) for p in self.chain[1:]]}
        # the deadline fails the future itself (asyncio.wait_for would add a hop per pass)
        timer = self._loop.call_later(self.deadline_s, _fail, fut, StageFailure(
            f"no result within {self.deadline_s:.0f} s (a stage died or stalled)"))
        try:
            await self.chain[0].link.send(Frame(FrameKind.FORWARD, meta, hidden))
            peer, frame = await fut
        except (LinkClosed, AttributeError) as e:
            raise StageFailure(f"stage 1 link failed: {e}") from None
        finally:
            timer.cancel()
            self._pending.pop(step, None)
        if frame.kind == FrameKind.RESULT:
            return frame.tensor
        if frame.kind == FrameKind.BUSY:
            raise StageBusy(f"stage {peer.addr} is busy: {frame.meta.get('message')}")
        raise StageFailure(f"stage {peer.addr} reported {frame.meta.get('code')}: {frame.meta.get('message')}")

    def free(self, seq_id: int) -> None:
        self._call(self._close([seq_id]), self.connect_timeout_s)

    async def _close(self, seq_ids: list[int]) -> None:
        for p in self.chain:
            if p.link is not None and p.link.is_open:
                try:
                    await p.link.send(Frame(FrameKind.CLOSE_SESSION, {"seqs": seq_ids}), delay=False)
                except LinkClosed:
                    pass

    # ---- health and failover ----------------------------------------------------------------------
    async def _ping(self, p: _Peer, timeout: float) -> bool:
        if p.link is None or not p.link.is_open:
            if not await self._connect(p):
                return False
        t = time.monotonic()
        fut = self._loop.create_future()
        self._pending[("ping", p.key, t)] = fut
        try:
            await p.link.send(Frame(FrameKind.PING, {"t": t}))
            await asyncio.wait_for(fut, timeout)
            p.rtt_s = time.monotonic() - t
            return True
        except (asyncio.TimeoutError, LinkClosed, StageFailure):
            self._pending.pop(("ping", p.key, t), None)
            if p.link is not None:
                await p.link.close()
            p.link = None
            return False

    def recover(self, ping_timeout_s: float = 2.0) -> list[str]:
        """Drop peers that do not answer a ping, rebuild the chain from live ones.

        Returns the addresses of the stages that were replaced. ChainError if some layer range
        has no live peer left."""
        async def check():
            return await asyncio.gather(*(self._ping(p, ping_timeout_s) for p in self.peers))

        self._call(check(), ping_timeout_s + self.connect_timeout_s + 5)
        old = [str(p.addr) for p in self.chain]
        self.chain = self._plan()
        new = [str(p.addr) for p in self.chain]
        return [a for a in old if a not in new]

    def status(self, timeout_s: float = 5.0) -> dict[str, dict]:
        """PONG metadata of every chain stage (sessions held, free KV tokens), by address."""
        async def ask(p):
            t = time.monotonic()
            fut = self._loop.create_future()
            self._pending[("ping", p.key, t)] = fut
            await p.link.send(Frame(FrameKind.PING, {"t": t}))
            _, frame = await asyncio.wait_for(fut, timeout_s)
            return str(p.addr), frame.meta

        async def all_():
            return dict(await asyncio.gather(*(ask(p) for p in self.chain)))
        return self._call(all_(), timeout_s + 1)

    def stage_rtts(self) -> dict[str, float | None]:
        return {str(p.addr): p.rtt_s for p in self.chain}

    def close(self) -> None:
        async def shut():
            for p in self.peers:
                if p.link is not None:
                    await p.link.close()
        try:
            self._call(shut(), 5)
        except Exception:
            pass
        self._bg.stop()
