"""X402Gate: the paid door the API server calls. Quotes in CIRC, settles before inference, records the fee.

    gate = X402Gate(load_config("x402.toml"))
    await gate.start()                      # optional: fail fast on a refused mint or a missing treasury account
    resp = gate.payment_required(resource)  # HTTP 402 with PAYMENT-REQUIRED, a fresh nonce each call
    hdrs = await gate.settle(request, resource)  # None (free path) | {"PAYMENT-RESPONSE": ...} | PaymentRejected
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass, field, fields
from decimal import ROUND_CEILING, Decimal
from pathlib import Path

from aiohttp import web
from solders.keypair import Keypair
from solders.pubkey import Pubkey

from dllm.errors import DllmError
from dllm.pay import token as tk
from dllm.pay.ledger import Acceptance, Ledger
from dllm.pay.solana_rpc import RpcError, SolanaRpc
from dllm.pay.verify import (Quote, Settled, Terms, check_exact, check_landed, check_payer_signature, cosign,
                             decode_tx, fetch_landed, submit_exact)
from dllm.pay.x402 import (HEADER_REQUIRED, HEADER_RESPONSE, HEADER_SIGNATURE, SCHEME_EXACT, SCHEME_TXSIG,
                           X402_VERSION, NonceBook, PaymentPayload, PaymentRejected, PaymentRequired,
                           PaymentRequirements, ResourceInfo, SettleResponse, decode_header, encode_header)


# The API may put its own request id here (request[REQUEST_ID] = ...); the fee row then carries it.
REQUEST_ID = web.RequestKey("dllm_request_id", str)


class X402ConfigError(DllmError):
    """Paid mode cannot start: bad config, a refused mint, or a missing treasury token account."""


@dataclass(kw_only=True)
class X402Config:
    mint: str  # CIRC mint (Token-2022), base58
    treasury: str  # wallet that owns the treasury's associated token account, base58
    price_usd: float = 0.002  # per request
    circ_usd: float  # USD per 1 CIRC
    rpc_url: str
    network: str  # CAIP-2, e.g. solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp (mainnet)
    fee_payer_keypair_path: str | None = None  # None: the `exact` scheme is not offered
    nonce_ttl_s: float = 300.0
    db_path: str = "~/.dllm/x402.sqlite"
    confirm_timeout_s: float = 30.0
    lookup_attempts: int = 3  # getTransaction tries for the txsig scheme
    lookup_delay_s: float = 0.5
    max_compute_units: int = 200_000
    max_priority_lamports: int = 5_000  # priority fee the fee payer will cover per exact payment
    mint_refresh_s: float = 300.0
    description: str = "dllm inference"

    def __post_init__(self):
        for name in ("mint", "treasury"):
            try:
                Pubkey.from_string(getattr(self, name))
            except ValueError:
                raise X402ConfigError(f"x402 {name} {getattr(self, name)!r} is not a base58 address") from None
        if not self.price_usd > 0 or not self.circ_usd > 0:
            raise X402ConfigError(f"price_usd ({self.price_usd}) and circ_usd ({self.circ_usd}) must be > 0")
        if not self.network.startswith("solana:"):
            raise X402ConfigError(f"network {self.network!r} is not a Solana CAIP-2 id (solana:<genesis hash>)")
        if self.nonce_ttl_s <= 0:
            raise X402ConfigError(f"nonce_ttl_s must be > 0, got {self.nonce_ttl_s}")


def load_config(path: str | Path) -> X402Config:
    """X402Config from a TOML or JSON file (top level or an [x402] table; dashes or underscores in keys)."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".json":
        raw = json.loads(text)
    else:
        import tomllib

        raw = tomllib.loads(text)
    raw = raw.get("x402", raw)
    raw = {k.replace("-", "_"): v for k, v in raw.items()}
    known = {f.name for f in fields(X402Config)}
    if unknown := sorted(set(raw) - known):
        raise X402ConfigError(f"{path}: unknown x402 keys {unknown}; known: {sorted(known)}")
    try:
        return X402Config(**raw)
    except TypeError as e:
        raise X402ConfigError(f"{path}: {e}") from None


def load_keypair(path: str | Path) -> Keypair:
    try:
        return tk.load_keypair(path)
    except ValueError as e:
        raise X402ConfigError(str(e)) from None


def price_atomic(price_usd: float, circ_usd: float, decimals: int) -> int:
    """USD price -> atomic CIRC units, rounded up (never under-charge), at least 1."""
    units = Decimal(str(price_usd)) / Decimal(str(circ_usd)) * (Decimal(10) ** decimals)
    return max(1, int(units.to_integral_value(rounding=ROUND_CEILING)))


@dataclass
class _Loaded:
    terms: Terms
    refusal: str | None
    at: float = field(default_factory=time.monotonic)


