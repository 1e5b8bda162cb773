"""x402 v2 wire formats, base64 header codec with size caps, and quote nonces.

The models mirror the `x402` package's pydantic schemas (x402/schemas/payments.py, responses.py, v2.25):
camelCase on the wire, amounts as atomic-unit strings, networks as CAIP-2 ids. We mirror rather than import
them so the package's `svm` extra (solana<0.40) never pins our solana/solders versions.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import struct
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from dllm.errors import DllmError

X402_VERSION = 2
HEADER_REQUIRED = "PAYMENT-REQUIRED"
HEADER_SIGNATURE = "PAYMENT-SIGNATURE"
HEADER_RESPONSE = "PAYMENT-RESPONSE"
SCHEME_EXACT = "exact"  # stock x402 clients: partially signed tx, server co-signs as fee payer
SCHEME_TXSIG = "dllm-txsig"  # pay first, then attach the tx signature (stock clients skip unknown schemes)

# A v0 transaction is at most 1232 bytes (1644 in base64); with `accepted` the JSON stays under 4 KiB.
# 8 KiB of base64 leaves room and still bounds what we decode and parse for an unauthenticated caller.
MAX_HEADER_CHARS = 8192


class PaymentRejected(DllmError):
    """A payment was refused; the API answers 402 with a fresh quote and this message as `error`."""

    def __init__(self, message: str, reason: str = "invalid_payment"):
        super().__init__(message)
        self.reason = reason


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    def wire(self) -> dict:
        return self.model_dump(by_alias=True, exclude_none=True)


class ResourceInfo(_Model):
    url: str
    description: str | None = None
    mime_type: str | None = None


class PaymentRequirements(_Model):
    scheme: str
    network: str
    asset: str
    amount: str
    pay_to: str
    max_timeout_seconds: int
    extra: dict[str, Any] = Field(default_factory=dict)


class PaymentRequired(_Model):
    x402_version: int = X402_VERSION
    error: str | None = None
    resource: ResourceInfo | None = None
    accepts: list[PaymentRequirements]
    extensions: dict[str, Any] | None = None


class PaymentPayload(_Model):
    x402_version: int = X402_VERSION
    payload: dict[str, Any]
    accepted: PaymentRequirements
    resource: ResourceInfo | None = None
    extensions: dict[str, Any] | None = None


class SettleResponse(_Model):
    success: bool
    error_reason: str | None = None
    error_message: str | None = None
    payer: str | None = None
    transaction: str
    network: str
    amount: str | None = None
    extra: dict[str, Any] | None = None


def encode_header(model: _Model) -> str:
    """base64(JSON) of a model, as the x402 headers carry it."""
    return base64.b64encode(json.dumps(model.wire(), separators=(",", ":")).encode()).decode()


def decode_header(value: str | None, cls: type[_Model], max_chars: int = MAX_HEADER_CHARS) -> _Model:
    """Parse a base64-JSON header into ``cls``; every failure is a PaymentRejected naming the cause."""
    if value is None or not value.strip():
        raise PaymentRejected(f"{HEADER_SIGNATURE} header is empty", "invalid_payload")
    if len(value) > max_chars:
        raise PaymentRejected(f"payment header is {len(value)} chars, limit {max_chars}", "payload_too_large")
    try:
        raw = json.loads(base64.b64decode(value.strip(), validate=True))
    except (binascii.Error, ValueError, UnicodeDecodeError) as e:
        raise PaymentRejected(f"payment header is not base64 JSON: {e}", "invalid_payload") from None
    if not isinstance(raw, dict):
        raise PaymentRejected("payment header JSON is not an object", "invalid_payload")
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise PaymentRejected(f"payment header field {where}: {first['msg']}", "invalid_payload") from None


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no spaces, ASCII escapes: the bytes both sides sign for the txsig scheme."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def payer_message(tx_signature: str, resource: str, accepted: dict) -> bytes:
    """What the payer signs with its ed25519 key in the txsig scheme.

    b"x402-dllm-txsig-v1:" + canonical_json({"accepted": <accepted requirements as sent>,
    "resource": <resource url>, "signature": <base58 tx signature>}).
    Binding the quote (its nonce) and the resource means a bystander who sees the transfer on-chain cannot
    claim it: only the key that authorized the transfer can.
    """
    body = {"signature": tx_signature, "resource": resource, "accepted": accepted}
    return b"x402-dllm-txsig-v1:" + canonical_json(body)


class NonceBook:
    """Issues and checks quote nonces: 16 random bytes, the expiry, and an HMAC binding them to the quote.

    A nonce is base64url(rand16 || expires u64 || mac16), 54 chars, well under the stock client's
    256-byte memo cap. The MAC covers the quote (resource, network, asset, payTo, amount, minimum net), so a nonce
    issued for another quote fails it; "unused" is the ledger's UNIQUE nonce column, checked at acceptance.
    Stateless issuance means a flood of 402s writes nothing to disk.
    """

    def __init__(self, secret: bytes, ttl_s: float, clock=time.time):
        if len(secret) < 16:
            raise ValueError(f"nonce secret is {len(secret)} bytes, need >= 16")
        self.secret, self.ttl_s, self.clock = secret, ttl_s, clock

    def _mac(self, head: bytes, quote: dict) -> bytes:
        return hmac.new(self.secret, head + canonical_json(quote), hashlib.sha256).digest()[:16]

    def issue(self, quote: dict) -> tuple[str, int]:
        """(nonce, expiry unix seconds) for ``quote``."""
        expires = int(self.clock() + self.ttl_s)
        head = os.urandom(16) + struct.pack(">Q", expires)
        return base64.urlsafe_b64encode(head + self._mac(head, quote)).decode().rstrip("="), expires

    def check(self, nonce: Any, quote: dict) -> int:
        """The nonce's expiry if it was issued by us for ``quote`` and is unexpired; else PaymentRejected."""
        if not isinstance(nonce, str) or len(nonce) != 54:
            raise PaymentRejected("quote nonce is missing or malformed", "invalid_nonce")
        try:
            raw = base64.urlsafe_b64decode(nonce + "==")
        except (binascii.Error, ValueError):
            raise PaymentRejected("quote nonce is not base64url", "invalid_nonce") from None
        head, mac = raw[:24], raw[24:]
        if len(raw) != 40 or not hmac.compare_digest(mac, self._mac(head, quote)):
            raise PaymentRejected("quote nonce was not issued for this quote (resource, amount, asset, payTo)",
                                  "nonce_quote_mismatch")
        expires = struct.unpack(">Q", head[16:24])[0]
        now = self.clock()
        if now > expires:
            raise PaymentRejected(f"quote nonce expired {now - expires:.0f}s ago; pay a fresh quote", "nonce_expired")
        return expires
