"""The two ways a payment is verified, each ending in a Settled (signature, payer, net amount received).

exact  (stock x402 clients): the client sends a transaction it signed as token authority, with our fee payer
       in the fee slot. We check its layout instruction by instruction, co-sign as fee payer, submit with
       preflight and wait for confirmation, all before inference runs.
txsig  (pay, then attach): the client already landed its own TransferChecked with the quote nonce in a Memo and
       sends the signature plus its ed25519 signature over (signature, resource, accepted). We read the
       transaction at confirmed commitment and take the net amount from pre/post token balances, which is what
       the treasury really received once a transfer-fee extension withheld its part.
Every refusal is a PaymentRejected whose message says what was wrong, with the numbers.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import struct
from dataclasses import dataclass

from solders.keypair import Keypair
from solders.message import Message, MessageV0, to_bytes_versioned
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.transaction import SanitizeError, VersionedTransaction

from dllm.pay import token as tk
from dllm.pay.solana_rpc import RpcError, RpcTimeout, SolanaRpc
from dllm.pay.x402 import PaymentRejected, payer_message


@dataclass(frozen=True)
class Terms:
    """What this node accepts: set once from config and the mint account."""
    network: str
    mint: Pubkey
    mint_info: tk.MintInfo
    treasury: Pubkey
    treasury_ata: Pubkey
    fee_payer: Keypair | None  # None: the exact scheme is not offered
    max_compute_units: int = 200_000
    max_priority_lamports: int = 5_000


@dataclass(frozen=True)
class Quote:
    """A checked `accepted` entry: the nonce to find in the Memo and the least the treasury must net."""
    nonce: str
    amount: int  # gross transfer amount quoted
    min_net: int  # price in atomic units, after any transfer fee
    resource: str


@dataclass(frozen=True)
class Settled:
    signature: str
    payer: str
    net: int


def _reject(msg: str, reason: str) -> PaymentRejected:
    return PaymentRejected(msg, reason)


def _check_net(net: int, gross: int, quote: Quote, fee_known: bool) -> None:
    """Underpaid, or paid enough gross but the transfer fee took it under the price."""
    if net >= quote.min_net:
        return
    if gross >= quote.min_net and fee_known:
        raise _reject(f"transfer fee withholds {gross - net} of {gross}: the treasury nets {net} < price "
                      f"{quote.min_net}; send {quote.amount}", "amount_insufficient_after_fee")
    raise _reject(f"underpaid: treasury nets {net} < price {quote.min_net} (atomic units)", "amount_insufficient")


# ---------------------------------------------------------------- exact: partially signed transaction

def decode_tx(b64: object) -> VersionedTransaction:
    if not isinstance(b64, str) or not b64:
        raise _reject("exact payload needs `transaction` (base64)", "invalid_exact_svm_payload")
    try:
        tx = VersionedTransaction.from_bytes(base64.b64decode(b64, validate=True))
        tx.sanitize()  # account indexes in range, header consistent: later lookups cannot go out of bounds
    except (binascii.Error, ValueError, SanitizeError) as e:
        raise _reject(f"transaction could not be decoded: {e}", "invalid_exact_svm_payload_transaction") from None
    if not isinstance(tx.message, (Message, MessageV0)):
        raise _reject("only legacy and v0 transactions are accepted", "invalid_exact_svm_payload_transaction")
    return tx


def _check_fee_payer_slot(tx: VersionedTransaction, terms: Terms) -> list:
    """The fee payer is account 0 and appears in no instruction; no lookup tables hide accounts. Returns keys."""
    msg = tx.message
    if terms.fee_payer is None:
        raise _reject("this server has no fee payer; the exact scheme is not offered", "unsupported_scheme")
    if isinstance(msg, MessageV0) and msg.address_table_lookups:
        raise _reject("address lookup tables are not accepted in an exact payment", "invalid_exact_svm_payload")
    keys = list(msg.account_keys)
    if not keys or keys[0] != terms.fee_payer.pubkey():
        raise _reject(f"fee payer must be {terms.fee_payer.pubkey()} (extra.feePayer), got {keys[:1]}",
                      "invalid_exact_svm_payload_missing_fee_payer")
    for i, ix in enumerate(msg.instructions):
        if ix.program_id_index == 0 or 0 in bytes(ix.accounts):
            raise _reject(f"instruction {i} uses the fee payer's key {keys[0]}; refused",
                          "invalid_exact_svm_payload_transaction_fee_payer_transferring_funds")
    return keys


def _check_compute(ixs, keys, terms: Terms) -> None:
    """Instructions 0 and 1 are SetComputeUnitLimit and SetComputeUnitPrice, with a bounded priority fee."""
    datas = []
    for i, disc, size in ((0, tk.CB_SET_LIMIT, 5), (1, tk.CB_SET_PRICE, 9)):
        data = bytes(ixs[i].data)
        if keys[ixs[i].program_id_index] != tk.COMPUTE_BUDGET or len(data) != size or data[0] != disc:
            which = "SetComputeUnitLimit" if i == 0 else "SetComputeUnitPrice"
            raise _reject(f"instruction {i} must be ComputeBudget {which}", "invalid_exact_svm_payload")
        datas.append(data)
    units = struct.unpack_from("<I", datas[0], 1)[0]
    micro = struct.unpack_from("<Q", datas[1], 1)[0]
    if units > terms.max_compute_units:
        raise _reject(f"compute unit limit {units} > {terms.max_compute_units}", "invalid_exact_svm_payload")
    if units * micro > terms.max_priority_lamports * 1_000_000:
        raise _reject(f"priority fee {units * micro / 1e6:.0f} lamports > {terms.max_priority_lamports} that the "
                      "fee payer covers", "invalid_exact_svm_payload_compute_price_too_high")


def _check_memo(ixs, keys, nonce: str) -> None:
    """Exactly one Memo, and it carries the quote nonce."""
    memos = [bytes(ix.data) for ix in ixs if keys[ix.program_id_index] in (tk.MEMO_PROGRAM, tk.MEMO_V1_PROGRAM)]
    if len(memos) != 1:
        raise _reject(f"expected exactly one Memo with the quote nonce, found {len(memos)}", "memo_count")
    if memos[0] != nonce.encode():
        raise _reject(f"memo {memos[0][:80]!r} is not the quote nonce (nonce from another quote?)", "memo_mismatch")


def _transfer_checked(ix, keys, terms: Terms) -> tuple[Pubkey, Pubkey, int, int]:
    """(authority, source, amount, decimals) of a TransferChecked of our mint into the treasury account."""
    data, acc = bytes(ix.data), bytes(ix.accounts)
    program = keys[ix.program_id_index]
    if program not in (tk.TOKEN_2022, tk.TOKEN_LEGACY) or len(data) != 10 or data[0] != tk.IX_TRANSFER_CHECKED \
            or len(acc) != 4:
        raise _reject("instruction 2 must be a token TransferChecked with 4 accounts",
                      "invalid_exact_svm_payload_no_transfer_instruction")
    source, mint, dest, authority = (keys[i] for i in acc)
    amount, decimals = struct.unpack_from("<QB", data, 1)
    if mint != terms.mint:
        raise _reject(f"wrong mint: transfer is of {mint}, this node is paid in {terms.mint}", "mint_mismatch")
    if program != terms.mint_info.program:
        raise _reject(f"transfer uses token program {program}, the mint is owned by {terms.mint_info.program}",
                      "invalid_exact_svm_payload")
    if dest != terms.treasury_ata:
        raise _reject(f"wrong destination: transfer goes to {dest}, not the treasury's token account "
                      f"{terms.treasury_ata}", "recipient_mismatch")
    if source == dest:
        raise _reject("transfer source is the treasury account", "invalid_exact_svm_payload")
    return authority, source, amount, decimals


def _check_client_signatures(tx: VersionedTransaction, keys) -> None:
    """Every signature but the fee payer's (slot 0, ours to fill) is present and valid."""
    msg_bytes = to_bytes_versioned(tx.message)
    n = tx.message.header.num_required_signatures
    sigs = tx.signatures
    if len(sigs) != n or n < 2:
        raise _reject(f"transaction has {len(sigs)} signatures for {n} required signers; need fee payer + payer",
                      "invalid_exact_svm_payload")
    for i in range(1, n):
        if not sigs[i].verify(keys[i], msg_bytes):
            raise _reject(f"signature {i} ({keys[i]}) is missing or invalid", "invalid_exact_svm_payload_signature")


