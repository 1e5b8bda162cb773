"""Client side of the paid door: answer a 402 by paying in CIRC, then retry with PAYMENT-SIGNATURE.

    payer = Payer(load_keypair("~/.config/solana/id.json"), rpc_url)
    client = openai.AsyncOpenAI(base_url=..., api_key="x402",
                                http_client=httpx.AsyncClient(transport=X402AsyncTransport(payer)))

`exact` builds the stock x402 transaction (ComputeLimit, ComputePrice, TransferChecked, Memo) with the server's
fee payer in slot 0 and signs only as token authority; the server co-signs and submits. `dllm-txsig` pays
first with our own transaction, waits for confirmation, then attaches its signature and an ed25519 signature
over (signature, resource, accepted).
"""
from __future__ import annotations

import asyncio
import base64
import sys
import threading

import click
import httpx
from solders.hash import Hash
from solders.keypair import Keypair
from solders.message import MessageV0, to_bytes_versioned
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.transaction import VersionedTransaction

from dllm.errors import DllmError
from dllm.pay import token as tk
from dllm.pay.solana_rpc import SolanaRpc
from dllm.pay.x402 import (HEADER_REQUIRED, HEADER_RESPONSE, HEADER_SIGNATURE, SCHEME_EXACT, SCHEME_TXSIG,
                           PaymentPayload, PaymentRequired, PaymentRequirements, SettleResponse, decode_header,
                           encode_header, payer_message)

MAX_QUOTE_CHARS = 65536


class PaymentError(DllmError):
    """The client could not pay a quote (no usable scheme, RPC failure, transaction failed)."""


