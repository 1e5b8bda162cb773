"""Event loops for the network path: busy polling, an inline loop for the coordinator, and a
background loop for synchronous callers that only need it now and then.

Why busy polling. A decode pass alternates compute and waiting: a stage waits while the
coordinator computes, and both wait out the network. On a virtual machine an idle vCPU halts
(the guest's haltpoll idle driver here polls 0 ns), and the pass that follows the wake-up runs
measurably slower: 15 SmolLM2 layers take 16 ms back to back but 17-25 ms after blocking
10-50 ms, and the same compute after *spinning* for 10-50 ms takes 16 ms again. The wake-up
itself costs 0.1-0.3 ms per thread hop, and epoll's millisecond timeout granularity makes every
emulated delay oversleep by 0.2-0.5 ms. So a loop that expects traffic soon polls instead of
blocking: ``BusyPoll`` wraps the loop's selector so that ``select(timeout)`` first polls with a
zero timeout (yielding the CPU between polls, so it never takes a core from runnable work) for
up to ``DLLM_BUSY_POLL_MS`` (default 250 ms), and only then blocks. Timers then fire within
microseconds of their due time. ``DLLM_BUSY_POLL_MS=0`` turns polling off.

Why it stops polling under contention. On a core another process wants, a poller that yields
loses the scheduler's wake-up preference: a blocked thread is woken ahead of the running one
when its event comes, a yielding one waits out the other's slice. Measured here with both cores
saturated, median lateness of 5 ms sleeps: blocking 64 us, polling 3.0 ms. So a spin iteration
that took longer than CONTENDED_S (the core was taken from us) ends the spin, and the loop blocks
for the next BLOCK_AFTER_CONTENTION_S before it polls again.

Why warmers. Even a thread that never idles pays for the pass before: streaming the weights
evicts its L1/L2 and the shared L3, so the first frame handled after a pass runs from DRAM
(open + decode + unpack of one row: ~40 us warm, ~360 us right after streaming 256 MB). While
a BusyPoll spins it calls its *warmers* (``add_warmer``) now and then: the node runs its own
receive path on a dummy frame, so the real frame finds that code and data in cache.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger("dllm.net")

DEFAULT_BUSY_POLL_MS = 250.0
WARM_AFTER_S = 0.0002   # a spin that ends sooner than this never pays for a warm-up
WARM_EVERY_S = 0.001
WARM_MARGIN_S = 0.0005  # no warm-up this close to a timer: it would fire late
# A spin iteration that took this long means another runnable thread had our core (a warm-up or
# a poll takes tens of microseconds; losing the core to the scheduler costs a slice, 1-3 ms).
CONTENDED_S = 0.001
BLOCK_AFTER_CONTENTION_S = 0.05  # then block, not poll, for this long


def busy_poll_window_s(value_ms: float | None = None) -> float:
    """Seconds a loop polls before it blocks: ``value_ms``, else $DLLM_BUSY_POLL_MS, else 250 ms."""
    if value_ms is None:
        try:
            value_ms = float(os.environ.get("DLLM_BUSY_POLL_MS", DEFAULT_BUSY_POLL_MS))
        except ValueError:
            value_ms = DEFAULT_BUSY_POLL_MS
    return max(0.0, value_ms / 1000.0)


class BusyPoll:
    """A selector wrapper: ``select(timeout)`` polls for up to ``window_s`` before blocking.

    Each call polls with a zero timeout until something is ready, the timeout passes or the
    window ends, calling ``sched_yield`` between polls (and the warmers, from WARM_AFTER_S into
    the spin, every WARM_EVERY_S, never within WARM_MARGIN_S of a due timer); then it blocks
    for what is left of the timeout. A spin iteration slower than CONTENDED_S ends the spin
    and makes the calls of the next BLOCK_AFTER_CONTENTION_S block at once (module doc).
    Everything else goes to the wrapped selector."""

    def __init__(self, selector, window_s: float, contended_s: float = CONTENDED_S):
        self._sel = selector
        self.window_s = window_s
        self.contended_s = contended_s
        self.warmers: list[Callable[[], None]] = []
        self._block_until = 0.0  # monotonic time before which select blocks (contention seen)
        self.contentions = 0  # spins ended because the core was taken (a diagnostic)

    def select(self, timeout=None):
        sel = self._sel
        if self.window_s <= 0 or (timeout is not None and timeout <= 0):
            return sel.select(timeout)
        now = start = time.monotonic()
        if now < self._block_until:
            return sel.select(timeout)
        stop = start + (self.window_s if timeout is None else min(timeout, self.window_s))
        poll, yield_, clock = sel.select, os.sched_yield, time.monotonic
        warm_at = start + WARM_AFTER_S if self.warmers else float("inf")
        while now < stop:
            ready = poll(0)
            if ready:
                return ready
            if now >= warm_at and stop - now > WARM_MARGIN_S:
                self._warm()
                warm_at = clock() + WARM_EVERY_S
            else:
                yield_()
            last, now = now, clock()
            if now - last > self.contended_s:  # the core was taken from us: block (see the module doc)
                self._block_until = now + BLOCK_AFTER_CONTENTION_S
                self.contentions += 1
                break
        if timeout is None:
            return sel.select(None)
        left = start + timeout - now
        return sel.select(left) if left > 0 else []

    def _warm(self) -> None:
        for fn in list(self.warmers):
            try:
                fn()
            except Exception:  # a warm-up is an optimisation: never let it break the loop
                log.exception("warmer %r failed; dropped", fn)
                self.warmers.remove(fn)

    def __getattr__(self, name):
        return getattr(self._sel, name)


def install_busy_poll(loop: asyncio.AbstractEventLoop, window_s: float | None = None) -> bool:
    """Make a selector event loop poll before it blocks (see BusyPoll); False if it cannot."""
    window_s = busy_poll_window_s() if window_s is None else window_s
    sel = getattr(loop, "_selector", None)
    if sel is None or not hasattr(sel, "select"):  # not a selector loop (uvloop, proactor): leave it
        return False
    if isinstance(sel, BusyPoll):
        sel.window_s = window_s
    elif window_s > 0:
        loop._selector = BusyPoll(sel, window_s)
    return True


def add_warmer(loop: asyncio.AbstractEventLoop, fn: Callable[[], None]) -> bool:
    """Have ``loop``'s BusyPoll call ``fn`` while it spins (see the module doc); False if the
    loop does not busy-poll. ``fn`` must be quick (tens of microseconds) and side-effect free."""
    sel = getattr(loop, "_selector", None)
    if isinstance(sel, BusyPoll):
        sel.warmers.append(fn)
        return True
    return False


class InlineLoop:
    """An asyncio loop that runs in the thread that calls it, one call at a time.

    The coordinator's engine thread both computes and waits for the chain; running the network
    in that same thread saves two thread hand-offs per pass (0.2-0.6 ms each here) and keeps the
    thread that will compute next busy while it waits. Between calls the loop does not run:
    sockets buffer in the kernel, and tasks (link readers, delayed writers) resume at the next
    call. Callers on another thread are serialised by a lock; a caller that is itself inside a
    running event loop gets the call run on a helper thread."""

    def __init__(self, busy_poll_s: float | None = None):
        self.loop = asyncio.new_event_loop()
        install_busy_poll(self.loop, busy_poll_s)
        self._lock = threading.Lock()

    def call(self, coro, timeout: float):
        """Run ``coro`` to completion, at most ``timeout`` s (TimeoutError after cancelling it)."""
        with self._lock:
            if self.loop.is_closed():
                coro.close()
                raise RuntimeError("loop is closed")
            if asyncio._get_running_loop() is None:  # the usual case: a plain thread (no exception raised)
                return self._run(coro, timeout)
            with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dllm-inline") as ex:
                return ex.submit(self._run, coro, timeout).result()

    def _run(self, coro, timeout: float):
        loop = self.loop
        task = loop.create_task(coro)  # one task, a timer to cancel it (asyncio.wait_for would add a second)
        expired = []
        timer = loop.call_later(timeout, lambda: expired.append(task.cancel()))
        try:
            return loop.run_until_complete(task)
        except asyncio.CancelledError:
            if expired:
                raise TimeoutError(f"call did not finish within {timeout:g} s") from None
            raise
        finally:
            timer.cancel()

    def stop(self) -> None:
        with self._lock:
            if self.loop.is_closed():
                return
            tasks = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
            for t in tasks:
                t.cancel()
            try:
                if tasks:
                    self.loop.run_until_complete(asyncio.wait(tasks, timeout=5))
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            except Exception:
                pass
            self.loop.close()


class BackgroundLoop:
    """An asyncio loop on its own thread, for synchronous callers that use it now and then."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def call(self, coro, timeout: float):
        """Run ``coro`` on the loop and wait up to ``timeout`` s (TimeoutError after cancelling it)."""
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
