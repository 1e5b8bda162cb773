"""X402Gate.settle against a real SVM (LiteSVM behind JSON-RPC): both schemes accepted, every bad payment refused
with a PaymentRejected that names the cause, and nothing recorded for a refused one."""
from __future__ import annotations

import base64
import json

import pytest
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.system_program import TransferParams, transfer

from dllm.pay import token as tk
from dllm.pay.gate import X402ConfigError
from dllm.pay.x402 import (HEADER_REQUIRED, HEADER_RESPONSE, SCHEME_EXACT, SCHEME_TXSIG, PaymentPayload,
                           PaymentRejected, PaymentRequired, SettleResponse, decode_header, encode_header)
from tests.pay.conftest import PRICE_ATOMIC, RESOURCE, ledger_rows, payer_for, quote_of, request_with, run

SCHEMES = [SCHEME_EXACT, SCHEME_TXSIG]


async def make_header(circ, gate, kp: Keypair, scheme: str, *, q=None, amount=None, mint=None, dest_owner=None,
                      nonce=None, extra_ixs=(), skip_preflight=False, wait=True, accepted_edit=None, sign_as=None):
    """Pay (or prepare to pay) the gate's quote with a transaction we shape; the PAYMENT-SIGNATURE value."""
    q = q or await quote_of(gate)
    payer = payer_for(circ, kp, scheme)
    try:
        req = payer.choose(q)
        assert req.scheme == scheme
        mint = mint or Pubkey.from_string(req.asset)
        dest = tk.ata(dest_owner or circ.treasury.pubkey(), mint)
        amt = int(req.amount) if amount is None else amount
        nonce = nonce or req.extra.get("memo") or req.extra["nonce"]
        ixs = [*payer.budget(), tk.transfer_checked(tk.ata(kp.pubkey(), mint), mint, dest, kp.pubkey(), amt, 6),
               tk.memo(nonce), *extra_ixs]
        if accepted_edit:
            req = req.model_copy(update=accepted_edit)
        if scheme == SCHEME_EXACT:
            payload = {"transaction": await payer.sign_exact(req, ixs)}
        else:
            sig = await payer.send(ixs, skip_preflight=skip_preflight, wait=wait)
            payload = (sign_as or payer).attach(req, RESOURCE, sig) if sign_as is not False else \
                {"signature": sig, "payer": str(kp.pubkey())}
        return encode_header(PaymentPayload(payload=payload, accepted=req, resource=q.resource))
    finally:
        await payer.close()


def rejected(gate, header, match: str):
    """settle() refuses with ``match`` in the message and the ledger stays empty."""
    async def go():
        try:
            with pytest.raises(PaymentRejected, match=match) as e:
                await gate.settle(request_with(header), RESOURCE)
            # the API answers with a fresh quote carrying the error
            resp = gate.payment_required(RESOURCE, error=str(e.value))
            q = decode_header(resp.headers[HEADER_REQUIRED], PaymentRequired, 65536)
            assert resp.status == 402 and q.error == str(e.value) and q.accepts
        finally:
            await gate.close()
    run(go())
    assert ledger_rows(gate) == 0, "a refused payment must leave no ledger row"


# ---------------------------------------------------------------- accepted

@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("with_fee", [False, True], ids=["plain", "transfer-fee"])
def test_pay_and_get_accepted(circ, make_gate, scheme, with_fee):
    mint = circ.fee if with_fee else circ.plain
    gate = make_gate(mint)
    kp = circ.fund(mint)
    treasury_ata = tk.ata(circ.treasury.pubkey(), mint)
    before = circ.node.token_balance(treasury_ata)

    async def go():
        await gate.start()
        q = await quote_of(gate)
        assert {r.scheme for r in q.accepts} == set(SCHEMES)
        gross = int(q.accepts[0].amount)
        assert gross == (202_021 if with_fee else PRICE_ATOMIC)  # 1 % fee: 202021 - ceil(2020.21) = 200000
        header = await make_header(circ, gate, kp, scheme, q=q)
        out = await gate.settle(request_with(header, request_id="req-1"), RESOURCE)
        await gate.close()
        return out

    out = run(go())
    settle = decode_header(out[HEADER_RESPONSE], SettleResponse)
    assert settle.success and settle.payer == str(kp.pubkey()) and settle.amount == str(PRICE_ATOMIC)
    assert circ.node.token_balance(treasury_ata) - before == PRICE_ATOMIC  # net of the withheld fee
    [row] = gate.ledger.fees()
    assert (row.request_id, row.payer, row.amount, row.signature) == \
        ("req-1", str(kp.pubkey()), PRICE_ATOMIC, settle.transaction)


