"""x402 payment benchmark on CPU, against a real SVM (LiteSVM) behind a loopback JSON-RPC node.

1. Verification latency: X402Gate.settle() on pre-built payments, one at a time, per scheme, with the bare
   RPC round trip (getTransaction / getSignatureStatuses) and a bare ledger accept timed in the same run as
   the baseline: settle p50 / RPC p50 is the price of verification itself.
2. Paid requests/s sustained: openai-shaped POSTs over loopback HTTP through X402AsyncTransport, each one
   402 -> pay -> retry -> 200, `concurrency` clients at once; and settle()-only throughput on pre-built
   payments (the server's ceiling, client work excluded).
The RPC node, the API and the clients share this machine's cores.
Run: ``python -m bench.x402 [--n 200] [--concurrency 8] [--seconds 8]`` -> bench/results/x402-cpu.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import httpx
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from solders.keypair import Keypair

from bench.common import RESULTS, write_result
from dllm.pay.client import Payer, X402AsyncTransport
from dllm.pay.gate import X402Config, X402Gate
from dllm.pay.ledger import Acceptance, Ledger
from dllm.pay.x402 import HEADER_SIGNATURE, SCHEME_EXACT, SCHEME_TXSIG, PaymentRejected
from tests.pay.litesvm_rpc import LiteSVMRpc

RESOURCE = "/v1/chat/completions"


def request_with(header: str) -> web.Request:
    """A real aiohttp Request carrying the payment, as the API hands it to settle()."""
    return make_mocked_request("POST", RESOURCE, headers={HEADER_SIGNATURE: header})


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return round(s[min(len(s) - 1, int(q * len(s)))] * 1e3, 3)


def summary(xs: list[float]) -> dict:
    return {"n": len(xs), "p50_ms": pct(xs, 0.5), "p90_ms": pct(xs, 0.9), "p99_ms": pct(xs, 0.99)}


class Setup:
    """A node with CIRC (1 % transfer fee, the harder case), a treasury ATA and a fee payer key on disk."""

    def __init__(self, tmp: Path):
        self.node = LiteSVMRpc()
        self.node.start()
        self.auth, self.treasury, self.fee_payer = Keypair(), Keypair(), Keypair()
        self.node.airdrop(self.fee_payer.pubkey(), 10 ** 12)
        self.mint = self.node.create_mint(self.auth, 6, fee_bps=100, max_fee=10 ** 9)
        self.node.create_ata(self.treasury.pubkey(), self.mint)
        self.tmp = tmp
        (tmp / "fp.json").write_text(json.dumps(list(bytes(self.fee_payer))))

    def gate(self, db: str, ledger: Ledger | None = None) -> X402Gate:
        return X402Gate(ledger=ledger, config=X402Config(mint=str(self.mint), treasury=str(self.treasury.pubkey()), circ_usd=0.01,
                                   rpc_url=self.node.url, network="solana:litesvm-local", db_path=str(self.tmp / db),
                                   fee_payer_keypair_path=str(self.tmp / "fp.json"), lookup_attempts=1))

    def payer(self) -> Keypair:
        kp = Keypair()
        self.node.airdrop(kp.pubkey(), 10 ** 11)
        self.node.mint_to(self.mint, self.auth, kp.pubkey(), 10 ** 12)
        return kp


async def prebuilt(s: Setup, gate: X402Gate, scheme: str, n: int) -> list[str]:
    """n PAYMENT-SIGNATURE headers, each for a fresh quote (txsig ones already landed)."""
    from dllm.pay.x402 import HEADER_REQUIRED, PaymentRequired, decode_header

    payer = Payer(s.payer(), s.node.url, prefer=scheme)
    out = []
    for _ in range(n):
        q = decode_header(gate.payment_required(RESOURCE).headers[HEADER_REQUIRED], PaymentRequired, 65536)
        out.append(await payer.pay(q))
    await payer.close()
    return out


async def settle_times(gate: X402Gate, headers: list[str]) -> list[float]:
    for h in headers[:10]:  # warm-up: sessions, caches
        await gate.settle(request_with(h), RESOURCE)
    times = []
    for h in headers[10:]:
        t = time.perf_counter()
        await gate.settle(request_with(h), RESOURCE)
        times.append(time.perf_counter() - t)
    return times


async def bench_latency(s: Setup, scheme: str, n: int) -> dict:
    mem = s.gate("unused.sqlite", ledger=Ledger(":memory:"))  # same checks, no fsync: verification alone
    await mem.start()
    mem_times = await settle_times(mem, await prebuilt(s, mem, scheme, n + 10))
    await mem.close()
    gate = s.gate(f"lat-{scheme}.sqlite")
    await gate.start()
    times = await settle_times(gate, await prebuilt(s, gate, scheme, n + 10))
    sig = gate.ledger.fees()[-1].signature
    rpc_times = []
    for _ in range(n):  # the baseline: the one RPC read each path cannot avoid
        t = time.perf_counter()
        if scheme == SCHEME_TXSIG:
            await gate.rpc.get_transaction(sig)
        else:
            await gate.rpc.get_signature_statuses([sig])
        rpc_times.append(time.perf_counter() - t)
    await gate.close()
    settle, rpc = summary(times), summary(rpc_times)
    return {"settle": settle, "settle_memory_ledger": summary(mem_times), "rpc_baseline": rpc, "baseline_method": "getTransaction" if scheme == SCHEME_TXSIG
            else "getSignatureStatuses", "ratio_p50": round(settle["p50_ms"] / rpc["p50_ms"], 2)}


def bench_ledger(tmp: Path, n: int) -> dict:
    led = Ledger(tmp / "ledger-only.sqlite")
    times = []
    for i in range(n):
        t = time.perf_counter()
        led.accept(Acceptance(f"s{i}", f"n{i}", "exact", "P", "M", 1, RESOURCE, f"r{i}"))
        times.append(time.perf_counter() - t)
    return summary(times)


async def bench_settle_throughput(s: Setup, scheme: str, n: int, concurrency: int) -> dict:
    gate = s.gate(f"tp-{scheme}.sqlite")
    await gate.start()
    headers = await prebuilt(s, gate, scheme, n)
    queue = list(headers)

    async def worker():
        while queue:
            await gate.settle(request_with(queue.pop()), RESOURCE)
    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    dt = time.perf_counter() - t
    assert gate.ledger.count() == n
    await gate.close()
    return {"n": n, "concurrency": concurrency, "seconds": round(dt, 3), "settles_per_s": round(n / dt, 1)}


async def bench_http(s: Setup, scheme: str, seconds: float, concurrency: int) -> dict:
    """Full paid requests over loopback HTTP: 402, pay, retry, 200."""
    gate = s.gate(f"http-{scheme}.sqlite")
    await gate.start()

    async def chat(request: web.Request) -> web.Response:
        try:
            headers = await gate.settle(request, RESOURCE)
        except PaymentRejected as e:
            return gate.payment_required(RESOURCE, error=str(e))
        if headers is None:
            return gate.payment_required(RESOURCE)
        await request.read()
        return web.json_response({"object": "chat.completion", "choices": []}, headers=headers)

    app = web.Application()
    app.router.add_post(RESOURCE, chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}{RESOURCE}"
    ok, lat, stop = 0, [], time.perf_counter() + seconds

    async def client():
        nonlocal ok
        transport = X402AsyncTransport(Payer(s.payer(), s.node.url, prefer=scheme))
        async with httpx.AsyncClient(transport=transport) as c:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                r = await c.post(url, json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 200, r.text
                ok += 1
                lat.append(time.perf_counter() - t)
    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    dt = time.perf_counter() - t0
    assert gate.ledger.count() == ok
    await runner.cleanup()
    await gate.close()
    return {"concurrency": concurrency, "seconds": round(dt, 2), "paid_requests": ok,
            "paid_requests_per_s": round(ok / dt, 1), "request": summary(lat)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--out", default=str(RESULTS / "x402-cpu.json"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        s = Setup(Path(d))
        res = {"bench": "x402", "mint": "Token-2022 with 1% transfer fee", "schemes": {}}
        for scheme in (SCHEME_EXACT, SCHEME_TXSIG):
            res["schemes"][scheme] = {
                "verify_latency": asyncio.run(bench_latency(s, scheme, a.n)),
                "settle_throughput": asyncio.run(bench_settle_throughput(s, scheme, a.n, a.concurrency)),
                "paid_http": asyncio.run(bench_http(s, scheme, a.seconds, a.concurrency)),
            }
            print(scheme, json.dumps(res["schemes"][scheme]))
        res["ledger_accept"] = bench_ledger(Path(d), a.n)
        res["rpc_calls"] = dict(s.node.calls)
        s.node.stop()
    res["definition"] = ("verify_latency.settle: X402Gate.settle() wall time on a pre-built payment (exact: layout "
                         "check, co-sign, sendTransaction with preflight, confirmation poll, ledger accept; txsig: "
                         "payer-signature check, getTransaction, balance check, ledger accept); settle_memory_ledger: "
                         "the same on an in-memory ledger (no fsync; the difference is the durable commit); "
                         "rpc_baseline: one bare RPC read on the same node; ledger_accept: one durable commit "
                         "(WAL, synchronous=FULL); paid_http: loopback POSTs, each 402 -> pay -> 200")
    print("wrote", write_result(a.out, res))


if __name__ == "__main__":
    main()
