"""Solana primitives for payments: program ids, keypair files, the few instructions a payment uses,
mint parsing, transfer-fee math.

Byte layouts follow spl-token-2022 (program/src/instruction.rs, extension/*). No RPC here (only
load_keypair reads a file), so verify.py and the client share one encoding and tests can check it alone.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from solders.instruction import AccountMeta, Instruction
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.token.associated import get_associated_token_address

TOKEN_2022 = Pubkey.from_string("TokenzQdBNbLqP5VEhdkAS6EPFLC1PHnBqCXEpPxuEb")
TOKEN_LEGACY = Pubkey.from_string("TokenkegQfeZyiNwAJbNbGKPFXCWuBvf9Ss623VQ5DA")
ATA_PROGRAM = Pubkey.from_string("ATokenGPvbdGVxr1b2hvZbsiqW5xWH25efTNsLJA8knL")
MEMO_PROGRAM = Pubkey.from_string("MemoSq4gqABAXKb96qnH8TysNcWxMyWCqXgDLGmfcHr")
MEMO_V1_PROGRAM = Pubkey.from_string("Memo1UhkJRfHyvLMcVucJwxXeuD728EqVDDwQDxFMNo")
COMPUTE_BUDGET = Pubkey.from_string("ComputeBudget111111111111111111111111111111")
SYSTEM_PROGRAM = Pubkey.from_string("11111111111111111111111111111111")

# Instruction discriminators (first data byte) of the token program and the compute-budget program.
IX_TRANSFER = 3
IX_TRANSFER_CHECKED = 12
IX_TRANSFER_FEE_EXT = 26  # second byte 1 = TransferCheckedWithFee
CB_SET_LIMIT = 2
CB_SET_PRICE = 3

# Account layouts: a base Mint is 82 bytes, a base token Account 165; with extensions both pad to 165,
# then one AccountType byte (1 mint, 2 account), then TLV entries [u16 type, u16 len, value].
MINT_BASE_LEN = 82
ACCOUNT_BASE_LEN = 165
EXT_TRANSFER_FEE_CONFIG = 1
EXT_NON_TRANSFERABLE = 9
EXT_TRANSFER_HOOK = 14
EXT_NAMES = {1: "TransferFeeConfig", 3: "MintCloseAuthority", 4: "ConfidentialTransferMint",
             6: "DefaultAccountState", 9: "NonTransferable", 10: "InterestBearingConfig",
             12: "PermanentDelegate", 14: "TransferHook", 16: "ConfidentialTransferFeeConfig",
             18: "MetadataPointer", 19: "TokenMetadata", 20: "GroupPointer", 21: "TokenGroup",
             22: "GroupMemberPointer", 23: "TokenGroupMember"}


def load_keypair(path: str | Path) -> Keypair:
    """A Solana CLI keypair file: a JSON array of 64 bytes. ValueError names the file on any failure."""
    try:
        return Keypair.from_bytes(bytes(json.loads(Path(path).expanduser().read_text())))
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"keypair {path}: {e}") from None


def ata(owner: Pubkey, mint: Pubkey, program: Pubkey = TOKEN_2022) -> Pubkey:
    """The associated token account of (owner, mint) under ``program``."""
    return get_associated_token_address(owner, mint, program)


@dataclass(frozen=True)
class TransferFee:
    """One epoch-tagged fee setting of the TransferFeeConfig extension."""
    epoch: int
    maximum_fee: int
    basis_points: int

    def fee(self, amount: int) -> int:
        """Withheld from ``amount``: ceil(amount * bps / 10_000), capped at maximum_fee (spl calculate_fee)."""
        if self.basis_points == 0 or amount == 0:
            return 0
        return min(-(-amount * self.basis_points // 10_000), self.maximum_fee)


@dataclass(frozen=True)
class MintInfo:
    """What a payment needs to know about the mint: decimals, owning program and the extensions in play."""
    decimals: int
    program: Pubkey
    extensions: tuple[int, ...] = ()
    fees: tuple[TransferFee, ...] = ()  # (older, newer) when TransferFeeConfig is present
    hook_program: Pubkey | None = None

    @property
    def has_transfer_hook(self) -> bool:
        return EXT_TRANSFER_HOOK in self.extensions

    def max_fee(self, amount: int) -> int:
        """The larger of the older and newer fee: right on either side of the epoch switch, no epoch lookup."""
        return max((f.fee(amount) for f in self.fees), default=0)

    def gross_for_net(self, net: int) -> int:
        """Smallest transfer amount whose amount - fee still reaches ``net``.

        amount - fee(amount) never decreases as amount grows (the fee rises by at most 1 per unit, or is capped),
        and amount = net + maximum_fee always suffices, so a binary search over [net, net + max] is exact."""
        lo, hi = net, net + max((f.maximum_fee for f in self.fees), default=0)
        while lo < hi:
            mid = (lo + hi) // 2
            if mid - self.max_fee(mid) >= net:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def refusal(self) -> str | None:
        """Why payments in this mint cannot be accepted, or None."""
        if self.has_transfer_hook:
            hook = self.hook_program or "none yet, but its authority can set one"
            return f"mint has the TransferHook extension (hook program {hook}); transfer-hook mints are refused"
        if EXT_NON_TRANSFERABLE in self.extensions:
            return "mint is NonTransferable"
        return None


def _tlv(data: bytes):
    """Yield (type, value) of the extension TLV area of a Token-2022 account."""
    off = ACCOUNT_BASE_LEN + 1
    while off + 4 <= len(data):
        etype, elen = struct.unpack_from("<HH", data, off)
        if etype == 0:  # Uninitialized padding ends the list
            return
        yield etype, data[off + 4:off + 4 + elen]
        off += 4 + elen


def parse_mint(data: bytes, owner: Pubkey) -> MintInfo:
    """Parse a mint account's data (base layout + Token-2022 extensions). Raises ValueError if not a mint."""
    if owner not in (TOKEN_2022, TOKEN_LEGACY):
        raise ValueError(f"account is owned by {owner}, not a token program")
    if len(data) < MINT_BASE_LEN or data[45] != 1:  # is_initialized
        raise ValueError(f"not an initialized mint ({len(data)} bytes)")
    if len(data) > MINT_BASE_LEN and (len(data) <= ACCOUNT_BASE_LEN or data[ACCOUNT_BASE_LEN] != 1):
        raise ValueError("account data is not a mint (AccountType byte)")
    exts, fees, hook = [], (), None
    for etype, value in _tlv(data) if len(data) > ACCOUNT_BASE_LEN else ():
        exts.append(etype)
        if etype == EXT_TRANSFER_FEE_CONFIG:
            # [config authority 32][withdraw authority 32][withheld u64][older: epoch u64, max u64, bps u16][newer]
            fees = tuple(TransferFee(*struct.unpack_from("<QQH", value, 72 + 18 * i)) for i in range(2))
        elif etype == EXT_TRANSFER_HOOK:
            prog = Pubkey.from_bytes(value[32:64])  # [authority 32][program_id 32], zero = None
            hook = None if prog == Pubkey.default() else prog
    return MintInfo(decimals=data[44], program=owner, extensions=tuple(exts), fees=fees, hook_program=hook)


