"""BackgroundLoop: an asyncio loop on its own thread, for synchronous callers (the engine thread)."""
from __future__ import annotations

import asyncio
import threading


class BackgroundLoop:
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
