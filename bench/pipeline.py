"""Pipeline benchmark: what the split costs per token, against the single process, per emulated RTT.

For RTT 0, 20 and 50 ms: greedy decode tok/s of SmolLM2 in one process (baseline) and as a
2-stage chain (coordinator with embedding, head and layers 0:15 + one `dllm stage` process with
15:30) over the encrypted loopback link, each hop delayed by RTT/2. Also runs the hop
micro-benchmark (bench/pipeline_hop.py) for ``hop_overhead_ms_hidden5120``.
Target: hop ≤ 0.5 ms; chain time per token ≤ single + RTT + 1 ms.

Runs alternate single, chain, single, …, single (64 tokens each): ``single_tok_s`` and
``chain_tok_s`` are the medians; ``overhead_ms_beyond_rtt`` is the median over chain runs of
(chain ms/token - the mean of the single runs just before and after it - RTT), which cancels the
drift of a shared machine better than the difference of the medians (also given, as
``overhead_ms_beyond_rtt_from_medians``, with every run's ms/token).

``idle_penalty_ms`` separates what the link costs from what waiting costs: the same single
process with an idle pass of RTT ms (``IdleWait``: a Pipeline that only spins, as BusyPoll does,
then hands x back) after its layers, runs alternating with the plain single process; its ms/token
minus the plain one's minus RTT is what the compute loses to the wait alone (on a VM whose host
shares its L3 with other tenants, a 50 ms pause costs ~1 ms of the next pass here, with a spin,
a pure user-space loop or a sleep alike). ``overhead_ms_beyond_rtt_and_idle`` is the chain's
overhead minus that penalty: the link's own cost.

Both processes busy-poll while they wait (dllm.net.loop, DLLM_BUSY_POLL_MS, default 250 ms;
``--busy-poll-ms 0`` measures blocking waits instead). Other processes on the same cores skew
both sides: the result records the 1-minute load average before each RTT's runs and the CPU
that processes other than this benchmark and its stages used while it ran (``other_cpu_cores``,
from /proc/stat minus our own CPU time). A quiet machine reads ~0 there.

    python -m bench.pipeline [--model smollm2] [--new-tokens 64] [--busy-poll-ms 250]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from bench.common import RESULTS, write_result
from bench.runtime_cpu import prompt_ids
from dllm.config import ModelConfig
from dllm.fetch import model_path
from dllm.launch import chain_engine, local_engine
from dllm.net.local_cluster import LocalCluster
from dllm.sampling import SamplingParams
from dllm.tokenizer import Tokenizer


class IdleWait:
    """A Pipeline that stands for the network without one: each pass waits ``wait_s`` (spinning
    with sched_yield, as BusyPoll waits) and returns x unchanged."""

    def __init__(self, wait_s: float):
        self.wait_s = wait_s

    def forward(self, x, chunks):
        end = time.perf_counter() + self.wait_s
        while time.perf_counter() < end:
            os.sched_yield()
        return x

    def free(self, seq_id: int) -> None:
        pass


def one_rate(engine, ids, new_tokens) -> float:
    stamps = [time.perf_counter() for _ in engine.generate(ids, SamplingParams(max_tokens=new_tokens, ignore_eos=True))]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def interleaved_runs(single, chain, ids, new_tokens, repeats=7) -> tuple[list[float], list[float]]:
    """ms/token of decode runs alternating single, chain, single, …, chain, single (one more single
    than chain runs), so every chain run has a single run on either side and drift hits both alike."""
    for e in (single, chain):
        e.generate_all(ids[:8], SamplingParams(max_tokens=4, ignore_eos=True))
    s, c = [1000 / one_rate(single, ids, new_tokens)], []
    for _ in range(repeats):
        c.append(1000 / one_rate(chain, ids, new_tokens))
        s.append(1000 / one_rate(single, ids, new_tokens))
    return s, c


def paired_overhead_ms(single_ms: list[float], chain_ms: list[float]) -> float:
    """Median over chain runs of (chain run - mean of the single runs just before and after it)."""
    return statistics.median(c - (single_ms[i] + single_ms[i + 1]) / 2 for i, c in enumerate(chain_ms))


def cpu_counters() -> tuple[float, float]:
    """(busy, stolen) CPU seconds of every core since boot, from /proc/stat: busy = user + nice +
    system + irq + softirq; stolen = time the hypervisor ran something else while a vCPU wanted to run."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    hz = os.sysconf("SC_CLK_TCK")
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / hz, v[7] / hz


