"""Pure pieces: x402 v2 wire formats, header caps, quote nonces, pricing and Token-2022 fee math."""
from __future__ import annotations

import base64
import json
import struct

import pytest
from solders.keypair import Keypair
from solders.pubkey import Pubkey

from dllm.pay import token as tk
from dllm.pay.gate import X402Config, X402ConfigError, load_config, price_atomic
from dllm.pay.x402 import (NonceBook, PaymentPayload, PaymentRejected, PaymentRequired, PaymentRequirements,
                           SettleResponse, decode_header, encode_header, payer_message)

REQ = PaymentRequirements(scheme="exact", network="solana:EtWTRABZaYq6iMfeYKouRu166VU2xqa1", asset="A" * 43,
                          amount="200000", pay_to="B" * 43, max_timeout_seconds=300, extra={"memo": "n"})


def test_wire_format_is_camel_case_x402_v2():
    pr = PaymentRequired(accepts=[REQ], resource={"url": "/v1/chat/completions"})
    wire = json.loads(base64.b64decode(encode_header(pr)))
    assert wire["x402Version"] == 2 and "error" not in wire
    assert set(wire["accepts"][0]) == {"scheme", "network", "asset", "amount", "payTo", "maxTimeoutSeconds", "extra"}
    assert decode_header(encode_header(pr), PaymentRequired) == pr
    s = SettleResponse(success=True, transaction="sig", network=REQ.network, payer="p", amount="1")
    assert json.loads(base64.b64decode(encode_header(s)))["transaction"] == "sig"


def test_reference_x402_package_accepts_our_headers():
    """If the `x402` reference package is installed, its own models parse what we emit."""
    x402 = pytest.importorskip("x402.schemas")
    pr = PaymentRequired(accepts=[REQ], resource={"url": "/r"}, error="e")
    theirs = x402.PaymentRequired.model_validate_json(base64.b64decode(encode_header(pr)))
    assert theirs.accepts[0].pay_to == REQ.pay_to and theirs.x402_version == 2
    p = PaymentPayload(payload={"transaction": "AA=="}, accepted=REQ)
    assert x402.PaymentPayload.model_validate_json(base64.b64decode(encode_header(p))).accepted.amount == "200000"
    # and the other way: their header helpers produce what we decode
    from x402.http.utils import decode_payment_required_header, encode_payment_signature_header

    assert decode_payment_required_header(encode_header(pr)).accepts[0].amount == "200000"
    their_payload = x402.PaymentPayload(payload={"transaction": "AA=="}, accepted=theirs.accepts[0])
    ours = decode_header(encode_payment_signature_header(their_payload), PaymentPayload)
    assert ours.accepted == REQ and ours.payload == {"transaction": "AA=="}


@pytest.mark.parametrize("value,match", [
    (None, "empty"), ("  ", "empty"), ("%%%", "not base64"), ("A" * 8193, "8193 chars, limit 8192"),
    (base64.b64encode(b'{"x402Version": 2}').decode(), "payload"),
    (base64.b64encode(b'"str"').decode(), "not an object"),
])
def test_decode_header_rejects(value, match):
    with pytest.raises(PaymentRejected, match=match):
        decode_header(value, PaymentPayload)


def test_nonce_binds_quote_and_expires():
    now = [1000.0]
    book = NonceBook(b"k" * 32, ttl_s=60, clock=lambda: now[0])
    quote = {"resource": "/a", "amount": "5"}
    nonce, expires = book.issue(quote)
    assert len(nonce) == 54 and expires == 1060 and book.check(nonce, quote) == 1060
    assert book.issue(quote)[0] != nonce  # fresh each call
    for other in ({"resource": "/b", "amount": "5"}, {"resource": "/a", "amount": "4"}):
        with pytest.raises(PaymentRejected, match="not issued for this quote"):
            book.check(nonce, other)
    with pytest.raises(PaymentRejected, match="not issued"):
        NonceBook(b"x" * 32, 60, clock=lambda: now[0]).check(nonce, quote)  # another node's key
    tampered = nonce[:30] + ("A" if nonce[30] != "A" else "B") + nonce[31:]
    with pytest.raises(PaymentRejected):
        book.check(tampered, quote)
    now[0] = 1061
    with pytest.raises(PaymentRejected, match="expired 1s ago"):
        book.check(nonce, quote)
    for bad in (None, 5, "short"):
        with pytest.raises(PaymentRejected, match="missing or malformed"):
            book.check(bad, quote)