def test_no_header_is_the_free_path(circ, make_gate):
    gate = make_gate()
    assert run(gate.settle(request_with(None), RESOURCE)) is None


# ---------------------------------------------------------------- refused: what was paid

@pytest.mark.parametrize("scheme", SCHEMES)
def test_wrong_mint(circ, make_gate, scheme):
    gate = make_gate()
    kp = circ.fund(circ.other)
    circ.node.create_ata(circ.treasury.pubkey(), circ.other)  # so the txsig transfer can land
    rejected(gate, run(make_header(circ, gate, kp, scheme, mint=circ.other)), "wrong mint")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_wrong_destination(circ, make_gate, scheme):
    gate = make_gate()
    kp, thief = circ.fund(circ.plain), Keypair()
    circ.node.create_ata(thief.pubkey(), circ.plain)
    rejected(gate, run(make_header(circ, gate, kp, scheme, dest_owner=thief.pubkey())), "wrong destination")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_underpaid(circ, make_gate, scheme):
    gate = make_gate()
    kp = circ.fund(circ.plain)
    rejected(gate, run(make_header(circ, gate, kp, scheme, amount=PRICE_ATOMIC - 1)), "underpaid")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_transfer_fee_takes_it_under_the_price(circ, make_gate, scheme):
    gate = make_gate(circ.fee)
    kp = circ.fund(circ.fee)
    # the price itself, gross: the 1 % fee withholds 2000 and the treasury nets 198000
    rejected(gate, run(make_header(circ, gate, kp, scheme, amount=PRICE_ATOMIC)), "transfer fee withholds 2000")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_failed_transaction(circ, make_gate, scheme):
    gate = make_gate()
    kp = circ.fund(circ.plain, amount=10)  # cannot cover the price: TransferChecked fails (insufficient funds)
    header = run(make_header(circ, gate, kp, scheme, skip_preflight=True, wait=False))
    rejected(gate, header, "transaction failed" if scheme == SCHEME_EXACT else "failed on-chain")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_unconfirmed_then_confirmed(circ, make_gate, scheme):
    """Not confirmed: refused, nothing served. Once it confirms, the same header is accepted."""
    gate = make_gate(confirm_timeout_s=0.3)
    kp = circ.fund(circ.plain)
    circ.node.hold = True
    try:
        header = run(make_header(circ, gate, kp, scheme, wait=False))
        rejected(gate, header, "not confirmed")
    finally:
        circ.node.hold = False
    circ.node.confirm()
    out = run(_settle_and_close(gate, header))
    assert decode_header(out[HEADER_RESPONSE], SettleResponse).success and gate.ledger.count() == 1


async def _settle_and_close(gate, header):
    try:
        return await gate.settle(request_with(header), RESOURCE)
    finally:
        await gate.close()


# ---------------------------------------------------------------- refused: single use

@pytest.mark.parametrize("scheme", SCHEMES)
def test_signature_reused(circ, make_gate, scheme):
    gate = make_gate()
    kp = circ.fund(circ.plain)
    header = run(make_header(circ, gate, kp, scheme))
    assert run(_settle_and_close(gate, header))
    with pytest.raises(PaymentRejected, match="already used to pay"):
        run(_settle_and_close(gate, header))
    assert gate.ledger.count() == 1


