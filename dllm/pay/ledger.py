"""Payment ledger in SQLite: single-use nonces and transaction signatures, and the fee rows payouts read.

Single use is the database's job: `payments.signature` is the PRIMARY KEY and `payments.nonce` is UNIQUE, and
one accepted payment is one INSERT into payments plus one into fees inside a single BEGIN IMMEDIATE
transaction. Two racers (tasks, threads or worker processes sharing the file) cannot both succeed: the loser
gets an IntegrityError, never a stale "not yet used" read. Rows are kept forever, not in a TTL cache.
Pure Python + sqlite3; no torch.
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from contextlib import nullcontext as _nullctx
from dataclasses import dataclass
from pathlib import Path

from dllm.pay.x402 import PaymentRejected

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS payments (
    signature   TEXT PRIMARY KEY,         -- base58 transaction signature: one payment, one request
    nonce       TEXT NOT NULL UNIQUE,     -- quote nonce carried in the Memo: one quote, one payment
    scheme      TEXT NOT NULL,
    payer       TEXT NOT NULL,
    mint        TEXT NOT NULL,
    amount      INTEGER NOT NULL,         -- net atomic units the treasury received
    resource    TEXT NOT NULL,
    accepted_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS fees (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id  TEXT NOT NULL,            -- set by the server, never by the client
    signature   TEXT NOT NULL UNIQUE REFERENCES payments(signature),
    payer       TEXT NOT NULL,
    mint        TEXT NOT NULL,
    amount      INTEGER NOT NULL,
    time        REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Acceptance:
    """One verified, settled payment about to be recorded."""
    signature: str
    nonce: str
    scheme: str
    payer: str
    mint: str
    amount: int
    resource: str
    request_id: str


@dataclass(frozen=True)
class FeeRow:
    id: int
    request_id: str
    signature: str
    payer: str
    mint: str
    amount: int
    time: float


class Ledger:
    """One SQLite file shared by every worker of a node. Methods are blocking and thread-safe."""

    def __init__(self, path: str | Path, clock=time.time):
        self.path, self.clock = str(path), clock
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN ourselves so the accept transaction is exactly what we write.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            # A payment acknowledged is a payment on disk: fsync every commit (4-8 ms on this CI disk, the
            # bulk of settle() latency; NORMAL would forget the last payments on power loss and let them replay).
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
        # Reads get their own connection: under WAL they never wait for a writer's fsync, so the early
        # used() check called on the event loop does not stall it behind another request's commit.
        self._rdb = self._db if self.path == ":memory:" else \
            sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        self._rlock = self._lock if self._rdb is self._db else threading.Lock()

    def close(self) -> None:
        with self._lock, (self._rlock if self._rlock is not self._lock else _nullctx()):
            self._db.close()
            self._rdb.close()

    def secret(self) -> bytes:
        """The node's nonce HMAC key, created once and shared by all workers on this file."""
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('nonce_secret', ?)", (os.urandom(32),))
            return bytes(self._db.execute("SELECT value FROM meta WHERE key='nonce_secret'").fetchone()[0])

    def used(self, signature: str | None = None, nonce: str | None = None) -> str | None:
        """Why this signature or nonce can no longer pay, or None. A fast early answer only: accept() decides."""
        with self._rlock:
            if signature and self._rdb.execute("SELECT 1 FROM payments WHERE signature=?", (signature,)).fetchone():
                return f"transaction {signature} was already used to pay"
            if nonce and self._rdb.execute("SELECT 1 FROM payments WHERE nonce=?", (nonce,)).fetchone():
                return "quote nonce was already used by another payment"
        return None

    def accept(self, a: Acceptance) -> FeeRow:
        """Record a payment and its fee row atomically; PaymentRejected if the signature or nonce was used."""
        if not 0 < a.amount < 1 << 63:
            raise ValueError(f"amount {a.amount} outside SQLite INTEGER range")
        now = self.clock()
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute(
                    "INSERT INTO payments(signature, nonce, scheme, payer, mint, amount, resource, accepted_at)"
                    " VALUES (?,?,?,?,?,?,?,?)",
                    (a.signature, a.nonce, a.scheme, a.payer, a.mint, a.amount, a.resource, now))
                cur = self._db.execute(
                    "INSERT INTO fees(request_id, signature, payer, mint, amount, time) VALUES (?,?,?,?,?,?)",
                    (a.request_id, a.signature, a.payer, a.mint, a.amount, now))
                self._db.execute("COMMIT")
            except sqlite3.IntegrityError as e:
                self._db.execute("ROLLBACK")
                raise PaymentRejected(_conflict(str(e), a), "payment_reused") from None
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        return FeeRow(cur.lastrowid, a.request_id, a.signature, a.payer, a.mint, a.amount, now)

    def fees(self, since_id: int = 0) -> list[FeeRow]:
        """Fee rows after ``since_id``, oldest first: what the treasury payout reads."""
        with self._rlock:
            rows = self._rdb.execute("SELECT id, request_id, signature, payer, mint, amount, time FROM fees"
                                    " WHERE id > ? ORDER BY id", (since_id,)).fetchall()
        return [FeeRow(*r) for r in rows]

    def count(self) -> int:
        """Accepted payments so far."""
        with self._rlock:
            return self._rdb.execute("SELECT COUNT(*) FROM payments").fetchone()[0]


def _conflict(msg: str, a: Acceptance) -> str:
    """Turn SQLite's constraint name into the reason a client can act on."""
    if "payments.signature" in msg:
        return f"transaction {a.signature} was already used to pay"
    if "payments.nonce" in msg:
        return "quote nonce was already used by another payment"
    return f"payment conflicts with the ledger: {msg}"
