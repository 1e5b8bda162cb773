"""Paid door: x402 v2 payments in CIRC (Solana Token-2022), settled before inference, single use.

Server side: X402Gate (gate.py) with X402Config / load_config. Client side: Payer and the httpx transports
(client.py). Formats: x402.py. Nothing here imports torch.
"""
from dllm.pay.x402 import (HEADER_REQUIRED, HEADER_RESPONSE, HEADER_SIGNATURE, SCHEME_EXACT, SCHEME_TXSIG,
                           PaymentPayload, PaymentRejected, PaymentRequired, PaymentRequirements, SettleResponse)

__all__ = ["HEADER_REQUIRED", "HEADER_RESPONSE", "HEADER_SIGNATURE", "SCHEME_EXACT", "SCHEME_TXSIG",
           "PaymentPayload", "PaymentRejected", "PaymentRequired", "PaymentRequirements", "SettleResponse",
           "X402Gate", "X402Config", "load_config", "Payer", "X402AsyncTransport", "X402Transport"]


def __getattr__(name):
    # Lazy: `import dllm.pay` stays cheap and the server does not pull in httpx, nor the client aiohttp.web.
    if name in ("X402Gate", "X402Config", "load_config"):
        from dllm.pay import gate
        return getattr(gate, name)
    if name in ("Payer", "X402AsyncTransport", "X402Transport"):
        from dllm.pay import client
        return getattr(client, name)
    raise AttributeError(f"module 'dllm.pay' has no attribute {name!r}")
