"""Prometheus metrics for the API: one registry per app, so several apps (tests) never collide.

Counters and histograms are fed by the handlers; gauges that describe the engine (tokens/s,
speculative acceptance, requests in flight, per-stage round trip) are read when scraped, so they
cost nothing between scrapes.
"""
from __future__ import annotations

from typing import Callable, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
StageRtt = Callable[[], Mapping[str, float | None]]  # stage name -> last round trip, seconds


class _StageRttCollector:
    """dllm_stage_rtt_seconds{stage}: pushed values plus whatever the pipeline reports."""

    def __init__(self):
        self.pushed: dict[str, float] = {}
        self.source: StageRtt | None = None

    def collect(self):
        g = GaugeMetricFamily("dllm_stage_rtt_seconds", "Latest round trip to each pipeline stage", labels=["stage"])
        values = dict(self.pushed)
        if self.source is not None:
            values.update(self.source())
        for stage, seconds in sorted(values.items()):
            if seconds is not None:  # a stage not yet pinged has no RTT
                g.add_metric([str(stage)], float(seconds))
        yield g


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, worker=None, stage_rtt: StageRtt | None = None):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("dllm_requests", "API requests by endpoint and HTTP status", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("dllm_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.completion_tokens = Counter("dllm_completion_tokens", "Tokens generated for API requests", registry=r)
        self.ttft = Histogram("dllm_time_to_first_token_seconds", "Request arrival to first generated token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.latency = Histogram("dllm_request_seconds", "Request arrival to last token", buckets=TTFT_BUCKETS, registry=r)
        self.rate_limited = Counter("dllm_rate_limited", "Free requests refused by the rate limit", registry=r)
        self._stage = _StageRttCollector()
        self._stage.source = stage_rtt
        r.register(self._stage)
        if worker is not None:
            self._engine_gauges(worker)

    def _engine_gauges(self, worker) -> None:
        r = self.registry
        Gauge("dllm_tokens_per_second", "Tokens generated per second, all streams, last 10 s",
              registry=r).set_function(worker.tokens_per_second)
        Gauge("dllm_spec_acceptance_length", "Mean tokens committed per speculative verify pass",
              registry=r).set_function(lambda: worker.engine.stats.mean_accepted)
        Gauge("dllm_requests_in_flight", "Requests queued or generating", registry=r).set_function(lambda: worker.in_flight)
        Gauge("dllm_engine_steps", "Batched forward passes run so far", registry=r).set_function(lambda: worker.steps)

    def set_stage_rtt(self, stage: str, seconds: float) -> None:
        """Push hook for whoever measures a stage's round trip (net/chain.py)."""
        self._stage.pushed[stage] = seconds

    def set_stage_rtt_source(self, source: StageRtt | None) -> None:
        """Pull hook: ``source()`` -> {stage: seconds}, called at each scrape."""
        self._stage.source = source

    def render(self) -> bytes:
        return generate_latest(self.registry)