def check_exact(tx: VersionedTransaction, terms: Terms, quote: Quote) -> tuple[str, int]:
    """Pure layout check of an exact payment: (payer, net amount the treasury will receive)."""
    keys = _check_fee_payer_slot(tx, terms)
    ixs = tx.message.instructions
    if len(ixs) != 4:
        raise _reject(f"exact payment has {len(ixs)} instructions; expected ComputeLimit, ComputePrice, "
                      "TransferChecked, Memo", "invalid_exact_svm_payload_transaction_instructions_length")
    _check_compute(ixs, keys, terms)
    authority, _, amount, decimals = _transfer_checked(ixs[2], keys, terms)
    if decimals != terms.mint_info.decimals:
        raise _reject(f"TransferChecked decimals {decimals} != mint decimals {terms.mint_info.decimals}",
                      "invalid_exact_svm_payload")
    _check_memo(ixs[3:], keys, quote.nonce)
    if authority not in keys[1:tx.message.header.num_required_signatures]:
        raise _reject(f"transfer authority {authority} does not sign the transaction", "invalid_exact_svm_payload")
    _check_client_signatures(tx, keys)
    net = amount - terms.mint_info.max_fee(amount)
    _check_net(net, amount, quote, bool(terms.mint_info.fees))
    return str(authority), net


