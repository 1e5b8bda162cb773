"""Remote drafters: used when they arrive in time, ignored otherwise; the output never changes."""
import asyncio
import subprocess
import sys
import threading
import time

import pytest
import torch
from aiohttp import web

from dllm.launch import local_engine
from dllm.net.crypto import Identity
from dllm.net.link import WS_PATH, Link
from dllm.net.local_cluster import free_port, wait_ready
from dllm.net.wire import Frame, FrameKind
from dllm.sampling import SamplingParams
from dllm.spec.drafters import NgramDrafter
from dllm.spec.remote import ForestDrafter

from .conftest import make_tiny_hf

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-forest")
    make_tiny_hf("llama", d)
    return d


def start_drafter(tmp_path, model_dir, *extra):
    key = tmp_path / f"drafter-{len(list(tmp_path.iterdir()))}.key"
    Identity.generate().save(key)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dllm.cli", "node", "--role", "drafter", "--model", str(model_dir),
                             "--listen", f"127.0.0.1:{port}", "--identity", str(key), "--threads", "1",
                             "--dtype", "float32", *extra],  # fp32: the drafter is exactly the target
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return proc, wait_ready(proc, 120)


@pytest.fixture(scope="module")
def greedy(tiny_dir):
    return local_engine(tiny_dir).generate_all(PROMPT, SamplingParams(max_tokens=40, ignore_eos=True))


def run_forest(tiny_dir, forest, depth=4):
    eng = local_engine(tiny_dir, drafter=forest, spec_depth=depth)
    t0 = time.monotonic()
    out = eng.generate_all(PROMPT, SamplingParams(max_tokens=40, ignore_eos=True))
    return out, eng, time.monotonic() - t0


def test_remote_model_drafter_is_used_and_exact(tiny_dir, greedy, tmp_path):
    proc, addr = start_drafter(tmp_path, tiny_dir)
    try:
        forest = ForestDrafter(None, [str(addr)], vocab_size=128, deadline_s=5.0)
        out, eng, _ = run_forest(tiny_dir, forest)
        assert out == greedy
        assert forest.remotes[0].stats["used"] > 0
        assert eng.stats.mean_accepted > 3.0  # the drafter runs the target model: it is always right
        forest.close()
    finally:
        proc.kill()


def test_slow_drafter_costs_at_most_the_deadline(tiny_dir, greedy, tmp_path):
    proc, addr = start_drafter(tmp_path, tiny_dir, "--emulate-rtt", "2000")  # replies ~1 s late
    try:
        forest = ForestDrafter(NgramDrafter(), [str(addr)], vocab_size=128, deadline_s=0.05)
        out, eng, wall = run_forest(tiny_dir, forest)
        assert out == greedy
        assert forest.remotes[0].stats["used"] == 0
        # every pass waited at most the deadline (plus compute): far below one late reply per pass
        assert wall < eng.stats.passes * 0.05 + 20
        forest.close()
    finally:
        proc.kill()


def test_dead_drafter_is_ignored(tiny_dir, greedy):
    dead = f"{Identity.generate().public_key}@127.0.0.1:{free_port()}"
    forest = ForestDrafter(NgramDrafter(), [dead], vocab_size=128, deadline_s=0.05)
    out, eng, wall = run_forest(tiny_dir, forest)
    assert out == greedy and forest.remotes[0].stats["down"] > 0
    forest.close()


class GarbageDrafter:
    """A malicious peer: authenticates properly, then answers every request with junk."""

    def __init__(self):
        self.ident = Identity.generate()
        self.port = free_port()
        self.n = 0

    async def handle(self, request):
        link = await Link.accept(request, self.ident)
        async for frame in link:
            if frame.kind != FrameKind.DRAFT_REQUEST:
                continue
            self.n += 1
            req = frame.meta["req"]
            junk = [
                Frame(FrameKind.DRAFT_REPLY, {"req": req, "parents": [0, 5], "scores": [0, 0]}, torch.tensor([1, 2])),
                Frame(FrameKind.DRAFT_REPLY, {"req": req, "parents": [0], "scores": [0]}, torch.tensor([10 ** 9])),
                Frame(FrameKind.DRAFT_REPLY, {"req": req, "parents": [0], "scores": [0]}, torch.tensor([1.5])),
                Frame(FrameKind.DRAFT_REPLY, {"req": req, "parents": "x", "scores": None}, None),
                Frame(FrameKind.DRAFT_REPLY, {"req": req, "parents": [0] * 500, "scores": [0] * 500},
                      torch.zeros(500, dtype=torch.int64)),
                # well-formed but wrong: it may be used, and verification must reject it
                Frame(FrameKind.DRAFT_REPLY, {"req": req, "parents": [0, 1, 2], "scores": [9, 9, 9]},
                      torch.tensor([7, 7, 7])),
            ][self.n % 6]
            await link.send(junk)
        return link.ws

    def start(self):
        ready = threading.Event()

        def serve():
            async def main():
                app = web.Application()
                app.router.add_get(WS_PATH, self.handle)
                runner = web.AppRunner(app)
                await runner.setup()
                await web.TCPSite(runner, "127.0.0.1", self.port).start()
                ready.set()
                await asyncio.Event().wait()
            asyncio.run(main())

        threading.Thread(target=serve, daemon=True).start()
        ready.wait(10)
        return f"{self.ident.public_key}@127.0.0.1:{self.port}"


def test_garbage_drafter_never_changes_output(tiny_dir, greedy):
    g = GarbageDrafter()
    forest = ForestDrafter(NgramDrafter(), [g.start()], vocab_size=128, deadline_s=1.0)
    out, eng, _ = run_forest(tiny_dir, forest)
    assert out == greedy
    assert g.n > 0 and forest.remotes[0].stats["invalid"] > 0
    forest.close()
