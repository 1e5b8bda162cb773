"""The aiohttp app: OpenAI routes, health, metrics, the chat page, and the door (rate limit / payment).

``create_app`` wires an EngineWorker and a Tokenizer into a ``web.Application``; ``serve`` starts
it on a socket inside a running loop; ``run_server`` is the blocking entry for the CLI (builds
the engine, serves until interrupted, shuts the worker down).

The door: free requests spend a token of their client IP's bucket (429 + Retry-After when empty).
A ``PaymentGate`` (dllm/pay) is asked first; a settled payment skips the bucket, a rejected one
gets the gate's 402, and with a gate configured an empty bucket also answers the gate's 402, so
an agent that hit the free limit learns how to pay.
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Protocol, runtime_checkable

from aiohttp import web

from dllm.api import errors
from dllm.api.errors import ApiError
from dllm.api.metrics import Metrics, StageRtt
from dllm.api.openai_routes import chat_completions, completions
from dllm.api.ratelimit import RateLimiter
from dllm.api.state import STATE, AppState
from dllm.api.worker import EngineFailed, EngineWorker, WorkerClosed
from dllm.tokenizer import Tokenizer

log = logging.getLogger("dllm.api")
WEB_DIR = Path(__file__).parent / "web"
PAGE_FILES = {"/": ("index.html", "text/html"), "/app.js": ("app.js", "text/javascript"),
              "/style.css": ("style.css", "text/css")}
# The page loads only its own script and style; model text is set with textContent anyway.
PAGE_CSP = "default-src 'self'; script-src 'self'; style-src 'self'; object-src 'none'; base-uri 'none'"
DEFAULT_RATE = object()  # create_app's default: RateLimiter.per_minute(30, burst=10)


@runtime_checkable
class PaymentGate(Protocol):
    """The paid door, implemented in dllm/pay (x402).

    ``settle`` returns None when the request carries no payment (free path: rate-limited), or
    the headers to add to the successful response when it paid (skips the rate limit). It
    raises a DllmError (e.g. PaymentRejected) for a payment that is present but not acceptable;
    the server then answers ``payment_required(resource, error=str(e))``, a ready 402 response.
    """

    async def settle(self, request: web.Request, resource: str) -> dict | None: ...

    def payment_required(self, resource: str, error: str | None = None) -> web.Response: ...




def create_app(worker: EngineWorker, tokenizer: Tokenizer, model_name: str, *, rate_limit=DEFAULT_RATE,
               payment_gate: PaymentGate | None = None, max_body_bytes: int = 1 << 20,
               default_max_tokens: int = 512, stage_rtt: StageRtt | None = None,
               trust_forwarded: bool = False) -> web.Application:
    """The API app. ``rate_limit``: a RateLimiter, None for no free-door limit, or the default."""
    if rate_limit is DEFAULT_RATE:
        rate_limit = RateLimiter.per_minute(30, burst=10)
    if stage_rtt is None:  # a remote chain reports its stages' RTT itself
        stage_rtt = getattr(worker.engine.pipeline, "stage_rtts", None)
    app = web.Application(middlewares=[_errors_and_counts], client_max_size=max_body_bytes)
    app[STATE] = AppState(worker, tokenizer, model_name, rate_limit, payment_gate, max_body_bytes,
                          default_max_tokens, Metrics(worker, stage_rtt), worker.engine.model.config.vocab_size,
                          trust_forwarded, int(time.time()))
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    for path in PAGE_FILES:
        app.router.add_get(path, page)
    if payment_gate is not None and hasattr(payment_gate, "start"):
        # a misconfigured paid door (transfer-hook mint, missing treasury account) fails at start-up
        async def start_gate(app):
            await payment_gate.start()

        async def close_gate(app):
            close = getattr(payment_gate, "close", None)
            if close is not None:
                await close()
        app.on_startup.append(start_gate)
        app.on_cleanup.append(close_gate)
    return app


# ---- small routes -----------------------------------------------------------------------------
def _model_card(state: AppState) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "dllm"}


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model_card(request.app[STATE])]})


async def get_model(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if request.match_info["model"] != state.model_name:
        raise errors.model_not_found(request.match_info["model"])
    return web.json_response(_model_card(state))


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    ok = state.worker.has_room
    return web.json_response({"status": "ok" if ok else "busy", "model": state.model_name,
                              "in_flight": state.worker.in_flight}, status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    m = request.app[STATE].metrics
    return web.Response(body=m.render(), headers={"Content-Type": m.content_type})


async def page(request: web.Request) -> web.Response:
    name, ctype = PAGE_FILES[request.path]
    return web.Response(body=(WEB_DIR / name).read_bytes(), content_type=ctype, charset="utf-8",
                        headers={"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff",
                                 "Cache-Control": "no-cache"})


# ---- every error in one schema ----------------------------------------------------------------
@web.middleware
async def _errors_and_counts(request: web.Request, handler):
    try:
        response = await handler(request)
    except ApiError as e:
        response = e.response()
    except web.HTTPException as e:
        if e.status < 400:
            raise
        response = errors.from_http(e, request).response()
    except WorkerClosed as e:
        response = ApiError(503, str(e), "server_error", None, "shutting_down").response()
    except EngineFailed as e:
        response = ApiError(500, str(e), "server_error", None, "generation_failed").response()
    except (asyncio.CancelledError, ConnectionResetError):
        raise  # the client is gone; nobody reads an answer
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        response = ApiError(500, "internal server error", "server_error").response()
    route = request.match_info.route.resource
    endpoint = route.canonical if route is not None else "unmatched"
    request.app[STATE].metrics.requests.labels(endpoint, str(response.status)).inc()
    return response


# ---- running it -------------------------------------------------------------------------------
async def serve(app: web.Application, host: str = "127.0.0.1", port: int = 8000,
                shutdown_timeout: float = 5.0) -> tuple[web.AppRunner, int]:
    """Start ``app`` on host:port (0 = any free port) in the running loop; returns (runner, port).

    handler_cancellation: a client that disconnects cancels its handler, whose ``finally``
    aborts the sequence, so a non-streaming request frees its KV as soon as its client leaves.
    """
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, runner.addresses[0][1]


def run_server(model: str = "smollm2", host: str = "127.0.0.1", port: int = 8000, *, engine=None,
               model_name: str | None = None, stages: int = 1, dtype: str = "float32", kv_tokens: int = 8192,
               rate_per_minute: float = 30.0, burst: int = 10, max_pending: int = 256,
               payment_gate: PaymentGate | None = None, max_body_bytes: int = 1 << 20,
               announce=print) -> None:
    """Blocking: build the engine (unless given one), serve until Ctrl-C, then stop the worker.

    ``model`` is a known name (smollm2) or a model dir; ``engine`` lets the CLI pass a
    coordinator it built itself (remote stages, drafting), in which case ``model`` only names
    the tokenizer's model dir.
    """
    from dllm.fetch import model_path
    from dllm.launch import local_engine

    model_dir = model_path(model, dtype)
    tokenizer = Tokenizer.from_dir(model_dir)
    if engine is None:
        engine = local_engine(model_dir, stages=stages, dtype=dtype, kv_tokens=kv_tokens,
                              eos_ids=sorted(tokenizer.eos_token_ids | set(_config_eos(model_dir))))
    worker = EngineWorker(engine, max_pending=max_pending)
    limiter = RateLimiter.per_minute(rate_per_minute, burst) if rate_per_minute > 0 else None
    app = create_app(worker, tokenizer, model_name or Path(str(model)).name, rate_limit=limiter,
                     payment_gate=payment_gate, max_body_bytes=max_body_bytes)

    async def main() -> None:
        runner, bound = await serve(app, host, port)
        announce(f"dllm: serving {app[STATE].model_name} at http://{host}:{bound}/ (OpenAI API at /v1)")
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    finally:
        worker.close()


def _config_eos(model_dir) -> list[int]:
    from dllm.config import ModelConfig

    return list(ModelConfig.from_dir(model_dir).eos_token_ids)
