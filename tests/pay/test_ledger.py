"""Ledger alone (pure Python + sqlite3): single use by UNIQUE constraints, fee rows, races across connections."""
from __future__ import annotations

import multiprocessing as mp
import threading

import pytest

from dllm.pay.ledger import Acceptance, Ledger
from dllm.pay.x402 import PaymentRejected


def acc(sig="s1", nonce="n1", rid="r1", amount=200_000) -> Acceptance:
    return Acceptance(signature=sig, nonce=nonce, scheme="exact", payer="P", mint="M", amount=amount,
                      resource="/v1/chat/completions", request_id=rid)


def test_accept_records_payment_and_fee_row(tmp_path):
    led = Ledger(tmp_path / "l.sqlite", clock=lambda: 123.0)
    row = led.accept(acc())
    assert (row.request_id, row.payer, row.amount, row.time) == ("r1", "P", 200_000, 123.0)
    assert led.fees() == [row] and led.fees(since_id=row.id) == [] and led.count() == 1


def test_signature_and_nonce_are_single_use(tmp_path):
    led = Ledger(tmp_path / "l.sqlite")
    led.accept(acc())
    with pytest.raises(PaymentRejected, match="transaction s1 was already used"):
        led.accept(acc(nonce="n2", rid="r2"))
    with pytest.raises(PaymentRejected, match="nonce was already used"):
        led.accept(acc(sig="s2", rid="r2"))
    assert led.count() == 1 and len(led.fees()) == 1  # the failed accepts left no fee row behind
    assert led.used(signature="s1") and led.used(nonce="n1") and led.used("s9", "n9") is None


def test_in_memory_ledger(tmp_path):
    led = Ledger(":memory:")
    led.accept(acc())
    assert led.used(signature="s1") and led.count() == 1 and len(led.fees()) == 1


def test_kept_across_restarts(tmp_path):
    path = tmp_path / "l.sqlite"
    led = Ledger(path)
    secret = led.secret()
    led.accept(acc())
    led.close()
    again = Ledger(path)
    assert again.secret() == secret, "nonces issued before a restart must still verify"
    with pytest.raises(PaymentRejected):
        again.accept(acc(rid="r2"))


def test_rejects_out_of_range_amounts(tmp_path):
    led = Ledger(tmp_path / "l.sqlite")
    for bad in (0, -1, 1 << 63):
        with pytest.raises(ValueError):
            led.accept(acc(amount=bad))


def test_threads_on_separate_connections_race_one_winner(tmp_path):
    """20 connections (as 20 workers would hold) accept the same payment at once: exactly one wins."""
    path = tmp_path / "l.sqlite"
    ledgers = [Ledger(path) for _ in range(20)]
    barrier, wins, losses = threading.Barrier(20), [], []

    def go(i):
        barrier.wait()
        try:
            ledgers[i].accept(acc(rid=f"r{i}"))
            wins.append(i)
        except PaymentRejected:
            losses.append(i)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(losses) == 19 and Ledger(path).count() == 1


def _proc_accept(path, i, q):
    try:
        Ledger(path).accept(acc(rid=f"p{i}"))
        q.put("win")
    except PaymentRejected:
        q.put("lose")


def test_processes_race_one_winner(tmp_path):
    path = str(tmp_path / "l.sqlite")
    Ledger(path).close()  # create the schema once
    ctx = mp.get_context("spawn")  # the session also runs server threads: no fork
    q = ctx.Queue()
    procs = [ctx.Process(target=_proc_accept, args=(path, i, q)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    results = sorted(q.get(timeout=5) for _ in procs)
    assert results == ["lose", "lose", "lose", "win"]