class Payer:
    """Pays x402 quotes from one keypair. Create and use inside one event loop (it holds an RPC session)."""

    def __init__(self, keypair: Keypair, rpc_url: str, prefer: str = SCHEME_EXACT, confirm_timeout_s: float = 60.0,
                 compute_units: int = 20_000, micro_lamports: int = 1, max_amount: int | None = None):
        """``max_amount``: refuse quotes above this many atomic units (an agent paying on its own needs a cap)."""
        self.keypair, self.prefer, self.max_amount = keypair, prefer, max_amount
        self.rpc = SolanaRpc(rpc_url)
        self.confirm_timeout_s = confirm_timeout_s
        self.compute_units, self.micro_lamports = compute_units, micro_lamports
        self._mints: dict[str, tk.MintInfo] = {}

    @property
    def pubkey(self) -> Pubkey:
        return self.keypair.pubkey()

    async def close(self) -> None:
        await self.rpc.close()

    def choose(self, required: PaymentRequired) -> PaymentRequirements:
        """Our preferred scheme if offered, else the other one we speak."""
        offered = {r.scheme: r for r in required.accepts if r.network.startswith("solana:")}
        for scheme in (self.prefer, SCHEME_EXACT, SCHEME_TXSIG):
            if scheme in offered:
                req = offered[scheme]
                if self.max_amount is not None and int(req.amount) > self.max_amount:
                    raise PaymentError(f"quote asks {req.amount} atomic units of {req.asset}, over the cap "
                                       f"{self.max_amount}")
                return req
        raise PaymentError(f"no payable scheme in {sorted(offered) or 'an empty accepts list'}"
                           + (f"; server says: {required.error}" if required.error else ""))

    async def mint_info(self, mint: str) -> tk.MintInfo:
        if mint not in self._mints:
            acct = await self.rpc.get_account_info(mint)
            if acct is None:
                raise PaymentError(f"mint {mint} not found on {self.rpc.url}")
            self._mints[mint] = tk.parse_mint(acct.data, Pubkey.from_string(acct.owner))
        return self._mints[mint]

    async def transfer(self, req: PaymentRequirements, amount: int | None = None):
        """The TransferChecked paying ``req`` (amount = the quoted gross unless given) from our ATA."""
        info = await self.mint_info(req.asset)
        mint, pay_to = Pubkey.from_string(req.asset), Pubkey.from_string(req.pay_to)
        return tk.transfer_checked(tk.ata(self.pubkey, mint, info.program), mint, tk.ata(pay_to, mint, info.program),
                                   self.pubkey, int(req.amount) if amount is None else amount, info.decimals,
                                   info.program)

    def budget(self) -> list:
        return [tk.compute_limit(self.compute_units), tk.compute_price(self.micro_lamports)]

    async def blockhash(self, req: PaymentRequirements | None = None) -> Hash:
        hinted = (req.extra.get("recentBlockhash") if req else None)
        return Hash.from_string(hinted) if hinted else Hash.from_string((await self.rpc.get_latest_blockhash())[0])

    # ------------------------------------------------------------ exact

    async def sign_exact(self, req: PaymentRequirements, instructions: list) -> str:
        """A base64 v0 transaction with the server's fee payer in slot 0 (left empty) and our signature."""
        fee_payer = Pubkey.from_string(req.extra["feePayer"])
        msg = MessageV0.try_compile(fee_payer, instructions, [], await self.blockhash(req))
        ours = self.keypair.sign_message(to_bytes_versioned(msg))
        n = msg.header.num_required_signatures
        sigs = [ours if k == self.pubkey else Signature.default() for k in list(msg.account_keys)[:n]]
        return base64.b64encode(bytes(VersionedTransaction.populate(msg, sigs))).decode()

    async def exact_payload(self, req: PaymentRequirements) -> dict:
        ixs = [*self.budget(), await self.transfer(req), tk.memo(req.extra["memo"])]
        return {"transaction": await self.sign_exact(req, ixs)}

    # ------------------------------------------------------------ txsig

    async def send(self, instructions: list, skip_preflight: bool = False, wait: bool = True) -> str:
        """Sign as fee payer, submit, and (by default) wait for confirmation; the signature."""
        msg = MessageV0.try_compile(self.pubkey, instructions, [], await self.blockhash())
        sig = await self.rpc.send_transaction(bytes(VersionedTransaction(msg, [self.keypair])), skip_preflight)
        if wait:
            await self.rpc.wait_confirmed(sig, self.confirm_timeout_s)
        return sig

    def attach(self, req: PaymentRequirements, resource: str, signature: str) -> dict:
        """The txsig payload for an already confirmed payment transaction."""
        psig = self.keypair.sign_message(payer_message(signature, resource, req.wire()))
        return {"signature": signature, "payer": str(self.pubkey), "payerSignature": str(psig)}

    async def txsig_payload(self, req: PaymentRequirements, resource: str) -> dict:
        sig = await self.send([*self.budget(), await self.transfer(req), tk.memo(req.extra["nonce"])])
        return self.attach(req, resource, sig)

    # ------------------------------------------------------------ both

    async def pay(self, required: PaymentRequired) -> str:
        """The PAYMENT-SIGNATURE header value answering ``required``."""
        req = self.choose(required)
        resource = required.resource.url if required.resource else ""
        if req.scheme == SCHEME_EXACT:
            payload = await self.exact_payload(req)
        else:
            payload = await self.txsig_payload(req, resource)
        return encode_header(PaymentPayload(payload=payload, accepted=req, resource=required.resource))


def parse_required(resp: httpx.Response) -> PaymentRequired | None:
    """The PaymentRequired of a 402 answer, or None if it is not an x402 v2 answer."""
    value = resp.headers.get(HEADER_REQUIRED)
    if resp.status_code != 402 or not value:
        return None
    return decode_header(value, PaymentRequired, MAX_QUOTE_CHARS)


def settle_response(resp: httpx.Response) -> SettleResponse | None:
    value = resp.headers.get(HEADER_RESPONSE)
    return decode_header(value, SettleResponse, MAX_QUOTE_CHARS) if value else None


def _retry(request: httpx.Request, body: bytes, header: str) -> httpx.Request:
    headers = httpx.Headers(request.headers)
    headers[HEADER_SIGNATURE] = header
    return httpx.Request(request.method, request.url, headers=headers, content=body, extensions=request.extensions)