def test_payer_message_is_canonical():
    a = payer_message("sig", "/r", {"b": 1, "a": [1, 2]})
    assert a == payer_message("sig", "/r", {"a": [1, 2], "b": 1})
    assert a == b'x402-dllm-txsig-v1:{"accepted":{"a":[1,2],"b":1},"resource":"/r","signature":"sig"}'


def test_price_atomic_rounds_up():
    assert price_atomic(0.002, 0.01, 6) == 200_000
    assert price_atomic(0.002, 3.0, 6) == 667  # 666.67 -> never under-charge
    assert price_atomic(1e-12, 1.0, 0) == 1


@pytest.mark.parametrize("bps,max_fee,net", [(100, 10 ** 9, 200_000), (100, 500, 200_000), (0, 0, 7),
                                             (9999, 10 ** 12, 3), (250, 10 ** 6, 1)])
def test_gross_for_net_is_the_smallest_amount(bps, max_fee, net):
    info = tk.MintInfo(6, tk.TOKEN_2022, (1,), (tk.TransferFee(0, max_fee, bps),) * 2)
    gross = info.gross_for_net(net)
    assert gross - info.max_fee(gross) >= net
    assert gross == net or (gross - 1) - info.max_fee(gross - 1) < net


def test_fee_matches_spl_rounding():
    f = tk.TransferFee(epoch=0, maximum_fee=3000, basis_points=100)
    assert [f.fee(a) for a in (0, 1, 99, 100, 101, 202_021, 10 ** 9)] == [0, 1, 1, 1, 2, 2021, 3000]


def _mint_data(exts: bytes = b"", decimals: int = 6) -> bytes:
    base = struct.pack("<I32sQBB", 1, bytes(32), 0, decimals, 1) + bytes(36)
    assert len(base) == 82
    return base if not exts else base + bytes(165 - 82) + b"\x01" + exts


def test_parse_mint_extensions():
    fee = struct.pack("<HH", 1, 108) + bytes(72) + struct.pack("<QQH", 0, 10, 50) + struct.pack("<QQH", 9, 99, 70)
    info = tk.parse_mint(_mint_data(fee), tk.TOKEN_2022)
    assert info.fees == (tk.TransferFee(0, 10, 50), tk.TransferFee(9, 99, 70)) and info.refusal() is None
    assert info.max_fee(10_000) == 70  # newer fee, not yet in force, still counted
    hook = Pubkey.new_unique()
    info = tk.parse_mint(_mint_data(struct.pack("<HH", 14, 64) + bytes(32) + bytes(hook)), tk.TOKEN_2022)
    assert info.hook_program == hook and "TransferHook" in info.refusal()
    assert tk.parse_mint(_mint_data(), tk.TOKEN_LEGACY).extensions == ()
    with pytest.raises(ValueError, match="not a token program"):
        tk.parse_mint(_mint_data(), Pubkey.new_unique())


def test_config_files(tmp_path):
    mint, treasury = str(Keypair().pubkey()), str(Keypair().pubkey())
    (tmp_path / "x.toml").write_text(f'[x402]\nmint = "{mint}"\ntreasury = "{treasury}"\ncirc-usd = 0.5\n'
                                     'rpc_url = "http://127.0.0.1:8899"\nnetwork = "solana:devnet"\n')
    cfg = load_config(tmp_path / "x.toml")
    assert cfg.price_usd == 0.002 and cfg.circ_usd == 0.5 and cfg.mint == mint
    (tmp_path / "x.json").write_text(json.dumps({"mint": mint, "treasury": treasury, "circ_usd": 1, "rpc_url": "u",
                                                 "network": "solana:x", "price_usd": 0.01}))
    assert load_config(tmp_path / "x.json").price_usd == 0.01
    (tmp_path / "bad.json").write_text(json.dumps({"mint": mint, "treasury": treasury, "circ_usd": 1,
                                                   "rpc_url": "u", "network": "solana:x", "prize": 1}))
    with pytest.raises(X402ConfigError, match="unknown x402 keys \\['prize'\\]"):
        load_config(tmp_path / "bad.json")
    with pytest.raises(X402ConfigError, match="not a Solana CAIP-2"):
        X402Config(mint=mint, treasury=treasury, circ_usd=1, rpc_url="u", network="eip155:8453")
    with pytest.raises(X402ConfigError, match="not a base58 address"):
        X402Config(mint="nope", treasury=treasury, circ_usd=1, rpc_url="u", network="solana:x")
