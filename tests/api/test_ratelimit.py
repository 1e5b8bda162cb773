"""The token bucket alone: exact numbers with a fake clock, no torch, no server."""
import subprocess
import sys

import pytest

from dllm.api.ratelimit import RateLimiter


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_burst_then_refill_at_rate():
    clock = Clock()
    rl = RateLimiter(rate=2.0, burst=3, clock=clock)  # 2 tokens/s
    assert [rl.check("a").allowed for _ in range(3)] == [True, True, True]
    d = rl.check("a")
    assert not d.allowed and d.retry_after == pytest.approx(0.5)
    assert d.retry_after_header == "1"
    clock.t += 0.5
    assert rl.check("a").allowed
    assert not rl.check("a").allowed
    clock.t += 100
    assert rl.peek("a") == 3  # capped at burst


def test_clients_are_independent():
    clock = Clock()
    rl = RateLimiter(rate=1.0, burst=1, clock=clock)
    assert rl.check("1.1.1.1").allowed
    assert not rl.check("1.1.1.1").allowed
    assert rl.check("2.2.2.2").allowed


def test_refused_requests_do_not_spend():
    clock = Clock()
    rl = RateLimiter(rate=1.0, burst=1, clock=clock)
    rl.check("a")
    for _ in range(10):
        assert not rl.check("a").allowed
    clock.t += 1.0
    assert rl.check("a").allowed  # hammering while empty does not push the wait further out


def test_retry_after_rounds_up_and_is_at_least_one():
    clock = Clock()
    rl = RateLimiter(rate=1 / 30, burst=1, clock=clock)  # one per 30 s
    rl.check("a")
    clock.t += 10.2
    d = rl.check("a")
    assert d.retry_after == pytest.approx(19.8)
    assert d.retry_after_header == "20"


def test_per_minute():
    clock = Clock()
    rl = RateLimiter.per_minute(6, burst=2, clock=clock)
    assert rl.rate == pytest.approx(0.1) and rl.burst == 2


def test_memory_is_bounded():
    clock = Clock()
    rl = RateLimiter(rate=1.0, burst=5, clock=clock, max_keys=100)
    for i in range(1000):
        rl.check(f"ip{i}")
        clock.t += 0.001
    assert len(rl) <= 100
    rl.check("recent")
    assert not rl.peek("recent") == 5  # the newest key is kept with its spent token


@pytest.mark.parametrize("rate,burst", [(0, 1), (-1, 1), (1, 0)])
def test_bad_config(rate, burst):
    with pytest.raises(ValueError):
        RateLimiter(rate, burst)


def test_imports_no_torch():
    code = "import sys, dllm.api.ratelimit; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
