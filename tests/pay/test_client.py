"""The client helper end to end over real HTTP: the official `openai` client, through X402AsyncTransport /
X402Transport, answers the 402 by paying on the LiteSVM node (either scheme) and gets its completion.

The server here is a minimal OpenAI-shaped aiohttp route wired to X402Gate exactly as the API server calls it
(settle -> PaymentRejected -> payment_required(error)); test_e2e_api.py runs the real dllm API server.
"""
from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
from aiohttp import web

from dllm.pay import token as tk
from dllm.pay.client import Payer, X402AsyncTransport, X402Transport
from dllm.pay.x402 import SCHEME_EXACT, SCHEME_TXSIG, PaymentRejected
from tests.pay.conftest import PRICE_ATOMIC, RESOURCE, run

openai = pytest.importorskip("openai")


class ToyApi:
    """An OpenAI-compatible chat route behind the gate, on its own thread and loop."""

    def __init__(self, gate_factory):
        self.served = 0
        self._gate_factory = gate_factory
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._serve, args=(ready,), daemon=True).start()
        ready.wait(10)

    async def chat(self, request: web.Request) -> web.Response:
        try:
            headers = await self.gate.settle(request, RESOURCE)
        except PaymentRejected as e:
            return self.gate.payment_required(RESOURCE, error=str(e))
        if headers is None:  # the toy has no free path
            return self.gate.payment_required(RESOURCE)
        self.served += 1
        body = await request.json()
        return web.json_response({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "paid answer"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}, headers=headers)

    def _serve(self, ready):
        asyncio.set_event_loop(self.loop)
        self.gate = self._gate_factory()
        app = web.Application()
        app.router.add_post(RESOURCE, self.chat)
        self.runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"
        ready.set()
        self.loop.run_forever()

    def stop(self):
        async def down():
            await self.gate.close()
            await self.runner.cleanup()
        asyncio.run_coroutine_threadsafe(down(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def toy(make_gate):
    api = ToyApi(make_gate)
    yield api
    api.stop()


@pytest.mark.parametrize("scheme", [SCHEME_EXACT, SCHEME_TXSIG])
def test_async_openai_client_pays_and_gets_the_answer(circ, toy, scheme):
    kp = circ.fund(circ.plain)

    async def go():
        transport = X402AsyncTransport(Payer(kp, circ.node.url, prefer=scheme))
        client = openai.AsyncOpenAI(base_url=toy.url, api_key="x402", max_retries=0,
                                    http_client=httpx.AsyncClient(transport=transport))
        try:
            out = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
        finally:
            await client.close()
        return out, transport.last_settlement

    out, settlement = run(go())
    assert out.choices[0].message.content == "paid answer" and toy.served == 1
    assert settlement.success and settlement.amount == str(PRICE_ATOMIC) and settlement.payer == str(kp.pubkey())
    assert toy.gate.ledger.count() == 1


def test_sync_openai_client_pays(circ, toy):
    kp = circ.fund(circ.plain)
    transport = X402Transport(lambda: Payer(kp, circ.node.url, prefer=SCHEME_TXSIG))
    client = openai.OpenAI(base_url=toy.url, api_key="x402", max_retries=0,
                           http_client=httpx.Client(transport=transport))
    try:
        out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    finally:
        client.close()
        transport.close()
    assert out.choices[0].message.content == "paid answer" and transport.last_settlement.success


def test_payer_refuses_quotes_over_its_cap(circ, toy):
    from dllm.pay.client import PaymentError

    kp = circ.fund(circ.plain)

    async def go():
        transport = X402AsyncTransport(Payer(kp, circ.node.url, max_amount=PRICE_ATOMIC - 1))
        async with httpx.AsyncClient(transport=transport) as c:
            with pytest.raises(PaymentError, match="over the cap"):
                await c.post(f"{toy.url}/chat/completions", json={"model": "tiny", "messages": []})
    run(go())
    assert toy.served == 0 and circ.node.token_balance(tk.ata(kp.pubkey(), circ.plain)) == 10 ** 9


def test_unpayable_quote_surfaces_as_402(circ, toy):
    """A payer without CIRC: its exact transfer fails preflight, the server answers 402, nothing is served."""
    from solders.keypair import Keypair

    kp = Keypair()
    circ.node.airdrop(kp.pubkey())
    circ.node.create_ata(kp.pubkey(), circ.plain)

    async def go():
        transport = X402AsyncTransport(Payer(kp, circ.node.url, prefer=SCHEME_EXACT))
        client = openai.AsyncOpenAI(base_url=toy.url, api_key="x402", max_retries=0,
                                    http_client=httpx.AsyncClient(transport=transport))
        try:
            with pytest.raises(openai.APIStatusError) as e:
                await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
        finally:
            await client.close()
        return e.value

    err = run(go())
    assert err.status_code == 402 and "transaction failed" in err.response.json()["error"]
    assert toy.served == 0 and toy.gate.ledger.count() == 0


def test_dllm_pay_command(circ, toy, tmp_path):
    """`dllm pay --keypair FILE --rpc URL --data JSON URL` (the click command the CLI mounts)."""
    import json

    from click.testing import CliRunner

    from dllm.pay.client import pay_command

    kp = circ.fund(circ.plain)
    key = tmp_path / "id.json"
    key.write_text(json.dumps(list(bytes(kp))))
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
    out = CliRunner().invoke(pay_command, ["--keypair", str(key), "--rpc", circ.node.url, "--scheme", SCHEME_TXSIG,
                                           "--data", body, f"{toy.url}/chat/completions"])
    assert out.exit_code == 0, out.output
    assert "paid answer" in out.stdout and f"paid {PRICE_ATOMIC} atomic units" in out.stderr
    assert toy.served == 1


def test_create_treasury_ata_at_set_up(circ, make_gate):
    from solders.keypair import Keypair

    from dllm.pay.client import create_treasury_ata
    from dllm.pay.gate import X402ConfigError

    treasury = Keypair().pubkey()
    gate = make_gate(treasury=str(treasury))
    with pytest.raises(X402ConfigError, match="does not exist"):
        run(_start_and_close(gate))
    funder = Keypair()
    circ.node.airdrop(funder.pubkey())
    run(create_treasury_ata(circ.node.url, funder, treasury, circ.plain))
    run(_start_and_close(gate))  # now it starts


async def _start_and_close(gate):
    try:
        await gate.start()
    finally:
        await gate.close()
