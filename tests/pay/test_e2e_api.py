"""End to end through the real dllm API server (dllm.api.server.create_app) with the official `openai` client:
the free request spends the rate limit, the next one gets the gate's 402, the client helper pays in CIRC on the
LiteSVM node (either scheme) and gets SmolLM2's answer; paid requests skip the rate limit; a bad payment gets a
402 with the reason and nothing is generated or recorded."""
from __future__ import annotations

import asyncio
import base64
import json
import threading

import httpx
import pytest

from dllm.pay.client import Payer, X402AsyncTransport
from dllm.pay.x402 import SCHEME_EXACT, SCHEME_TXSIG
from tests.models import model_dir_or_skip
from tests.pay.conftest import PRICE_ATOMIC, run

server_mod = pytest.importorskip("dllm.api.server", reason="dllm.api.server (the API engineer's create_app) "
                                 "is not importable yet")
openai = pytest.importorskip("openai")
CHAT = dict(model="smollm2", messages=[{"role": "user", "content": "Say hi"}], max_tokens=4, temperature=0)


class ApiThread:
    """create_app(..., payment_gate=gate) served on 127.0.0.1 from its own loop (the gate lives on that loop)."""

    def __init__(self, app, gate):
        self.gate = gate
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.run(gate.start())
        self.runner, port = self.run(server_mod.serve(app, "127.0.0.1", 0, shutdown_timeout=1.0))
        self.url = f"http://127.0.0.1:{port}/v1"

    def run(self, coro, timeout=120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self):
        self.run(self.runner.cleanup())
        self.run(self.gate.close())
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def engine_parts():
    from dllm.api.worker import EngineWorker
    from dllm.launch import local_engine
    from dllm.tokenizer import Tokenizer

    model_dir = model_dir_or_skip("smollm2")
    tok = Tokenizer.from_dir(model_dir)
    worker = EngineWorker(local_engine(model_dir, kv_tokens=2048, eos_ids=sorted(tok.eos_token_ids)))
    yield worker, tok
    worker.close()


@pytest.fixture
def api(engine_parts, make_gate):
    from dllm.api.ratelimit import RateLimiter

    worker, tok = engine_parts
    gate = make_gate()
    limiter = RateLimiter(rate=1 / 3600, burst=1)  # one free request, then the door asks for payment
    srv = ApiThread(server_mod.create_app(worker, tok, "smollm2", rate_limit=limiter, payment_gate=gate), gate)
    yield srv
    srv.stop()


def _client(payer, url):
    transport = X402AsyncTransport(payer)
    return openai.AsyncOpenAI(base_url=url, api_key="x402", max_retries=0,
                              http_client=httpx.AsyncClient(transport=transport, timeout=120)), transport


@pytest.mark.parametrize("scheme", [SCHEME_EXACT, SCHEME_TXSIG])
def test_openai_client_pays_through_the_api(circ, api, scheme):
    kp = circ.fund(circ.plain)

    async def go():
        client, transport = _client(Payer(kp, circ.node.url, prefer=scheme), api.url)
        try:
            free = await client.chat.completions.with_raw_response.create(**CHAT)  # spends the free token
            assert free.headers.get("PAYMENT-RESPONSE") is None and transport.last_settlement is None
            answers = []
            for _ in range(2):  # paid: 402 -> pay -> 200, and not held back by the empty bucket
                answers.append(await client.chat.completions.create(**CHAT))
                assert transport.last_settlement.success
        finally:
            await client.close()
        return answers, transport.last_settlement

    answers, settlement = run(go())
    assert all(a.choices[0].message.content for a in answers)
    assert settlement.amount == str(PRICE_ATOMIC) and settlement.payer == str(kp.pubkey())
    rows = api.gate.ledger.fees()
    assert len(rows) == 2 and all(r.payer == str(kp.pubkey()) and r.amount == PRICE_ATOMIC for r in rows)


def test_bad_payment_gets_402_and_nothing_served(circ, api):
    kp = circ.fund(circ.plain)

    class Forger(Payer):
        """Pays for real, then claims it under another key (a bystander's claim)."""

        async def pay(self, required):
            header = await super().pay(required)
            raw = json.loads(base64.b64decode(header))
            raw["payload"]["payer"] = str(circ.treasury.pubkey())
            return base64.b64encode(json.dumps(raw).encode()).decode()

    async def go():
        client, _ = _client(Forger(kp, circ.node.url, prefer=SCHEME_TXSIG), api.url)
        try:
            await client.chat.completions.create(**CHAT)  # the free one
            with pytest.raises(openai.APIStatusError) as e:
                await client.chat.completions.create(**CHAT)
        finally:
            await client.close()
        return e.value

    err = run(go())
    body = err.response.json()
    assert err.status_code == 402 and "payer signature does not verify" in body["error"] and body["accepts"]
    assert api.gate.ledger.count() == 0
