"""RemoteChain against a StageServer in this process (its loop on a thread): the inline loop,
inline compute, the emulated delay per hop, warm-ups, and session bookkeeping."""
import asyncio
import threading
import time

import pytest
import torch

from dllm.batch import SeqChunk
from dllm.errors import StageFailure
from dllm.model.runner import StageRunner
from dllm.model.stage import StageModel
from dllm.net import wire
from dllm.net.chain import RemoteChain
from dllm.net.crypto import Identity, PeerAddress
from dllm.net.local_cluster import free_port
from dllm.net.loop import BusyPoll
from dllm.net.stage_server import StageServer, serve_stage

from ..conftest import make_tiny_hf

H = 64


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-inproc")
    make_tiny_hf("qwen2", d, num_hidden_layers=3)
    return d


def runner(tiny_dir, a, b):
    return StageRunner.for_tokens(StageModel.from_pretrained(tiny_dir, layers=range(a, b), embed=False, head=False,
                                                             dtype="float32"), 256)


class ServedStage:
    """A StageServer for layers 1:3 on its own event loop thread."""

    def __init__(self, tiny_dir, emulate_rtt_ms=0.0):
        self.ident = Identity.generate()
        self.server = StageServer(runner(tiny_dir, 1, 3), self.ident, emulate_rtt_ms=emulate_rtt_ms, busy_poll_ms=50)
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.runner = self.loop.run_until_complete(serve_stage(self.server, "127.0.0.1", self.port))
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(30)
        self.addr = str(PeerAddress(self.ident.public_key, "127.0.0.1", self.port))

    def stop(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def wire_round(x):
    return wire.unpack_hidden(wire.pack_hidden(x), torch.float32)


def test_chain_pass_equals_local_layers_and_runs_in_the_calling_thread(tiny_dir):
    stage = ServedStage(tiny_dir)
    before = set(threading.enumerate())
    chain = RemoteChain(Identity.generate(), [stage.addr], first_layer=1, num_layers=3, busy_poll_ms=50)
    local = runner(tiny_dir, 1, 3)
    try:
        assert isinstance(chain._loop._selector, BusyPoll) and chain._warm in chain._loop._selector.warmers
        assert set(threading.enumerate()) <= before  # the chain runs its network in the caller's thread
        g = torch.Generator().manual_seed(0)
        x = torch.randn(5, H, generator=g)
        got = chain.forward(x, [SeqChunk(1, 0, 5)])
        want = wire_round(local.forward(wire_round(x), [SeqChunk(1, 0, 5)]))
        assert torch.equal(got, want)
        for i in range(5, 9):  # decode steps
            x = torch.randn(1, H, generator=g)
            assert torch.equal(chain.forward(x, [SeqChunk(1, i, 1)]),
                               wire_round(local.forward(wire_round(x), [SeqChunk(1, i, 1)])))
        # the warm-ups run the real receive paths without touching the real channels (on their
        # own loop's thread: the stage's loop calls its warmer while it spins)
        chain._warm()

        async def warm_stage():
            stage.server._warm()

        asyncio.run_coroutine_threadsafe(warm_stage(), stage.loop).result(10)
        assert chain._warm in chain._loop._selector.warmers  # a warmer that raised would be dropped
        assert stage.server._warm in stage.loop._selector.warmers
        assert stage.server.frames_done == 5
        assert chain.status()[stage.addr]["sessions"] == 1
        chain.free(1)
        assert chain.status()[stage.addr]["sessions"] == 0
    finally:
        chain.close()
        stage.stop()


def test_emulated_rtt_is_paid_once_per_pass_not_more(tiny_dir):
    rtt_ms = 30.0
    stage = ServedStage(tiny_dir, emulate_rtt_ms=rtt_ms)
    chain = RemoteChain(Identity.generate(), [stage.addr], first_layer=1, num_layers=3, emulate_rtt_ms=rtt_ms,
                        busy_poll_ms=100)
    try:
        times = []
        for i in range(8):
            t = time.perf_counter()
            chain.forward(torch.randn(1, H), [SeqChunk(1, i, 1)])
            times.append(time.perf_counter() - t)
        best = min(times[1:])
        assert rtt_ms / 1000 <= best < rtt_ms / 1000 + 0.010, times
        # CLOSE_SESSION is not held back until the next call
        chain.free(1)
        time.sleep(0.05)
        deadline = time.monotonic() + 5
        while stage.server._seq_ids and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not stage.server._seq_ids
    finally:
        chain.close()
        stage.stop()


def test_a_crashing_stage_reports_an_error_and_keeps_serving(tiny_dir, monkeypatch):
    stage = ServedStage(tiny_dir)
    chain = RemoteChain(Identity.generate(), [stage.addr], first_layer=1, num_layers=3, busy_poll_ms=10)
    try:
        real = stage.server._run

        def boom(x, chunks):
            raise RuntimeError("device fell over")

        stage.server._run = boom
        with pytest.raises(StageFailure, match="internal_error"):
            chain.forward(torch.randn(1, H), [SeqChunk(1, 0, 1)])
        stage.server._run = real
        assert chain.forward(torch.randn(1, H), [SeqChunk(1, 0, 1)]).shape == (1, H)
    finally:
        chain.close()
        stage.stop()