def own_cpu_s() -> float:
    """CPU seconds of this process and its reaped children (the stage processes, once stopped)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class LoadMeter:
    """What other processes did to the machine while a block of runs ran."""

    def __init__(self):
        self.load_before = os.getloadavg()[0]
        self.t, (self.busy, self.steal), self.own = time.monotonic(), cpu_counters(), own_cpu_s()

    def done(self) -> dict:
        wall = time.monotonic() - self.t
        busy, steal = cpu_counters()
        other = (busy - self.busy) - (own_cpu_s() - self.own)
        return {"load_1min_before": round(self.load_before, 2),
                "other_cpu_cores": round(max(0.0, other) / wall, 2),
                "stolen_cpu_cores": round((steal - self.steal) / wall, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--rtts", default="0,20,50")
    ap.add_argument("--repeats", type=int, default=7, help="chain runs per RTT (single runs: one more), alternating")
    ap.add_argument("--note", default="", help="free text stored in the result (e.g. what else ran)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (coordinator and stage)")
    ap.add_argument("--busy-poll-ms", type=float, default=None,
                    help="how long each process polls before it blocks (default: $DLLM_BUSY_POLL_MS or 250)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.busy_poll_ms is not None:
        os.environ["DLLM_BUSY_POLL_MS"] = str(args.busy_poll_ms)  # this process and the stage processes
    from dllm.net.loop import busy_poll_window_s
    busy_poll_ms = busy_poll_window_s() * 1000
    whole = LoadMeter()
    hop = subprocess.run([sys.executable, "-m", "bench.pipeline_hop", "--rounds", "1000"], capture_output=True, text=True)
    hop_ms = json.loads((RESULTS / "pipeline-hop-cpu.json").read_text())["hop_overhead_ms_hidden5120"] \
        if hop.returncode == 0 else None
    model_dir = model_path(args.model)
    ids = prompt_ids(Tokenizer.from_dir(model_dir), args.prompt_tokens)
    single_engine = local_engine(model_dir, kv_tokens=1024)
    idle_engine = local_engine(model_dir, kv_tokens=1024)
    n = ModelConfig.from_dir(model_dir).num_layers
    cut = n // 2
    rows = {}
    for rtt in [float(r) for r in args.rtts.split(",")]:
        meter = LoadMeter()
        with LocalCluster(model_dir, [(cut, n)], emulate_rtt_ms=rtt, threads=args.threads, kv_tokens=1024) as c:
            eng = chain_engine(model_dir, [str(a) for a in c.addresses], (0, cut), emulate_rtt_ms=rtt, kv_tokens=1024)
            try:
                single_ms, chain_ms = interleaved_runs(single_engine, eng, ids, args.new_tokens, args.repeats)
            finally:
                eng.pipeline.close()
        idle_engine.pipeline = IdleWait(rtt / 1000)
        single_ms2, idle_ms = interleaved_runs(single_engine, idle_engine, ids, args.new_tokens, args.repeats)
        idle_penalty = paired_overhead_ms(single_ms2, idle_ms) - rtt
        single, chain = 1000 / statistics.median(single_ms), 1000 / statistics.median(chain_ms)
        over = paired_overhead_ms(single_ms, chain_ms) - rtt
        rows[f"rtt_{int(rtt)}ms"] = {"rtt_ms": rtt, "single_tok_s": round(single, 2), "chain_tok_s": round(chain, 2),
                                     "chain_ms_per_token": round(1000 / chain, 2),
                                     "single_ms_per_token": round(1000 / single, 2),
                                     "overhead_ms_beyond_rtt": round(over, 2), "meets_target": over <= 1.0,
                                     "overhead_ms_beyond_rtt_from_medians": round(1000 / chain - 1000 / single - rtt, 2),
                                     "single_ms_runs": [round(v, 2) for v in single_ms],
                                     "chain_ms_runs": [round(v, 2) for v in chain_ms],
                                     "idle_penalty_ms": round(idle_penalty, 2),
                                     "overhead_ms_beyond_rtt_and_idle": round(over - idle_penalty, 2),
                                     "idle_ms_runs": [round(v, 2) for v in idle_ms],
                                     "single_ms_runs_beside_idle": [round(v, 2) for v in single_ms2],
                                     **meter.done()}
        print(f"rtt {rtt:>4.0f} ms: single {single:6.2f} tok/s  chain {chain:6.2f} tok/s  "
              f"overhead beyond RTT {over:+.2f} ms/token, of which waiting alone {idle_penalty:+.2f}  (load {rows[f'rtt_{int(rtt)}ms']['load_1min_before']}, "
              f"other processes {rows[f'rtt_{int(rtt)}ms']['other_cpu_cores']} cores)")
    load = whole.done()
    quiet = all(r["other_cpu_cores"] < 0.2 for r in rows.values())
    path = write_result(RESULTS / "pipeline-cpu.json", {
        "benchmark": "pipeline-cpu", "model": args.model, "split": [[0, cut], [cut, n]], "threads_per_process": args.threads,
        "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens, "repeats": args.repeats,
        "busy_poll_ms": busy_poll_ms, "hop_overhead_ms_hidden5120": hop_ms, "hop_target_ms": 0.5, "per_rtt": rows,
        "target": "chain ms/token <= single ms/token + RTT + 1 ms", "load": load,
        "note": args.note or ("quiet machine" if quiet else
                              "other processes were busy during the run: see load (other_cpu_cores per RTT)")})
    print(f"hop_overhead_ms_hidden5120 = {hop_ms}  -> {path}")


if __name__ == "__main__":
    main()
