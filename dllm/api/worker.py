"""EngineWorker: the one thread that drives the Engine, seen from asyncio as token streams.

The Engine is not thread-safe, so exactly one background thread calls add/step/abort. Requests
and cancellations reach it through a command list under a lock; it applies them between steps
(so new requests join the running batch at the next pass), runs one ``engine.step()``, and
hands each sequence's new tokens to its stream's event loop with one ``call_soon_threadsafe``
per step. A stream whose consumer goes away (client disconnect, stop string) is aborted, which
frees its KV on every stage.

Starting the worker releases the constructing thread's idle OpenMP threads (release_openmp_threads),
so that the engine thread's team is the only one the runtime manages.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from dllm.engine import Engine
from dllm.errors import DllmError
from dllm.sampling import SamplingParams

log = logging.getLogger("dllm.api")


class Busy(DllmError):
    """Too many requests are queued or running: answer 503 and let the client retry."""


class WorkerClosed(DllmError):
    """The worker was shut down while the request was queued or running."""


class EngineFailed(DllmError):
    """engine.step() raised: every sequence in flight is aborted and its stream gets this."""


@dataclass
class _End:
    finish_reason: str


class TokenStream:
    """One request's token ids as an async iterator; ``finish_reason`` is set once it ends.

    ``await accepted()`` returns once the engine has queued the request and raises the engine's
    RequestError (prompt too long, ...) if it refused it. ``cancel()`` is idempotent and safe
    from any point; iteration raises WorkerClosed / EngineFailed if the worker gave up on it.
    """

    def __init__(self, worker: "EngineWorker", prompt: list[int], params: SamplingParams):
        self.prompt, self.params = list(prompt), params
        self.finish_reason: str | None = None
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self._worker = worker
        self._loop = asyncio.get_running_loop()
        self._accepted = self._loop.create_future()
        self._items: deque = deque()
        self._wake = asyncio.Event()
        self._done = False  # no more items will come from the worker
        self._cancelled = False
        self.seq = None  # the engine's Sequence; touched only on the worker thread
        self.sent = 0  # output tokens already handed over; worker thread only

    async def accepted(self) -> None:
        await self._accepted

    def __aiter__(self):
        return self

    async def __anext__(self) -> int:
        await self._accepted  # raises the engine's refusal, if any
        while not self._items:
            if self._done or self._cancelled:
                raise StopAsyncIteration
            self._wake.clear()
            await self._wake.wait()
        item = self._items.popleft()
        if isinstance(item, _End):
            self.finish_reason = item.finish_reason
            self._done = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item

    def cancel(self) -> None:
        if not self._cancelled and not self._done:
            self._cancelled = True
            self._worker._cancel(self)
        self._cancelled = True
        self._wake.set()

    # ---- called on the stream's loop by the worker thread ----------------------------------
    def _deliver(self, tokens: list[int], end: str | BaseException | None) -> None:
        if tokens and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self._items.extend(tokens)
        if end is not None:
            self._items.append(_End(end) if isinstance(end, str) else end)
        self._wake.set()

    def _accept(self, error: BaseException | None) -> None:
        if self._accepted.done():
            return
        if error is None:
            self._accepted.set_result(None)
        else:
            self._accepted.set_exception(error)
        self._wake.set()


class EngineWorker:
    """Owns ``engine`` on one daemon thread. ``max_pending`` bounds queued + running requests."""

    def __init__(self, engine: Engine, max_pending: int = 256, idle_wait: float = 0.5):
        self.engine = engine
        self.max_pending = max_pending
        self.idle_wait = idle_wait
        self.eos_ids = frozenset(engine.eos_ids)
        self.context_len = engine.model.config.max_position_embeddings
        self.kv_tokens = engine.head.blocks.num_blocks * engine.head.block_size
        self.tokens_generated = 0  # totals read by metrics (ints: safe to read from any thread)
        self.steps = 0
        self._rate = deque(maxlen=4096)  # (time, tokens) per step, for tokens/s (10 s even at 400 steps/s)
        self._cond = threading.Condition()
        self._commands: list[tuple] = []
        self._pending: set[TokenStream] = set()  # guarded by _cond
        self._streams: dict[int, TokenStream] = {}  # seq_id -> stream; worker thread only
        self._closing = False
        release_openmp_threads()
        self._thread = threading.Thread(target=self._run, name="dllm-engine", daemon=True)
        self._thread.start()

    # ---- asyncio side ------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams) -> TokenStream:
        """Queue a request; raises Busy when ``max_pending`` are in flight, WorkerClosed after close()."""
        stream = TokenStream(self, prompt_ids, params)
        with self._cond:
            if self._closing:
                raise WorkerClosed("the server is shutting down")
            if len(self._pending) >= self.max_pending:
                raise Busy(f"server busy: {len(self._pending)} requests in flight (limit {self.max_pending})")
            self._pending.add(stream)
            self._commands.append(("add", stream))
            self._cond.notify()
        return stream

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def has_room(self) -> bool:
        return len(self._pending) < self.max_pending and not self._closing

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Tokens generated per second over the last ``window`` seconds (0 when idle)."""
        now = time.perf_counter()
        recent = [(t, n) for t, n in list(self._rate) if now - t <= window]
        return sum(n for _, n in recent) / window if recent else 0.0

    async def call(self, fn: Callable[[Engine], object]):
        """Run ``fn(engine)`` on the worker thread between steps (inspection, tests)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._cond:
            self._commands.append(("call", (fn, loop, fut)))
            self._cond.notify()
        return await fut

    def close(self, timeout: float = 30.0) -> None:
        """Abort everything in flight, stop the thread and wait for it."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)

    def _cancel(self, stream: TokenStream) -> None:
        with self._cond:
            self._commands.append(("abort", stream))
            self._cond.notify()

    def _release_slot(self, stream: TokenStream) -> None:
        with self._cond:
            self._pending.discard(stream)

    # ---- worker thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._commands and not self.engine.has_work and not self._closing:
                    self._cond.wait(self.idle_wait)
                commands, self._commands = self._commands, []
                closing = self._closing
            for kind, arg in commands:
                getattr(self, f"_do_{kind}")(arg)
            if closing:
                self._shutdown()
                return
            if self.engine.has_work:
                self._step()

    def _do_add(self, stream: TokenStream) -> None:
        if stream._cancelled:
            self._post(stream, stream._accept, None)
            self._end(stream, [], "abort")
            return
        try:
            stream.seq = self.engine.add(stream.prompt, stream.params)
        except Exception as e:  # RequestError for bad input; anything else is still this request's
            self._release_slot(stream)
            self._post(stream, stream._accept, e)
            return
        self._streams[stream.seq.seq_id] = stream
        self._post(stream, stream._accept, None)

    def _do_abort(self, stream: TokenStream) -> None:
        if stream.seq is not None and self._streams.pop(stream.seq.seq_id, None) is not None:
            self.engine.abort(stream.seq)
            self._end(stream, [], "abort")

    def _do_call(self, arg) -> None:
        fn, loop, fut = arg
        try:
            result, error = fn(self.engine), None
        except Exception as e:
            result, error = None, e
        _call_soon(loop, _settle, fut, result, error)

    def _step(self) -> None:
        try:
            updated = self.engine.step()
        except Exception as e:
            log.exception("engine.step failed; aborting %d sequences", len(self._streams))
            self._fail_all(EngineFailed(f"generation failed: {type(e).__name__}: {e}"))
            return
        self.steps += 1
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        n = 0
        for seq in updated:
            stream = self._streams.get(seq.seq_id)
            if stream is None:
                continue
            new = seq.output[stream.sent:]
            stream.sent = len(seq.output)
            n += len(new)
            if seq.finished:
                del self._streams[seq.seq_id]
                self._release_slot(stream)
            by_loop.setdefault(stream._loop, []).append((stream, new, seq.finish_reason))
        self.tokens_generated += n
        self._rate.append((time.perf_counter(), n))
        for loop, items in by_loop.items():
            _call_soon(loop, _deliver_many, items)

    def _fail_all(self, error: BaseException) -> None:
        for stream in list(self._streams.values()):
            try:
                self.engine.abort(stream.seq)
            except Exception:
                log.exception("abort after a failed step also failed")
            self._end(stream, [], error)
        self._streams.clear()

    def _shutdown(self) -> None:
        with self._cond:
            commands, self._commands = self._commands, []
        for kind, arg in commands:  # never-started requests: refuse them
            if kind == "add":
                self._release_slot(arg)
                self._post(arg, arg._accept, WorkerClosed("the server is shutting down"))
            elif kind == "call":
                _call_soon(arg[1], _settle, arg[2], None, WorkerClosed("the server is shutting down"))
        self._fail_all(WorkerClosed("the server shut down while generating"))

    def _end(self, stream: TokenStream, tokens: list[int], end: str | BaseException) -> None:
        self._release_slot(stream)
        self._post(stream, stream._deliver, tokens, end)

    @staticmethod
    def _post(stream: TokenStream, fn, *args) -> None:
        _call_soon(stream._loop, fn, *args)


