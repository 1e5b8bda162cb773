"""EngineWorker: the one engine thread seen from asyncio. A fake engine pins down the lifecycle
(cancel, busy, failure, shutdown) fast; the real one shows tokens and KV freeing on every stage."""
import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from dllm.api.worker import Busy, EngineFailed, EngineWorker, WorkerClosed
from dllm.errors import RequestError
from dllm.sampling import SamplingParams
from tests.api.conftest import solo_greedy, wait_idle


class FakeEngine:
    """Each step gives every running sequence one token (seq_id * 1000 + position)."""

    def __init__(self, step_s: float = 0.002, fail_at: int | None = None):
        self.eos_ids, self.step_s, self.fail_at = {7}, step_s, fail_at
        self.model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=100))
        self.head = SimpleNamespace(blocks=SimpleNamespace(num_blocks=10), block_size=16)
        self.running, self.aborted, self.steps, self._next = [], [], 0, 1
        self.thread_ids = set()

    @property
    def has_work(self):
        return bool(self.running)

    def add(self, prompt, params):
        self.thread_ids.add(threading.get_ident())
        if len(prompt) > 50:
            raise RequestError("prompt too long")
        seq = SimpleNamespace(seq_id=self._next, output=[], params=params, finish_reason=None)
        seq.finished = False
        self._next += 1
        self.running.append(seq)
        return seq

    def abort(self, seq):
        self.thread_ids.add(threading.get_ident())
        if seq in self.running:
            self.running.remove(seq)
            seq.finish_reason, seq.finished = "abort", True
            self.aborted.append(seq.seq_id)

    def step(self):
        self.thread_ids.add(threading.get_ident())
        self.steps += 1
        if self.fail_at is not None and self.steps >= self.fail_at:
            raise RuntimeError("boom")
        time.sleep(self.step_s)
        for s in self.running:
            s.output.append(s.seq_id * 1000 + len(s.output))
            if len(s.output) >= s.params.max_tokens:
                s.finish_reason, s.finished = "length", True
        done = list(self.running)
        self.running = [s for s in self.running if not s.finished]
        return done


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def collect(stream):
    return [t async for t in stream]


def test_tokens_arrive_in_order_and_engine_stays_on_one_thread():
    eng = FakeEngine()
    w = EngineWorker(eng)
    try:
        async def main():
            streams = [w.submit([1, 2], SamplingParams(max_tokens=n)) for n in (3, 5, 1)]
            return await asyncio.gather(*(collect(s) for s in streams)), streams
        outs, streams = run(main())
        assert outs == [[1000, 1001, 1002], [2000, 2001, 2002, 2003, 2004], [3000]]
        assert [s.finish_reason for s in streams] == ["length"] * 3
        assert eng.thread_ids == {w._thread.ident} and w.in_flight == 0
    finally:
        w.close()


def test_cancel_aborts_and_frees_the_slot():
    eng = FakeEngine(step_s=0.01)
    w = EngineWorker(eng)
    try:
        async def main():
            s = w.submit([1], SamplingParams(max_tokens=10_000))
            got = []
            async for t in s:
                got.append(t)
                if len(got) == 3:
                    s.cancel()
            return got, s
        got, s = run(main())
        assert got == [1000, 1001, 1002]
        deadline = time.monotonic() + 5
        while w.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert eng.aborted == [s.seq.seq_id] and w.in_flight == 0 and not eng.running
    finally:
        w.close()


def test_cancel_before_the_engine_saw_it():
    eng = FakeEngine()
    w = EngineWorker(eng)
    try:
        async def main():
            s = w.submit([1], SamplingParams(max_tokens=5))
            s.cancel()
            return await collect(s)
        run(main())
        deadline = time.monotonic() + 5
        while w.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert w.in_flight == 0 and not eng.running
    finally:
        w.close()


def test_busy_when_the_queue_is_full():
    w = EngineWorker(FakeEngine(step_s=0.05), max_pending=2)
    try:
        async def main():
            a = w.submit([1], SamplingParams(max_tokens=3))
            b = w.submit([1], SamplingParams(max_tokens=3))
            with pytest.raises(Busy):
                w.submit([1], SamplingParams(max_tokens=3))
            await asyncio.gather(collect(a), collect(b))
            return await collect(w.submit([1], SamplingParams(max_tokens=1)))  # room again
        assert len(run(main())) == 1
    finally:
        w.close()


def test_refused_request_raises_on_accept():
    w = EngineWorker(FakeEngine())
    try:
        async def main():
            s = w.submit(list(range(60)), SamplingParams(max_tokens=3))
            with pytest.raises(RequestError):
                await s.accepted()
            with pytest.raises(RequestError):
                await collect(s)
        run(main())
        assert w.in_flight == 0
    finally:
        w.close()


def test_engine_failure_reaches_every_stream_and_the_worker_survives():
    eng = FakeEngine(fail_at=3)
    w = EngineWorker(eng)
    try:
        async def main():
            streams = [w.submit([1], SamplingParams(max_tokens=50)) for _ in range(2)]
            for s in streams:
                with pytest.raises(EngineFailed):
                    await collect(s)
            eng.fail_at = None
            return await collect(w.submit([1], SamplingParams(max_tokens=2)))
        assert len(run(main())) == 2
    finally:
        w.close()


def test_close_ends_streams_and_refuses_new_ones():
    w = EngineWorker(FakeEngine(step_s=0.01))

    async def main():
        s = w.submit([1], SamplingParams(max_tokens=10_000))
        await s.__anext__()
        await asyncio.get_running_loop().run_in_executor(None, w.close)
        with pytest.raises(WorkerClosed):
            await collect(s)
        with pytest.raises(WorkerClosed):
            w.submit([1], SamplingParams(max_tokens=1))
    run(main())
    assert not w._thread.is_alive()


# ---- the real engine (SmolLM2, two stages) -------------------------------------------------------
def test_real_engine_matches_solo_greedy(worker, tokenizer):
    ids = tokenizer.encode_chat([{"role": "user", "content": "Name three colors."}])
    want = solo_greedy(worker, ids, 12)

    async def main():
        return await collect(worker.submit(ids, SamplingParams(temperature=0.0, max_tokens=12)))
    assert run(main()) == want


def test_real_cancel_frees_kv_on_every_stage(worker, tokenizer):
    ids = tokenizer.encode_chat([{"role": "user", "content": "Write a long story."}])

    async def main():
        s = worker.submit(ids, SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True))
        n = 0
        async for _ in s:
            n += 1
            if n == 2:
                break
        s.cancel()
        return s
    s = run(main())
    state = wait_idle(worker, timeout=30)
    assert state["idle"], state
    assert s.seq.finish_reason == "abort" and len(s.seq.output) < 50


def test_new_requests_join_a_running_batch():
    eng = FakeEngine(step_s=0.005)
    w = EngineWorker(eng)
    try:
        async def main():
            a = w.submit([1], SamplingParams(max_tokens=200))
            got_a = [await a.__anext__() for _ in range(5)]
            b = w.submit([1], SamplingParams(max_tokens=3))
            got_b = await collect(b)
            a_len_when_b_done = len(a.seq.output)
            got_a += await collect(a)
            return got_a, got_b, a_len_when_b_done
        got_a, got_b, mid = run(main())
        assert len(got_a) == 200 and len(got_b) == 3
        assert mid < 200  # b ran alongside a, not after it
    finally:
        w.close()