def cosign(tx: VersionedTransaction, fee_payer: Keypair) -> VersionedTransaction:
    """Fill slot 0 with the fee payer's signature. ed25519 is deterministic: same message, same tx signature."""
    sig = fee_payer.sign_message(to_bytes_versioned(tx.message))
    return VersionedTransaction.populate(tx.message, [sig, *tx.signatures[1:]])


async def submit_exact(tx: VersionedTransaction, rpc: SolanaRpc, timeout_s: float) -> None:
    """Send with preflight (a failing tx costs nothing and lands nothing) and wait for `confirmed`."""
    sig = str(tx.signatures[0])
    try:
        await rpc.send_transaction(bytes(tx))
    except RpcError as e:
        text = str(e).replace(" ", "").lower()
        if "alreadyprocessed" not in text and "alreadybeenprocessed" not in text:  # a re-send: go confirm it
            raise _reject(f"transaction failed: {e}", "transaction_failed") from None
    try:
        await rpc.wait_confirmed(sig, timeout_s)
    except RpcTimeout as e:
        raise _reject(f"{e}; nothing was served, re-send the same payment to retry", "settlement_pending") from None
    except RpcError as e:
        raise _reject(f"transaction failed: {e}", "transaction_failed") from None


# ---------------------------------------------------------------- txsig: landed transfer + payer signature

def check_payer_signature(payload: dict, resource: str, accepted: dict) -> tuple[str, str]:
    """(tx signature, payer) once the payer's ed25519 signature over (signature, resource, accepted) verifies."""
    sig_s, payer_s, psig_s = (payload.get(k) for k in ("signature", "payer", "payerSignature"))
    if not isinstance(sig_s, str) or not isinstance(payer_s, str):
        raise _reject("txsig payload needs `signature` (base58 tx signature) and `payer` (base58 address)",
                      "invalid_payload")
    if not isinstance(psig_s, str) or not psig_s:
        raise _reject("payer signature missing: sign (signature, resource, accepted) with the payer key",
                      "payer_signature_missing")
    try:
        Signature.from_string(sig_s)
        payer, psig = Pubkey.from_string(payer_s), Signature.from_string(psig_s)
    except ValueError as e:
        raise _reject(f"txsig payload field is not base58 of the right length: {e}", "invalid_payload") from None
    if not psig.verify(payer, payer_message(sig_s, resource, accepted)):
        raise _reject(f"payer signature does not verify for {payer_s} over (signature, resource, accepted)",
                      "payer_signature_invalid")
    return sig_s, payer_s


def _account_keys(result: dict, tx: VersionedTransaction) -> list[Pubkey]:
    """Static keys, then the lookup-table keys the node resolved (writable, then readonly)."""
    loaded = (result.get("meta") or {}).get("loadedAddresses") or {}
    extra = [Pubkey.from_string(k) for k in loaded.get("writable", []) + loaded.get("readonly", [])]
    return list(tx.message.account_keys) + extra