@pytest.mark.parametrize("scheme", SCHEMES)
def test_nonce_reused(circ, make_gate, scheme):
    """A second, different transaction carrying an already used quote nonce."""
    gate = make_gate()
    kp = circ.fund(circ.plain)
    q = run(quote_of(gate))
    assert run(_settle_and_close(gate, run(make_header(circ, gate, kp, scheme, q=q))))
    second = run(make_header(circ, gate, kp, scheme, q=q, amount=PRICE_ATOMIC + 1))  # other tx, same nonce
    with pytest.raises(PaymentRejected, match="nonce was already used"):
        run(_settle_and_close(gate, second))
    assert gate.ledger.count() == 1


@pytest.mark.parametrize("scheme", SCHEMES)
def test_nonce_expired(circ, make_gate, scheme):
    now = [1_000_000.0]
    gate = make_gate(nonce_ttl_s=60)
    gate.nonces.clock = lambda: now[0]
    kp = circ.fund(circ.plain)
    header = run(make_header(circ, gate, kp, scheme))
    now[0] += 61
    rejected(gate, header, "nonce expired")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_nonce_from_another_quote(circ, make_gate, scheme):
    gate = make_gate()
    kp = circ.fund(circ.plain)
    other_resource = run(quote_of(gate, "/v1/completions"))  # quoted for another resource
    rejected(gate, run(make_header(circ, gate, kp, scheme, q=other_resource)), "not issued for this quote")
    other_nonce = run(quote_of(gate)).accepts[0].extra["memo"]  # memo carries another quote's nonce
    rejected(gate, run(make_header(circ, gate, kp, scheme, nonce=other_nonce)), "not the quote nonce")
    cheaper = {"amount": "1"}  # accepted entry edited after the quote
    rejected(gate, run(make_header(circ, gate, kp, scheme, accepted_edit=cheaper)), "not issued for this quote")


# ---------------------------------------------------------------- refused: who paid

def test_payer_signature_missing(circ, make_gate):
    gate = make_gate()
    kp = circ.fund(circ.plain)
    rejected(gate, run(make_header(circ, gate, kp, SCHEME_TXSIG, sign_as=False)), "payer signature missing")


def test_payer_signature_forged(circ, make_gate):
    gate = make_gate()
    kp = circ.fund(circ.plain)
    forger = payer_for(circ, Keypair(), SCHEME_TXSIG)  # signs, but is not the payer named in the payload
    header = run(make_header(circ, gate, kp, SCHEME_TXSIG, sign_as=forger))
    raw = json.loads(base64.b64decode(header))
    raw["payload"]["payer"] = str(kp.pubkey())
    rejected(gate, base64.b64encode(json.dumps(raw).encode()).decode(), "payer signature does not verify")


def test_bystander_cannot_claim_a_landed_payment(circ, make_gate):
    """Someone who saw the transfer on-chain signs with their own key and names themselves as payer."""
    gate = make_gate()
    kp = circ.fund(circ.plain)
    bystander = payer_for(circ, Keypair(), SCHEME_TXSIG)
    header = run(make_header(circ, gate, kp, SCHEME_TXSIG, sign_as=bystander))
    rejected(gate, header, "did not authorize this transfer")


@pytest.mark.parametrize("how", ["extra-instruction", "as-authority"])
def test_fee_payer_key_in_an_instruction(circ, make_gate, how):
    gate = make_gate()
    kp = circ.fund(circ.plain)
    fp = circ.fee_payer.pubkey()
    if how == "extra-instruction":  # drain the fee payer's SOL alongside the payment
        steal = transfer(TransferParams(from_pubkey=fp, to_pubkey=kp.pubkey(), lamports=10 ** 9))
        header = run(make_header(circ, gate, kp, SCHEME_EXACT, extra_ixs=[steal]))
    else:  # pay with the fee payer's own tokens
        circ.node.mint_to(circ.plain, circ.authority, fp, 10 ** 7)
        q = run(quote_of(gate))
        req = q.accepts[0]
        payer = payer_for(circ, kp, SCHEME_EXACT)
        ixs = [*payer.budget(), tk.transfer_checked(tk.ata(fp, circ.plain), circ.plain,
                                                    tk.ata(circ.treasury.pubkey(), circ.plain), fp,
                                                    int(req.amount), 6), tk.memo(req.extra["memo"])]
        tx = run(payer.sign_exact(req, ixs))
        header = encode_header(PaymentPayload(payload={"transaction": tx}, accepted=req, resource=q.resource))
    rejected(gate, header, "uses the fee payer's key")


