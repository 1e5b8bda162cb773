"""One LiteSVM node per session with CIRC minted three ways; a fresh gate, ledger and payer per test."""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import pytest
from aiohttp.test_utils import make_mocked_request
from solders.keypair import Keypair
from solders.pubkey import Pubkey

from dllm.pay.client import Payer
from dllm.pay.gate import REQUEST_ID, X402Config, X402Gate
from dllm.pay.ledger import Ledger
from dllm.pay.x402 import HEADER_SIGNATURE
from tests.pay.litesvm_rpc import LiteSVMRpc

NETWORK = "solana:litesvm-local"
RESOURCE = "/v1/chat/completions"
PRICE_USD, CIRC_USD, DECIMALS = 0.002, 0.01, 6  # 0.2 CIRC = 200_000 atomic units per request
PRICE_ATOMIC = 200_000
FEE_BPS, FEE_MAX = 100, 10 ** 9  # 1 % transfer fee


@dataclass
class Circ:
    node: LiteSVMRpc
    authority: Keypair
    treasury: Keypair
    fee_payer: Keypair
    plain: Pubkey  # Token-2022 CIRC, no extensions
    fee: Pubkey  # with TransferFeeConfig 1 %
    hook: Pubkey  # with TransferHook (refused)
    other: Pubkey  # some other Token-2022 mint, for wrong-mint payments

    def fund(self, mint: Pubkey, amount: int = 10 ** 9) -> Keypair:
        """A new payer with SOL and ``amount`` of ``mint`` in its ATA."""
        kp = Keypair()
        self.node.airdrop(kp.pubkey())
        self.node.mint_to(mint, self.authority, kp.pubkey(), amount)
        return kp


@pytest.fixture(scope="session")
def circ(tmp_path_factory) -> Circ:
    node = LiteSVMRpc()
    node.start()
    auth, treasury, fee_payer = Keypair(), Keypair(), Keypair()
    node.airdrop(fee_payer.pubkey())
    c = Circ(node, auth, treasury, fee_payer,
             plain=node.create_mint(auth, DECIMALS),
             fee=node.create_mint(auth, DECIMALS, fee_bps=FEE_BPS, max_fee=FEE_MAX),
             hook=node.create_mint(auth, DECIMALS, hook_program=Pubkey.new_unique()),
             other=node.create_mint(auth, DECIMALS))
    for mint in (c.plain, c.fee, c.hook):
        node.create_ata(treasury.pubkey(), mint)  # the set-up step: the treasury's ATA exists before any payer
    yield c
    node.stop()


@pytest.fixture
def make_gate(circ, tmp_path):
    """make_gate(mint, **config overrides) -> X402Gate on a fresh ledger in tmp_path."""
    kp_path = tmp_path / "fee_payer.json"
    kp_path.write_text(json.dumps(list(bytes(circ.fee_payer))))

    def make(mint: Pubkey | None = None, db: str = "x402.sqlite", **over) -> X402Gate:
        cfg = dict(mint=str(mint or circ.plain), treasury=str(circ.treasury.pubkey()), price_usd=PRICE_USD,
                   circ_usd=CIRC_USD, rpc_url=circ.node.url, network=NETWORK, fee_payer_keypair_path=str(kp_path),
                   db_path=str(tmp_path / db), confirm_timeout_s=5.0, lookup_attempts=1)
        cfg.update(over)
        return X402Gate(X402Config(**cfg))
    return make


def request_with(header: str | None, request_id: str | None = None):
    """A real aiohttp Request object carrying PAYMENT-SIGNATURE (what the API hands settle())."""
    req = make_mocked_request("POST", RESOURCE, headers={HEADER_SIGNATURE: header} if header is not None else {})
    if request_id:
        req[REQUEST_ID] = request_id
    return req


def run(coro):
    return asyncio.run(coro)


async def quote_of(gate: X402Gate, resource: str = RESOURCE):
    """The PaymentRequired a client would decode from the gate's 402."""
    from dllm.pay.x402 import HEADER_REQUIRED, PaymentRequired, decode_header

    resp = gate.payment_required(resource)
    assert resp.status == 402
    return decode_header(resp.headers[HEADER_REQUIRED], PaymentRequired, 65536)


def payer_for(circ: Circ, kp: Keypair, prefer: str) -> Payer:
    return Payer(kp, circ.node.url, prefer=prefer, confirm_timeout_s=5.0)


def ledger_rows(gate: X402Gate) -> int:
    return gate.ledger.count() + len(gate.ledger.fees())


__all__ = ["Circ", "Ledger", "request_with", "run", "quote_of", "payer_for", "ledger_rows", "RESOURCE",
           "PRICE_ATOMIC", "NETWORK"]
