"""Per-app state shared by the routes: the worker, tokenizer, limits, metrics, and the door."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from dllm.api import errors
from dllm.api.metrics import Metrics
from dllm.api.ratelimit import RateLimiter
from dllm.api.worker import EngineWorker
from dllm.errors import DllmError
from dllm.tokenizer import Tokenizer

if TYPE_CHECKING:
    from dllm.api.server import PaymentGate


@dataclass
class AppState:
    worker: EngineWorker
    tokenizer: Tokenizer
    model_name: str
    rate_limit: RateLimiter | None
    payment_gate: "PaymentGate | None"
    max_body_bytes: int
    default_max_tokens: int
    metrics: Metrics
    vocab_size: int
    trust_forwarded: bool = False
    created: int = 0

    def client_key(self, request: web.Request) -> str:
        if self.trust_forwarded and request.headers.get("X-Forwarded-For"):
            return request.headers["X-Forwarded-For"].split(",")[0].strip()
        return request.remote or "unknown"

    async def admit(self, request: web.Request) -> dict | web.StreamResponse:
        """Headers for the answer (paid or free), or the response that refuses the request."""
        resource = request.path
        if self.payment_gate is not None:
            try:
                paid = await self.payment_gate.settle(request, resource)
            except DllmError as e:
                return self.payment_gate.payment_required(resource, error=str(e))
            if paid is not None:
                return dict(paid)
        if self.rate_limit is None:
            return {}
        decision = self.rate_limit.check(self.client_key(request))
        if decision.allowed:
            return {}
        self.metrics.rate_limited.inc()
        if self.payment_gate is not None:
            return self.payment_gate.payment_required(resource)
        raise errors.rate_limited(decision.retry_after_header)


STATE = web.AppKey("dllm_state", AppState)