def token_account_amount(data: bytes) -> tuple[Pubkey, Pubkey, int]:
    """(mint, owner, amount) of a token account's data."""
    if len(data) < ACCOUNT_BASE_LEN:
        raise ValueError(f"token account data is {len(data)} bytes, expected >= {ACCOUNT_BASE_LEN}")
    return Pubkey.from_bytes(data[0:32]), Pubkey.from_bytes(data[32:64]), struct.unpack_from("<Q", data, 64)[0]


def transfer_checked(source: Pubkey, mint: Pubkey, dest: Pubkey, owner: Pubkey, amount: int, decimals: int,
                     program: Pubkey = TOKEN_2022) -> Instruction:
    """TransferChecked: data [12, amount u64, decimals u8]; accounts [source w, mint, dest w, owner s]."""
    return Instruction(program, struct.pack("<BQB", IX_TRANSFER_CHECKED, amount, decimals),
                       [AccountMeta(source, False, True), AccountMeta(mint, False, False),
                        AccountMeta(dest, False, True), AccountMeta(owner, True, False)])


def memo(text: str) -> Instruction:
    """SPL Memo v2 with no signer accounts: the memo is the UTF-8 data."""
    return Instruction(MEMO_PROGRAM, text.encode(), [])


def compute_limit(units: int) -> Instruction:
    return Instruction(COMPUTE_BUDGET, struct.pack("<BI", CB_SET_LIMIT, units), [])


def compute_price(micro_lamports: int) -> Instruction:
    return Instruction(COMPUTE_BUDGET, struct.pack("<BQ", CB_SET_PRICE, micro_lamports), [])


def create_ata_idempotent(funder: Pubkey, owner: Pubkey, mint: Pubkey, program: Pubkey = TOKEN_2022) -> Instruction:
    """Associated Token Account program, CreateIdempotent (data [1])."""
    return Instruction(ATA_PROGRAM, bytes([1]), [
        AccountMeta(funder, True, True), AccountMeta(ata(owner, mint, program), False, True),
        AccountMeta(owner, False, False), AccountMeta(mint, False, False),
        AccountMeta(SYSTEM_PROGRAM, False, False), AccountMeta(program, False, False)])