class X402Gate:
    """One per API process. Payment state lives in the SQLite ledger, so processes may share db_path."""

    def __init__(self, config: X402Config, *, ledger: Ledger | None = None, clock=time.time):
        self.config = config
        self.ledger = ledger or Ledger(Path(config.db_path).expanduser())
        self.nonces = NonceBook(self.ledger.secret(), config.nonce_ttl_s, clock)
        self.fee_payer = load_keypair(config.fee_payer_keypair_path) if config.fee_payer_keypair_path else None
        self.mint, self.treasury = Pubkey.from_string(config.mint), Pubkey.from_string(config.treasury)
        self._rpc: SolanaRpc | None = None
        self._loaded: _Loaded | None = None
        self._inflight: set[str] = set()  # nonces being settled in this process (the ledger decides across)

    @property
    def schemes(self) -> tuple[str, ...]:
        return (SCHEME_EXACT, SCHEME_TXSIG) if self.fee_payer else (SCHEME_TXSIG,)

    @property
    def rpc(self) -> SolanaRpc:
        if self._rpc is None:
            self._rpc = SolanaRpc(self.config.rpc_url)
        return self._rpc

    async def close(self) -> None:
        if self._rpc is not None:
            await self._rpc.close()

    # ------------------------------------------------------------ mint and treasury

    async def _fetch_terms(self, rpc: SolanaRpc) -> _Loaded:
        acct = await rpc.get_account_info(str(self.mint))
        if acct is None:
            raise X402ConfigError(f"mint {self.mint} does not exist on {self.config.rpc_url}")
        try:
            info = tk.parse_mint(acct.data, Pubkey.from_string(acct.owner))
        except ValueError as e:
            raise X402ConfigError(f"mint {self.mint}: {e}") from None
        treasury_ata = tk.ata(self.treasury, self.mint, info.program)
        refusal = info.refusal()
        ata_acct = await rpc.get_account_info(str(treasury_ata))
        if refusal is None and ata_acct is None:
            refusal = (f"treasury token account {treasury_ata} does not exist; create it at set-up "
                       "(dllm.pay.client.create_treasury_ata)")
        terms = Terms(network=self.config.network, mint=self.mint, mint_info=info, treasury=self.treasury,
                      treasury_ata=treasury_ata, fee_payer=self.fee_payer,
                      max_compute_units=self.config.max_compute_units,
                      max_priority_lamports=self.config.max_priority_lamports)
        return _Loaded(terms, refusal)

    async def start(self) -> None:
        """Load the mint and check the treasury account; X402ConfigError if paid mode cannot work."""
        self._loaded = await self._fetch_terms(self.rpc)
        if self._loaded.refusal:
            raise X402ConfigError(self._loaded.refusal)

    async def _terms(self) -> Terms:
        """Mint terms, refreshed every mint_refresh_s (fee settings can change); PaymentRejected if refused."""
        if self._loaded is None or time.monotonic() - self._loaded.at > self.config.mint_refresh_s:
            try:
                self._loaded = await self._fetch_terms(self.rpc)
            except (RpcError, X402ConfigError) as e:
                if self._loaded is None:
                    raise PaymentRejected(f"payment verification unavailable: {e}", "unavailable") from None
        if self._loaded.refusal:
            raise PaymentRejected(self._loaded.refusal, "mint_refused")
        return self._loaded.terms

    def _terms_blocking(self) -> _Loaded:
        """First quote before start(): fetch on a private loop in a thread (once; never blocks the caller's loop
        on its own RPC session)."""
        out: list = []

        def run():
            async def go():
                rpc = SolanaRpc(self.config.rpc_url)
                try:
                    out.append(await self._fetch_terms(rpc))
                except (RpcError, X402ConfigError) as e:
                    out.append(e)
                finally:
                    await rpc.close()
            asyncio.run(go())

        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join()
        if isinstance(out[0], Exception):
            raise out[0]
        self._loaded = out[0]
        return self._loaded

    # ------------------------------------------------------------ quotes

    def _quote_fields(self, resource: str, amount: str, min_net: str) -> dict:
        """What a nonce's MAC binds: a nonce for any other quote fails."""
        return {"resource": resource, "network": self.config.network, "asset": str(self.mint),
                "payTo": str(self.treasury), "amount": amount, "minNet": min_net}

    def requirements(self, resource: str, loaded: _Loaded) -> list[PaymentRequirements]:
        info = loaded.terms.mint_info
        min_net = price_atomic(self.config.price_usd, self.config.circ_usd, info.decimals)
        gross = info.gross_for_net(min_net)
        nonce, expires = self.nonces.issue(self._quote_fields(resource, str(gross), str(min_net)))
        common = {"decimals": info.decimals, "tokenProgram": str(info.program), "minNetAmount": str(min_net),
                  "expiresAt": expires, "treasuryTokenAccount": str(loaded.terms.treasury_ata)}
        extra = {SCHEME_TXSIG: {"nonce": nonce}}
        if self.fee_payer:
            extra[SCHEME_EXACT] = {"feePayer": str(self.fee_payer.pubkey()), "memo": nonce}
        return [PaymentRequirements(scheme=s, network=self.config.network, asset=str(self.mint), amount=str(gross),
                                    pay_to=str(self.treasury), max_timeout_seconds=int(self.config.nonce_ttl_s),
                                    extra={**common, **extra[s]}) for s in self.schemes]

    def payment_required(self, resource: str, error: str | None = None) -> web.Response:
        """HTTP 402 with PAYMENT-REQUIRED = base64(PaymentRequired) and the same JSON as the body."""
        try:
            loaded = self._loaded or self._terms_blocking()
        except (RpcError, X402ConfigError) as e:  # cannot price without the mint's decimals
            return web.json_response({"error": {"message": f"payment quotes unavailable: {e}",
                                                "type": "payment_unavailable"}}, status=503)
        accepts = [] if loaded.refusal else self.requirements(resource, loaded)
        error = error or loaded.refusal
        body = PaymentRequired(x402_version=X402_VERSION, error=error, accepts=accepts,
                               resource=ResourceInfo(url=resource, description=self.config.description))
        return web.json_response(body.wire(), status=402, headers={HEADER_REQUIRED: encode_header(body)})

    # ------------------------------------------------------------ settlement

    def _check_accepted(self, p: PaymentPayload, resource: str) -> Quote:
        """The accepted entry is one of ours, for this resource, with a nonce we issued and that has not expired."""
        a = p.accepted
        if p.x402_version != X402_VERSION:
            raise PaymentRejected(f"x402Version {p.x402_version} unsupported; this server speaks {X402_VERSION}",
                                  "invalid_x402_version")
        if a.scheme not in self.schemes:
            raise PaymentRejected(f"scheme {a.scheme!r} not offered; offered: {list(self.schemes)}",
                                  "unsupported_scheme")
        for what, got, want in (("network", a.network, self.config.network), ("asset", a.asset, str(self.mint)),
                                ("payTo", a.pay_to, str(self.treasury))):
            if got != want:
                raise PaymentRejected(f"accepted {what} {got!r} is not this server's {want!r}", f"{what}_mismatch")
        nonce = a.extra.get("memo" if a.scheme == SCHEME_EXACT else "nonce")
        min_net = str(a.extra.get("minNetAmount", ""))
        self.nonces.check(nonce, self._quote_fields(resource, a.amount, min_net))
        return Quote(nonce=nonce, amount=int(a.amount), min_net=int(min_net), resource=resource)

    def _unused(self, signature: str, nonce: str) -> None:
        """Early refusal of a replay (the same header again) or of a second payment on one quote. Only a fast
        answer: the ledger's UNIQUE constraints in accept() are what make both single-use."""
        if why := self.ledger.used(signature=signature):
            raise PaymentRejected(why, "signature_reused")
        if why := self.ledger.used(nonce=nonce):
            raise PaymentRejected(why, "nonce_reused")

    async def _settle_exact(self, p: PaymentPayload, terms: Terms, quote: Quote) -> Settled:
        tx = decode_tx(p.payload.get("transaction"))
        payer, net = check_exact(tx, terms, quote)
        signed = cosign(tx, terms.fee_payer)  # only a checked message ever gets the fee payer's signature
        sig = str(signed.signatures[0])
        self._unused(sig, quote.nonce)
        await submit_exact(signed, self.rpc, self.config.confirm_timeout_s)
        return Settled(sig, payer, net)

    async def _settle_txsig(self, p: PaymentPayload, terms: Terms, quote: Quote, resource: str) -> Settled:
        sig, payer = check_payer_signature(p.payload, resource, p.accepted.wire())
        self._unused(sig, quote.nonce)
        result = await fetch_landed(sig, self.rpc, self.config.lookup_attempts, self.config.lookup_delay_s)
        return Settled(sig, payer, check_landed(result, sig, payer, terms, quote))

    async def settle(self, request: web.Request, resource: str) -> dict | None:
        """None without PAYMENT-SIGNATURE; {"PAYMENT-RESPONSE": ...} once paid, confirmed and recorded;
        PaymentRejected otherwise (nothing recorded, nothing to serve)."""
        header = request.headers.get(HEADER_SIGNATURE)
        if header is None:
            return None
        payload = decode_header(header, PaymentPayload)
        terms = await self._terms()
        quote = self._check_accepted(payload, resource)
        if quote.nonce in self._inflight:
            raise PaymentRejected("a payment for this quote is already being settled", "payment_in_flight")
        self._inflight.add(quote.nonce)
        try:
            if payload.accepted.scheme == SCHEME_EXACT:
                settled = await self._settle_exact(payload, terms, quote)
            else:
                settled = await self._settle_txsig(payload, terms, quote, resource)
            request_id = str(request.get(REQUEST_ID) or uuid.uuid4().hex)
            await asyncio.to_thread(self.ledger.accept, Acceptance(
                signature=settled.signature, nonce=quote.nonce, scheme=payload.accepted.scheme, payer=settled.payer,
                mint=str(self.mint), amount=settled.net, resource=resource, request_id=request_id))
        finally:
            self._inflight.discard(quote.nonce)
        resp = SettleResponse(success=True, payer=settled.payer, transaction=settled.signature,
                              network=self.config.network, amount=str(settled.net), extra={"requestId": request_id})
        return {HEADER_RESPONSE: encode_header(resp)}
