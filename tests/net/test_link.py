"""Link over a real loopback WebSocket: emulated delay, ordering, no compression, failures."""
import asyncio

import pytest
from aiohttp import web

from dllm.net.crypto import Identity, PeerAddress
from dllm.net.link import WS_PATH, Link, LinkClosed
from dllm.net.local_cluster import free_port
from dllm.net.wire import Frame, FrameKind


async def serve(delay_s=0.0):
    """An echo node: every frame comes back as a PONG carrying its meta and arrival time."""
    ident = Identity.generate()
    state = {"links": [], "arrivals": []}

    async def handle(request):
        link = await Link.accept(request, ident, None, delay_s)
        if link is None:
            return web.Response(status=403)
        state["links"].append(link)
        try:
            async for frame in link:
                t = asyncio.get_running_loop().time()
                state["arrivals"].append((frame.meta.get("i"), t))
                await link.send(Frame(FrameKind.PONG, {**frame.meta, "arrived": t}))
        except LinkClosed:
            pass
        finally:
            await link.close()
        return link.ws

    app = web.Application()
    app.router.add_get(WS_PATH, handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, PeerAddress(ident.public_key, "127.0.0.1", port), state


def test_delayed_frames_arrive_in_order_at_their_due_time():
    async def go():
        runner, addr, state = await serve()
        link = await Link.connect(Identity.generate(), addr, delay_s=0.03)
        try:
            assert link.ws.compress == 0 and state["links"][0].ws.compress == 0  # no per-message deflate
            loop = asyncio.get_running_loop()
            sent = {}
            for i in range(5):
                sent[i] = loop.time()
                await link.send(Frame(FrameKind.PING, {"i": i}))  # returns at once: the delay is the writer's
                await asyncio.sleep(0.004)
            assert loop.time() - sent[0] < 0.03
            back = [await asyncio.wait_for(link.recv(), 5) for _ in range(5)]
            assert [f.meta["i"] for f in back] == list(range(5))
            for f in back:
                late = f.meta["arrived"] - sent[f.meta["i"]]
                assert 0.03 <= late < 0.03 + 0.02, late
        finally:
            await link.close()
            await runner.cleanup()

    asyncio.run(go())


def test_undelayed_send_skips_the_emulated_delay_only_when_nothing_waits():
    async def go():
        runner, addr, _ = await serve()
        link = await Link.connect(Identity.generate(), addr, delay_s=0.2)
        try:
            loop = asyncio.get_running_loop()
            t = loop.time()
            await link.send(Frame(FrameKind.PING, {"i": 0}), delay=False)
            f = await asyncio.wait_for(link.recv(), 5)
            assert f.meta["arrived"] - t < 0.1
            # behind a delayed frame, an undelayed one waits its turn (sequence order is the socket's)
            await link.send(Frame(FrameKind.PING, {"i": 1}))
            await link.send(Frame(FrameKind.PING, {"i": 2}), delay=False)
            got = [await asyncio.wait_for(link.recv(), 5) for _ in range(2)]
            assert [g.meta["i"] for g in got] == [1, 2]
            assert got[1].meta["arrived"] - t >= 0.2
        finally:
            await link.close()
            await runner.cleanup()

    asyncio.run(go())


def test_send_after_the_peer_left_raises_link_closed():
    async def go():
        runner, addr, state = await serve()
        link = await Link.connect(Identity.generate(), addr)
        await link.send(Frame(FrameKind.PING, {"i": 0}))
        await asyncio.wait_for(link.recv(), 5)
        await state["links"][0].close()
        with pytest.raises(LinkClosed):
            await asyncio.wait_for(link.recv(), 5)
        with pytest.raises(LinkClosed):
            await link.send(Frame(FrameKind.PING, {"i": 1}))
        assert not link.is_open
        await link.close()
        await runner.cleanup()

    asyncio.run(go())