# ---------------------------------------------------------------- refused: the header itself

@pytest.mark.parametrize("header,match", [
    ("not base64 at all!", "not base64 JSON"),
    (base64.b64encode(b"\xff\xfe not json").decode(), "not base64 JSON"),
    (base64.b64encode(b"[1,2]").decode(), "not an object"),
    (base64.b64encode(b'{"x402Version":2,"payload":{}}').decode(), "accepted"),
    ("A" * 9000, "limit 8192"),
    ("", "empty"),
])
def test_malformed_or_oversized_header(circ, make_gate, header, match):
    rejected(make_gate(), header, match)


def test_undecodable_or_insane_transaction(circ, make_gate):
    """exact payloads whose transaction is garbage, or decodes but indexes accounts out of range."""
    from solders.hash import Hash
    from solders.instruction import CompiledInstruction
    from solders.message import MessageHeader, MessageV0
    from solders.signature import Signature
    from solders.transaction import VersionedTransaction

    gate = make_gate()
    q = run(quote_of(gate))
    msg = MessageV0(MessageHeader(1, 0, 0), [circ.fee_payer.pubkey()], Hash.default(),
                    [CompiledInstruction(5, bytes([0, 7]), b"")], [])
    insane = base64.b64encode(bytes(VersionedTransaction.populate(msg, [Signature.default()]))).decode()
    for tx, match in (("AAAA", "could not be decoded"), (insane, "index out of bounds"), (None, "needs `transaction`")):
        p = PaymentPayload(payload={"transaction": tx}, accepted=q.accepts[0], resource=q.resource)
        rejected(gate, encode_header(p), match)


def test_wrong_version_and_scheme(circ, make_gate):
    gate = make_gate()
    q = run(quote_of(gate))
    for edit, match in ((dict(x402_version=1), "x402Version 1"), (None, "scheme 'upto' not offered")):
        req = q.accepts[0] if edit else q.accepts[0].model_copy(update={"scheme": "upto"})
        p = PaymentPayload(payload={"transaction": "AA=="}, accepted=req, **(edit or {}))
        rejected(gate, encode_header(p), match)


# ---------------------------------------------------------------- refused: the mint

def test_transfer_hook_mint_refused(circ, make_gate):
    gate = make_gate(circ.hook)
    with pytest.raises(X402ConfigError, match="TransferHook"):
        run(gate.start())
    resp = gate.payment_required(RESOURCE)
    q = decode_header(resp.headers[HEADER_REQUIRED], PaymentRequired, 65536)
    assert resp.status == 402 and q.accepts == [] and "transfer-hook mints are refused" in q.error
    with pytest.raises(PaymentRejected, match="TransferHook"):
        run(_settle_and_close(gate, encode_header(PaymentPayload(payload={}, accepted=_any_req(circ)))))
    assert ledger_rows(gate) == 0


def _any_req(circ):
    from dllm.pay.x402 import PaymentRequirements
    return PaymentRequirements(scheme=SCHEME_EXACT, network="solana:x", asset=str(circ.hook), amount="1",
                               pay_to=str(circ.treasury.pubkey()), max_timeout_seconds=60)


def test_missing_treasury_account_refused(circ, make_gate):
    gate = make_gate(treasury=str(Keypair().pubkey()))  # nobody created its ATA
    with pytest.raises(X402ConfigError, match="treasury token account .* does not exist"):
        run(gate.start())
