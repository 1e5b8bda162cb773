"""Shared fixtures: one SmolLM2 engine (two in-process stages) behind one EngineWorker for the
whole session, and servers on real 127.0.0.1 sockets, each running its own event loop in a thread
so sync clients (openai, Playwright) can call them from the test thread."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from tests.models import model_dir_or_skip

MODEL = "smollm2"


class ServerThread:
    """An aiohttp app served on 127.0.0.1:<free port> from a background event loop."""

    def __init__(self, app):
        from dllm.api.server import serve

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="api-test-loop", daemon=True)
        self.thread.start()
        self.runner, self.port = self.run(serve(app, "127.0.0.1", 0, shutdown_timeout=1.0))
        self.url = f"http://127.0.0.1:{self.port}"

    def run(self, coro, timeout: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.run(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="session")
def model_dir():
    return model_dir_or_skip(MODEL)


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from dllm.tokenizer import Tokenizer

    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="session")
def worker(model_dir, tokenizer):
    from dllm.api.worker import EngineWorker
    from dllm.launch import local_engine

    engine = local_engine(model_dir, stages=2, kv_tokens=8192, eos_ids=sorted(tokenizer.eos_token_ids))
    w = EngineWorker(engine, max_pending=128)
    yield w
    w.close()


@pytest.fixture
def make_server(worker, tokenizer):
    """make_server(**create_app kwargs) -> ServerThread; all are stopped after the test."""
    from dllm.api.server import create_app

    servers = []

    def make(**kw) -> ServerThread:
        kw.setdefault("rate_limit", None)
        s = ServerThread(create_app(worker, tokenizer, MODEL, **kw))
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def server(make_server):
    return make_server()


def engine_call(worker, fn, timeout: float = 120.0):
    """fn(engine) on the worker thread, from plain test code."""
    async def go():
        return await worker.call(fn)
    return asyncio.run(asyncio.wait_for(go(), timeout))


def solo_greedy(worker, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """The reference: the same engine generating this prompt alone (nothing else in flight)."""
    from dllm.sampling import SamplingParams

    def gen(engine):
        assert not engine.has_work, "solo reference needs an idle engine"
        return engine.generate_all(prompt_ids, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    return engine_call(worker, gen)


def kv_state(engine) -> dict:
    """Free vs total KV blocks on every stage, plus what the engine still holds."""
    runners = [engine.head] + list(getattr(engine.pipeline, "runners", []))
    return {"free": [r.blocks.num_free for r in runners], "total": [r.blocks.num_blocks for r in runners],
            "seqs": [len(r.blocks.seqs) for r in runners], "running": len(engine.running),
            "waiting": len(engine.waiting)}


def wait_idle(worker, timeout: float = 60.0) -> dict:
    """Poll until nothing is in flight and every stage's KV blocks are free; returns the last state."""
    deadline = time.monotonic() + timeout
    while True:
        state = engine_call(worker, kv_state)
        idle = (worker.in_flight == 0 and state["free"] == state["total"] and not any(state["seqs"])
                and not state["running"] and not state["waiting"])
        if idle or time.monotonic() > deadline:
            return dict(state, in_flight=worker.in_flight, idle=idle)
        time.sleep(0.1)


def text_of(tokenizer, ids: list[int]) -> str:
    """What the API returns for these generated ids: EOS dropped, special tokens skipped."""
    return tokenizer.decode([t for t in ids if t not in tokenizer.eos_token_ids])
