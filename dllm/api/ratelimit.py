"""Per-client token buckets for the free door. Pure Python, no torch, injectable clock.

Each client key (its IP) owns a bucket of ``burst`` tokens that refills at ``rate`` tokens per
second; a request spends one. An empty bucket answers how long until the next token, which the
server sends as Retry-After. Memory stays bounded: a full bucket carries no information (a fresh
one is identical), so full buckets are dropped first, then the least recently used.
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable


@dataclass
class Decision:
    allowed: bool
    retry_after: float = 0.0  # seconds until a token is available (0 when allowed)
    remaining: int = 0  # whole tokens left after this request

    @property
    def retry_after_header(self) -> str:
        """Retry-After takes whole seconds; round up so a client that obeys it succeeds."""
        return str(max(1, math.ceil(self.retry_after)))


class RateLimiter:
    """``check(key)`` spends one token of that key's bucket, or says how long to wait."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000):
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate ({rate}/s) must be > 0 and burst ({burst}) >= 1")
        self.rate, self.burst, self.clock, self.max_keys = float(rate), int(burst), clock, max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at time)

    @classmethod
    def per_minute(cls, requests: float, burst: int | None = None, **kw) -> "RateLimiter":
        return cls(requests / 60.0, burst if burst is not None else max(1, math.ceil(requests)), **kw)

    def _level(self, key: str, now: float) -> float:
        tokens, at = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + max(0.0, now - at) * self.rate)

    def check(self, key: str, cost: float = 1.0) -> Decision:
        now = self.clock()
        tokens = self._level(key, now)
        if tokens >= cost:
            tokens -= cost
            allowed, wait = True, 0.0
        else:
            allowed, wait = False, (cost - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        self._evict(now)
        return Decision(allowed, wait, int(tokens))

    def peek(self, key: str) -> float:
        """Tokens available to ``key`` now, without spending any."""
        return self._level(key, self.clock())

    def __len__(self) -> int:
        return len(self._buckets)

    def _evict(self, now: float) -> None:
        if len(self._buckets) <= self.max_keys:
            return
        for k in [k for k in self._buckets if self._level(k, now) >= self.burst]:
            del self._buckets[k]
        # shed 10% below the cap so the O(keys) sweep runs once per many new keys, not each one
        while len(self._buckets) > self.max_keys * 0.9:
            self._buckets.popitem(last=False)