class X402AsyncTransport(httpx.AsyncBaseTransport):
    """httpx transport that pays a 402 once and re-sends; works as the openai client's http_client transport."""

    def __init__(self, payer: Payer, inner: httpx.AsyncBaseTransport | None = None):
        self.payer, self.inner = payer, inner or httpx.AsyncHTTPTransport()
        self.last_settlement: SettleResponse | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        resp = await self.inner.handle_async_request(request)
        if resp.status_code != 402 or HEADER_SIGNATURE in request.headers:
            return resp
        await resp.aread()
        required = parse_required(resp)
        if required is None:
            return resp
        await resp.aclose()
        paid = await self.inner.handle_async_request(_retry(request, body, await self.payer.pay(required)))
        self.last_settlement = settle_response(paid)
        return paid

    async def aclose(self) -> None:
        await self.inner.aclose()
        await self.payer.close()


class _LoopThread:
    """A private event loop in a daemon thread, so sync callers can use the async Payer."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()


class X402Transport(httpx.BaseTransport):
    """Sync twin of X402AsyncTransport (for openai.OpenAI); payments run on a private loop thread."""

    def __init__(self, payer_factory, inner: httpx.BaseTransport | None = None):
        """``payer_factory()`` builds the Payer on the private loop (a Payer's RPC session belongs to its loop)."""
        self.inner = inner or httpx.HTTPTransport()
        self._loop = _LoopThread()
        self.payer: Payer = self._loop.run(_call(payer_factory))
        self.last_settlement: SettleResponse | None = None

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        resp = self.inner.handle_request(request)
        if resp.status_code != 402 or HEADER_SIGNATURE in request.headers:
            return resp
        resp.read()
        required = parse_required(resp)
        if required is None:
            return resp
        resp.close()
        paid = self.inner.handle_request(_retry(request, body, self._loop.run(self.payer.pay(required))))
        self.last_settlement = settle_response(paid)
        return paid

    def close(self) -> None:
        """Idempotent: httpx.Client.close() calls it, and so may the owner."""
        if self._loop is None:
            return
        self.inner.close()
        self._loop.run(self.payer.close())
        self._loop.loop.call_soon_threadsafe(self._loop.loop.stop)
        self._loop = None


async def _call(fn):
    return fn()


def openai_client(payer: Payer, base_url: str, **kw):
    """An openai.AsyncOpenAI whose requests pay their own 402s."""
    import openai

    return openai.AsyncOpenAI(base_url=base_url, api_key=kw.pop("api_key", "x402"),
                              http_client=httpx.AsyncClient(transport=X402AsyncTransport(payer), timeout=120), **kw)


async def create_treasury_ata(rpc_url: str, funder: Keypair, treasury: Pubkey, mint: Pubkey) -> Pubkey:
    """Set-up step: create the treasury's associated token account (idempotent), paid by ``funder``."""
    payer = Payer(funder, rpc_url)
    try:
        info = await payer.mint_info(str(mint))
        await payer.send([tk.create_ata_idempotent(funder.pubkey(), treasury, mint, info.program)])
        return tk.ata(treasury, mint, info.program)
    finally:
        await payer.close()


@click.command("pay")
@click.option("--keypair", required=True, type=click.Path(exists=True), help="Solana CLI keypair JSON")
@click.option("--rpc", "rpc_url", required=True, help="Solana JSON-RPC URL")
@click.option("--scheme", type=click.Choice([SCHEME_EXACT, SCHEME_TXSIG]), default=SCHEME_EXACT)
@click.option("--data", default=None, help="JSON body: POST it (else GET)")
@click.option("--max-amount", type=int, default=None, help="refuse quotes above this many atomic units")
@click.argument("url")
def pay_command(keypair, rpc_url, scheme, data, max_amount, url):
    """Request URL; if it answers 402, pay in CIRC and retry. Prints the body, the settlement to stderr."""
    kp = tk.load_keypair(keypair)
    transport = X402Transport(lambda: Payer(kp, rpc_url, prefer=scheme, max_amount=max_amount))
    with httpx.Client(transport=transport, timeout=300) as c:
        r = c.post(url, content=data, headers={"content-type": "application/json"}) if data else c.get(url)
    click.echo(r.text)
    if transport.last_settlement:
        s = transport.last_settlement
        click.echo(f"paid {s.amount} atomic units, tx {s.transaction}", err=True)
    sys.exit(0 if r.is_success else 1)
