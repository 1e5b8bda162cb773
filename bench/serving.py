"""Serving benchmark: total tokens/s and time to first token at 1, 8 and 32 concurrent streams.

The API server (EngineWorker + aiohttp) runs in this process on 127.0.0.1; N aiohttp clients
stream /v1/chat/completions at once, each asking for exactly ``--tokens`` tokens (ignore_eos,
greedy), with distinct prompts. Total tokens/s = all completion tokens / wall time from the
first request to the last [DONE]; TTFT = request sent -> first content chunk, per stream.

Baseline in the same run: the same N prompts driven straight through ``engine.step()`` on the
worker thread (no HTTP, no detokenization), so ``api_overhead`` shows what serving costs on top
of the engine. Target (issue 6): 8 streams give >= 4x the total tokens/s of one.

Precisions (``--precisions``, each a ``dllm run --dtype`` value, resolved by
launch.resolve_precision and recorded): ``float32`` (dense fp32, oneDNN-packed matmuls whose cost
is nearly flat from 1 to 8 rows) is the one the target is judged on, because its speedup measures
the engine's and the server's batching; ``auto`` (int4 weights on CPU, what `dllm run` serves by
default) is measured alongside: ATen's int4 kernel costs ~3.4x at 8 rows what it costs at one,
which caps that precision's speedup below 4x whatever the engine does. The 1-minute load average
is recorded before and after each precision (the machine is shared; rerun when it was high).

    python -m bench.serving [--tokens 32] [--streams 1,8,32] [--precisions float32,auto] [--threads 2]
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import time

import aiohttp
import torch

from bench.common import RESULTS, write_result

OUT = RESULTS / "serving-cpu.json"
TARGET_SPEEDUP_8 = 4.0
TOPICS = ["the sea", "owls", "trains", "salt", "volcanoes", "jazz", "honey", "clocks", "ice", "paper", "tea",
          "bridges", "wolves", "sand", "kites", "mushrooms"]


def prompt(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Write a short paragraph about {TOPICS[i % len(TOPICS)]} (variant {i})."}]


async def one_stream(session, url: str, model: str, i: int, tokens: int) -> dict:
    body = {"model": model, "messages": prompt(i), "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, usage = None, None
    async with session.post(f"{url}/v1/chat/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
        async for line in r.content:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
            usage = chunk.get("usage") or usage
    return {"ttft": (first or time.perf_counter()) - t0, "tokens": usage["completion_tokens"], "end": time.perf_counter()}


async def api_point(url: str, model: str, n: int, tokens: int) -> dict:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as s:
        t0 = time.perf_counter()
        runs = await asyncio.gather(*(one_stream(s, url, model, i, tokens) for i in range(n)))
    wall = max(r["end"] for r in runs) - t0
    total = sum(r["tokens"] for r in runs)
    return {"streams": n, "total_tokens": total, "wall_s": round(wall, 3), "total_tok_s": round(total / wall, 2),
            "per_stream_tok_s": round(total / wall / n, 2),
            "median_ttft_ms": round(1000 * statistics.median(r["ttft"] for r in runs), 1),
            "max_ttft_ms": round(1000 * max(r["ttft"] for r in runs), 1)}


def engine_point(engine, tokenizer, n: int, tokens: int) -> dict:
    """Baseline: the same batch straight through the engine (runs on the worker thread)."""
    from dllm.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    seqs = [engine.add(tokenizer.encode_chat(prompt(i)), params) for i in range(n)]
    t0 = time.perf_counter()
    while engine.has_work:
        engine.step()
    wall = time.perf_counter() - t0
    total = sum(len(s.output) for s in seqs)
    return {"total_tok_s": round(total / wall, 2), "wall_s": round(wall, 3)}


def median_run(runs: list[dict]) -> dict:
    """The run with the median total tokens/s (shared cores make single runs noisy)."""
    ranked = sorted(runs, key=lambda r: r["total_tok_s"])
    return dict(ranked[len(ranked) // 2], repeats=len(runs),
                total_tok_s_all=[r["total_tok_s"] for r in runs])


def load_1min() -> float:
    return round(os.getloadavg()[0], 2)


async def run_precision(args, model_dir, tok, dtype: str) -> dict:
    """Every concurrency level at one precision: its own engine, worker and server."""
    from dllm.api.server import create_app, serve
    from dllm.api.worker import EngineWorker
    from dllm.launch import local_engine, resolve_precision

    dtype_name, quant = resolve_precision(dtype, None, model_dir=model_dir)
    engine = local_engine(model_dir, stages=args.stages, dtype=dtype, kv_tokens=args.kv_tokens,
                          eos_ids=sorted(tok.eos_token_ids))
    worker = EngineWorker(engine, max_pending=1024)
    app = create_app(worker, tok, args.model, rate_limit=None)
    runner, port = await serve(app, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{port}"
    points, load_before = [], load_1min()
    try:
        await api_point(url, args.model, 2, 4)  # warm-up: first-call allocations, tokenizer caches
        for n in args.streams:
            api = median_run([await api_point(url, args.model, n, args.tokens) for _ in range(args.repeats)])
            base = median_run([await worker.call(lambda e, n=n: engine_point(e, tok, n, args.tokens))
                               for _ in range(args.repeats)])
            api["engine_tok_s"] = base["total_tok_s"]
            api["api_overhead"] = round(base["total_tok_s"] / api["total_tok_s"], 3)
            points.append(api)
            print(json.dumps(dict(api, dtype=dtype)), flush=True)
    finally:
        await runner.cleanup()
        worker.close()
    by_n = {p["streams"]: p for p in points}
    result = {"dtype": dtype, "activations": dtype_name, "weights": quant or dtype_name,
              "load_1min_before": load_before, "load_1min_after": load_1min(), "points": points,
              "median_ttft_ms": {str(n): p["median_ttft_ms"] for n, p in by_n.items()}}
    if 1 in by_n and 8 in by_n:
        result["speedup_8_vs_1"] = round(by_n[8]["total_tok_s"] / by_n[1]["total_tok_s"], 2)
        result["engine_speedup_8_vs_1"] = round(by_n[8]["engine_tok_s"] / by_n[1]["engine_tok_s"], 2)
    return result


async def run(args) -> dict:
    from dllm.fetch import ensure_model
    from dllm.tokenizer import Tokenizer

    model_dir = ensure_model(args.model)
    tok = Tokenizer.from_dir(model_dir)
    runs = []
    for dtype in args.precisions:
        runs.append(await run_precision(args, model_dir, tok, dtype))
        gc.collect()  # the previous engine's weights and KV go before the next one loads
    # the target is judged on the first precision (float32 by default; see the module docstring)
    first = runs[0]
    result = {"model": args.model, "stages": args.stages, "tokens_per_stream": args.tokens, "repeats": args.repeats,
              "target_precision": first["dtype"], **{k: v for k, v in first.items() if k != "dtype"},
              "precisions": {r["dtype"]: r for r in runs[1:]}}
    if "speedup_8_vs_1" in first:
        result.update(target_speedup_8=TARGET_SPEEDUP_8, meets_target=first["speedup_8_vs_1"] >= TARGET_SPEEDUP_8)
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tokens", type=int, default=32, help="completion tokens per stream")
    p.add_argument("--streams", default="1,8,32", help="comma-separated concurrency levels")
    p.add_argument("--stages", type=int, default=1)
    p.add_argument("--precisions", default="float32,auto",
                   help="comma-separated --dtype values (auto: int4 weights on CPU); the target is judged on the first "
                        "(float32: see the module docstring)")
    p.add_argument("--kv-tokens", type=int, default=8192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="runs per point; the median one is reported")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    args.streams = [int(s) for s in args.streams.split(",")]
    args.precisions = args.precisions.split(",")
    torch.set_num_threads(args.threads)
    result = asyncio.run(run(args))
    path = write_result(args.out, result)
    speedup = result.get("speedup_8_vs_1")
    print(f"wrote {path}" + (f": {result['target_precision']} 8 vs 1 stream speedup {speedup}x (target "
                             f"{TARGET_SPEEDUP_8}x)" if speedup else ""))


if __name__ == "__main__":
    main()
