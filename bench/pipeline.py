"""Pipeline benchmark: what the split costs per token, against the single process, per emulated RTT.

For RTT 0, 20 and 50 ms: greedy decode tok/s of SmolLM2 in one process (baseline) and as a
2-stage chain (coordinator with embedding, head and layers 0:15 + one `dllm stage` process with
15:30) over the encrypted loopback link, each hop delayed by RTT/2. Also runs the hop
micro-benchmark (bench/pipeline_hop.py) for ``hop_overhead_ms_hidden5120``.
Target: hop ≤ 0.5 ms; chain time per token ≤ single + RTT + 1 ms.

    python -m bench.pipeline [--model smollm2] [--new-tokens 64]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from bench.common import RESULTS, median, write_result
from bench.runtime_cpu import prompt_ids
from dllm.config import ModelConfig
from dllm.fetch import model_path
from dllm.launch import chain_engine, local_engine
from dllm.net.local_cluster import LocalCluster
from dllm.sampling import SamplingParams
from dllm.tokenizer import Tokenizer


def one_rate(engine, ids, new_tokens) -> float:
    stamps = [time.perf_counter() for _ in engine.generate(ids, SamplingParams(max_tokens=new_tokens, ignore_eos=True))]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def interleaved_tok_s(single, chain, ids, new_tokens, repeats=5) -> tuple[float, float]:
    """Median decode tok/s of both engines, runs alternating so drift hits both alike."""
    for e in (single, chain):
        e.generate_all(ids[:8], SamplingParams(max_tokens=4, ignore_eos=True))
    a, b = [], []
    for _ in range(repeats):
        a.append(one_rate(single, ids, new_tokens))
        b.append(one_rate(chain, ids, new_tokens))
    return median(a), median(b)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--rtts", default="0,20,50")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (coordinator and stage)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    hop = subprocess.run([sys.executable, "-m", "bench.pipeline_hop", "--rounds", "1000"], capture_output=True, text=True)
    hop_ms = json.loads((RESULTS / "pipeline-hop-cpu.json").read_text())["hop_overhead_ms_hidden5120"] \
        if hop.returncode == 0 else None
    model_dir = model_path(args.model)
    ids = prompt_ids(Tokenizer.from_dir(model_dir), args.prompt_tokens)
    single_engine = local_engine(model_dir, kv_tokens=1024)
    n = ModelConfig.from_dir(model_dir).num_layers
    cut = n // 2
    rows = {}
    for rtt in [float(r) for r in args.rtts.split(",")]:
        with LocalCluster(model_dir, [(cut, n)], emulate_rtt_ms=rtt, threads=args.threads, kv_tokens=1024) as c:
            eng = chain_engine(model_dir, [str(a) for a in c.addresses], (0, cut), emulate_rtt_ms=rtt, kv_tokens=1024)
            try:
                single, chain = interleaved_tok_s(single_engine, eng, ids, args.new_tokens)
            finally:
                eng.pipeline.close()
        over = 1000 / chain - 1000 / single - rtt
        rows[f"rtt_{int(rtt)}ms"] = {"rtt_ms": rtt, "single_tok_s": round(single, 2), "chain_tok_s": round(chain, 2),
                                     "chain_ms_per_token": round(1000 / chain, 2),
                                     "single_ms_per_token": round(1000 / single, 2),
                                     "overhead_ms_beyond_rtt": round(over, 2), "meets_target": over <= 1.0}
        print(f"rtt {rtt:>4.0f} ms: single {single:6.2f} tok/s  chain {chain:6.2f} tok/s  "
              f"overhead beyond RTT {over:+.2f} ms/token")
    path = write_result(RESULTS / "pipeline-cpu.json", {
        "benchmark": "pipeline-cpu", "model": args.model, "split": [[0, cut], [cut, n]], "threads_per_process": args.threads,
        "hop_overhead_ms_hidden5120": hop_ms, "hop_target_ms": 0.5, "per_rtt": rows,
        "target": "chain ms/token <= single ms/token + RTT + 1 ms"})
    print(f"hop_overhead_ms_hidden5120 = {hop_ms}  -> {path}")


if __name__ == "__main__":
    main()