def _credits(tx: VersionedTransaction, keys, terms: Terms) -> tuple[list, list]:
    """Top-level token transfers: (TransferChecked as (mint, dest, authority, amount), any transfer into treasury)."""
    checked, into_treasury = [], []
    for ix in tx.message.instructions:
        if keys[ix.program_id_index] not in (tk.TOKEN_2022, tk.TOKEN_LEGACY):
            continue
        data, acc = bytes(ix.data), [keys[i] for i in bytes(ix.accounts)]
        if data[:1] == bytes([tk.IX_TRANSFER]) and len(acc) >= 3:
            into_treasury += [ix] if acc[1] == terms.treasury_ata else []
        elif (data[:1] == bytes([tk.IX_TRANSFER_CHECKED]) or data[:2] == bytes([tk.IX_TRANSFER_FEE_EXT, 1])) \
                and len(acc) >= 4:
            into_treasury += [ix] if acc[2] == terms.treasury_ata else []
            if data[0] == tk.IX_TRANSFER_CHECKED and len(data) == 10:
                checked.append((acc[1], acc[2], acc[3], struct.unpack_from("<Q", data, 1)[0]))
    return checked, into_treasury


def _the_transfer(checked, into_treasury, terms: Terms) -> tuple[Pubkey, int]:
    """(authority, amount) of the one TransferChecked of our mint into the treasury's account."""
    if not checked:
        raise _reject("transaction has no token TransferChecked", "no_transfer_instruction")
    ours = [c for c in checked if c[0] == terms.mint]
    if not ours:
        raise _reject(f"wrong mint: transfers are of {sorted({str(c[0]) for c in checked})}, this node is paid in "
                      f"{terms.mint}", "mint_mismatch")
    to_treasury = [c for c in ours if c[1] == terms.treasury_ata]
    if not to_treasury:
        raise _reject(f"wrong destination: {terms.mint} goes to {ours[0][1]}, not the treasury's token account "
                      f"{terms.treasury_ata}", "recipient_mismatch")
    if len(into_treasury) != 1:
        raise _reject(f"{len(into_treasury)} transfers into the treasury; expected exactly one", "transfer_count")
    return to_treasury[0][2], to_treasury[0][3]


def _net_received(meta: dict, keys, terms: Terms) -> int:
    """post - pre token balance of the treasury account, from the node's own balance records."""
    idx = keys.index(terms.treasury_ata)

    def amount(entries) -> int:
        for b in entries or ():
            if b.get("accountIndex") == idx:
                if b.get("mint") != str(terms.mint):
                    raise _reject(f"treasury balance entry is for mint {b.get('mint')}", "mint_mismatch")
                return int(b["uiTokenAmount"]["amount"])
        raise _reject("transaction meta has no token balance for the treasury account", "invalid_transaction")

    return amount(meta.get("postTokenBalances")) - amount(meta.get("preTokenBalances"))


def check_landed(result: dict, sig: str, payer: str, terms: Terms, quote: Quote) -> int:
    """Pure check of a getTransaction result for the txsig scheme; the net amount the treasury received."""
    meta = result.get("meta") or {}
    if meta.get("err") is not None:
        raise _reject(f"transaction {sig} failed on-chain: {meta['err']}", "transaction_failed")
    try:
        tx = VersionedTransaction.from_bytes(base64.b64decode(result["transaction"][0]))
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise _reject(f"RPC returned an undecodable transaction: {e}", "invalid_transaction") from None
    if str(tx.signatures[0]) != sig:
        raise _reject("RPC returned a different transaction than asked for", "invalid_transaction")
    keys = _account_keys(result, tx)
    authority, amount = _the_transfer(*_credits(tx, keys, terms), terms)
    if str(authority) != payer:
        raise _reject(f"payer {payer} did not authorize this transfer (authority {authority})", "payer_mismatch")
    _check_memo(tx.message.instructions, keys, quote.nonce)
    net = _net_received(meta, keys, terms)
    _check_net(net, amount, quote, True)
    return net


async def fetch_landed(sig: str, rpc: SolanaRpc, attempts: int, delay_s: float) -> dict:
    """getTransaction at confirmed commitment, a few bounded tries (a just-confirmed tx can lag on a node)."""
    for i in range(max(1, attempts)):
        try:
            result = await rpc.get_transaction(sig, "confirmed")
        except RpcError as e:
            raise _reject(f"could not look up transaction {sig}: {e}", "rpc_error") from None
        if result is not None:
            return result
        if i + 1 < attempts:
            await asyncio.sleep(delay_s)
    raise _reject(f"transaction {sig} is not confirmed (not found at confirmed commitment); wait for "
                  "confirmation, then re-send", "transaction_not_confirmed")
