"""50 concurrent settle() calls re-sending one payment: exactly one is accepted, in one process and across
workers that share the ledger file (where only the UNIQUE constraints can decide)."""
from __future__ import annotations

import asyncio

import pytest

from dllm.pay import token as tk
from dllm.pay.x402 import SCHEME_EXACT, SCHEME_TXSIG, PaymentRejected
from tests.pay.conftest import PRICE_ATOMIC, RESOURCE, request_with, run
from tests.pay.test_settle import make_header


async def race(gates, header, n=50):
    """n settle() calls spread round-robin over gates, all at once; (accepted, rejection messages)."""
    async def one(i):
        try:
            return await gates[i % len(gates)].settle(request_with(header), RESOURCE)
        except PaymentRejected as e:
            return str(e)
    try:
        results = await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        for g in gates:
            await g.close()
    return [r for r in results if isinstance(r, dict)], [r for r in results if isinstance(r, str)]


@pytest.mark.parametrize("scheme", [SCHEME_EXACT, SCHEME_TXSIG])
@pytest.mark.parametrize("workers", [1, 5])
def test_one_payment_fifty_requests_one_served(circ, make_gate, scheme, workers):
    gates = [make_gate() for _ in range(workers)]  # same db_path: workers of one node
    kp = circ.fund(circ.plain)
    treasury = tk.ata(circ.treasury.pubkey(), circ.plain)
    header = run(make_header(circ, gates[0], kp, scheme))
    before = circ.node.token_balance(treasury)
    accepted, refused = run(race(gates, header))
    assert len(accepted) == 1 and len(refused) == 49
    assert all(("already" in m) for m in refused), set(refused)
    assert gates[0].ledger.count() == 1 and len(gates[0].ledger.fees()) == 1
    assert circ.node.token_balance(treasury) - before == (PRICE_ATOMIC if scheme == SCHEME_EXACT else 0)
