"""Every error in OpenAI's schema with the right status; the rate limit; the payment-gate hook
(driven by a tiny fake gate: the real x402 gate is tested in tests/pay)."""
import json

import pytest
import urllib.request
import urllib.error

from aiohttp import web

from dllm.api.ratelimit import RateLimiter
from dllm.errors import DllmError
from tests.api.conftest import MODEL

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def http(url, method="GET", body=None, headers=None):
    """(status, headers, parsed JSON or raw bytes) with urllib: no client-side validation at all."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, hdrs, raw = r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        status, hdrs, raw = e.code, dict(e.headers), e.read()
    try:
        return status, hdrs, json.loads(raw)
    except ValueError:
        return status, hdrs, raw


def assert_error(status, body, want_status, code=None, param=None):
    assert status == want_status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    if param is not None:
        assert body["error"]["param"] == param


def test_health_models_metrics_page(server):
    status, _, body = http(f"{server.url}/health")
    assert status == 200 and body["status"] == "ok" and body["model"] == MODEL
    http(f"{server.url}/v1/chat/completions", "POST", CHAT)
    status, hdrs, text = http(f"{server.url}/metrics")
    text = text.decode()
    assert status == 200 and hdrs["Content-Type"].startswith("text/plain")
    for name in ("dllm_requests_total", "dllm_prompt_tokens_total", "dllm_completion_tokens_total",
                 "dllm_time_to_first_token_seconds_bucket", "dllm_tokens_per_second", "dllm_spec_acceptance_length",
                 "dllm_stage_rtt_seconds"):
        assert name in text, name
    assert 'dllm_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    status, hdrs, page = http(f"{server.url}/")
    assert status == 200 and b"<title>dllm chat</title>" in page
    assert "script-src 'self'" in hdrs["Content-Security-Policy"]


def test_stage_rtt_hook(make_server):
    from dllm.api.server import STATE

    s = make_server(stage_rtt=lambda: {"10.0.0.2:7000": 0.042, "10.0.0.3:7000": None})
    s.runner.app[STATE].metrics.set_stage_rtt("pushed", 0.5)
    text = http(f"{s.url}/metrics")[2].decode()
    assert 'dllm_stage_rtt_seconds{stage="10.0.0.2:7000"} 0.042' in text
    assert 'dllm_stage_rtt_seconds{stage="pushed"} 0.5' in text and "10.0.0.3" not in text


@pytest.mark.parametrize("method,path,status,code", [
    ("GET", "/v1/nope", 404, "unknown_url"), ("POST", "/v2/chat/completions", 404, "unknown_url"),
    ("GET", "/v1/chat/completions", 405, "method_not_allowed"), ("DELETE", "/v1/models", 405, "method_not_allowed"),
    ("GET", "/v1/models/gpt-4", 404, "model_not_found"),
])
def test_routes(server, method, path, status, code):
    st, _, body = http(f"{server.url}{path}", method)
    assert_error(st, body, status, code)


def test_body_too_large_is_413_before_reading(make_server):
    s = make_server(max_body_bytes=1000)
    big = dict(CHAT, messages=[{"role": "user", "content": "x" * 5000}])
    st, _, body = http(f"{s.url}/v1/chat/completions", "POST", big)
    assert_error(st, body, 413, "request_too_large")


def test_bad_inputs(server):
    url = f"{server.url}/v1/chat/completions"
    assert_error(*http(url, "POST", b"{nope")[::2], 400)
    assert_error(*http(url, "POST", b'{"model": "\xff"}')[::2], 400)
    assert_error(*http(url, "POST", dict(CHAT, model="gpt-5"))[::2], 404, "model_not_found", "model")
    assert_error(*http(url, "POST", dict(CHAT, n=3))[::2], 400, "unsupported_parameter", "n")
    assert_error(*http(url, "POST", dict(CHAT, logprobs=True))[::2], 400, "unsupported_parameter", "logprobs")
    assert_error(*http(url, "POST", dict(CHAT, wat=1))[::2], 400, "unknown_parameter", "wat")
    st, _, body = http(url, "POST", dict(CHAT, max_tokens=10 ** 6, stream=True))
    assert_error(st, body, 400, "context_length_exceeded", "max_tokens")  # refused before the stream starts
    st, _, body = http(f"{server.url}/v1/completions", "POST", {"model": MODEL, "prompt": [10 ** 9]})
    assert_error(st, body, 400, param="prompt")
    huge = dict(CHAT, messages=[{"role": "user", "content": " a" * 20_000}])  # tokenized off the loop
    assert_error(*http(url, "POST", huge)[::2], 400, "context_length_exceeded", "messages")


def test_rate_limit_429(make_server):
    s = make_server(rate_limit=RateLimiter(rate=1 / 60, burst=2))
    url = f"{s.url}/v1/chat/completions"
    assert [http(url, "POST", CHAT)[0] for _ in range(2)] == [200, 200]
    st, hdrs, body = http(url, "POST", CHAT)
    assert_error(st, body, 429, "rate_limit_exceeded")
    assert 1 <= int(hdrs["Retry-After"]) <= 60


def test_busy_503(make_server, worker):
    s = make_server()
    old, worker.max_pending = worker.max_pending, 0
    try:
        st, hdrs, body = http(f"{s.url}/v1/chat/completions", "POST", CHAT)
    finally:
        worker.max_pending = old
    assert_error(st, body, 503, "server_busy")
    assert hdrs["Retry-After"]


class PaymentRejected(DllmError):
    pass


class FakeGate:
    """X-Payment: good -> paid; bad -> rejected; absent -> free path."""

    def __init__(self):
        self.settled = []

    async def settle(self, request, resource):
        pay = request.headers.get("X-Payment")
        if pay is None:
            return None
        if pay != "good":
            raise PaymentRejected("signature does not verify")
        self.settled.append(resource)
        return {"X-Payment-Response": "receipt-1"}

    def payment_required(self, resource, error=None):
        return web.json_response({"x402Version": 1, "error": error or "payment required", "accepts": [{"resource": resource}]},
                                 status=402)


def test_payment_gate_hook(make_server):
    from dllm.api.server import PaymentGate

    gate = FakeGate()
    assert isinstance(gate, PaymentGate)
    s = make_server(rate_limit=RateLimiter(rate=1 / 60, burst=1), payment_gate=gate)
    url = f"{s.url}/v1/chat/completions"
    assert http(url, "POST", CHAT)[0] == 200  # free, spends the only token
    st, _, body = http(url, "POST", CHAT)  # free and over the limit: the gate's 402, not 429
    assert st == 402 and body["error"] == "payment required" and body["accepts"][0]["resource"] == "/v1/chat/completions"
    st, hdrs, body = http(url, "POST", CHAT, {"X-Payment": "good"})  # paid: bypasses the limit
    assert st == 200 and hdrs["X-Payment-Response"] == "receipt-1" and body["choices"]
    st, hdrs, _ = http(url, "POST", dict(CHAT, stream=True), {"X-Payment": "good"})
    assert st == 200 and hdrs["X-Payment-Response"] == "receipt-1"
    st, _, body = http(url, "POST", CHAT, {"X-Payment": "forged"})
    assert st == 402 and body["error"] == "signature does not verify"
    st, _, body = http(url, "POST", dict(CHAT, n=2), {"X-Payment": "good"})  # invalid: refused before paying
    assert st == 400 and gate.settled == ["/v1/chat/completions"] * 2


def test_engine_failure_is_reported_not_hung(server, worker, monkeypatch):
    """A failing engine step: a stream gets an SSE error event then [DONE]; a plain request a 500."""
    from tests.api.conftest import wait_idle

    def boom():
        raise RuntimeError("simulated stage failure")
    monkeypatch.setattr(worker.engine, "step", boom)  # the worker thread looks it up on every step
    url = f"{server.url}/v1/chat/completions"
    st, _, body = http(url, "POST", CHAT)
    assert_error(st, body, 500, "generation_failed")
    st, _, raw = http(url, "POST", dict(CHAT, stream=True))
    events = [e for e in raw.decode().split("\n\n") if e]
    assert st == 200 and events[-1] == "data: [DONE]"
    err = json.loads(events[-2][len("data: "):])["error"]
    assert "simulated stage failure" in err["message"] and err["code"] == "generation_failed"
    monkeypatch.undo()
    assert wait_idle(worker)["idle"]
    assert http(url, "POST", CHAT)[0] == 200  # the worker survived