def release_openmp_threads() -> bool:
    """Hand the calling thread's idle OpenMP team back to the runtime (OpenMP 5.0
    ``omp_pause_resource_all``); True if it did. It comes back if this thread runs a parallel
    region again.

    The engine runs its parallel regions (matmuls, attention) on the worker thread, which gets a
    team of its own, while the thread that loaded the model keeps its team. libgomp spins waiting
    for the next parallel region only while it manages no more threads than there are cores;
    past that, each of the hundreds of regions in a step waits on a futex wake-up. SmolLM2 fp32, 2 cores,
    ms a step at 1 / 8 sequences: on the main thread 34-40 / 41-45, on a second thread 51-57 /
    52-60, on a second thread after this call 34-37 / 44-51."""
    try:
        with open("/proc/self/maps") as maps:  # the runtime torch loaded (Linux; elsewhere: skip)
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:
        return False
    paths = [path for path in paths if path.rsplit("/", 1)[-1].startswith(("libgomp", "libomp", "libiomp"))]
    for path in sorted(paths):
        lib = ctypes.CDLL(path)
        if hasattr(lib, "omp_pause_resource_all"):
            return lib.omp_pause_resource_all(1) == 0  # omp_pause_soft
    return False


def _deliver_many(items) -> None:
    for stream, tokens, reason in items:
        stream._deliver(tokens, reason)


def _settle(fut: asyncio.Future, result, error) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(result)
    else:
        fut.set_exception(error)


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
        pass
