"""The serving layer: OpenAI-compatible HTTP API, chat page, metrics, rate limit, payment hook.

Names load lazily so ``dllm.api.ratelimit`` (pure Python) can be imported without torch.
"""
import importlib

_EXPORTS = {"create_app": "server", "run_server": "server", "serve": "server", "PaymentGate": "server",
            "EngineWorker": "worker", "TokenStream": "worker", "Busy": "worker", "RateLimiter": "ratelimit"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dllm.api' has no attribute {name!r}")
    return getattr(importlib.import_module(f"dllm.api.{_EXPORTS[name]}"), name)
