"""Quality of the weight-only quantized CPU models (int8, int4) against fp32, and what they read.

For each model and mode (fp32 / int8 / int4, dllm/model/cpu_quant.py through
``local_engine(..., quant=)``):

- perplexity of the whole of bench/data/perplexity_sample.txt (the Apache License 2.0, ~2.2k
  tokens; one prefill, dllm.eval.token_nll), the target's measure, and of its first 512 and
  1024 tokens from the same pass (``ppl_slices``: the licence's preamble, which the models all
  but recite, is the hardest part for a quantized copy);
- greedy agreement with fp32 of the first 64 greedy tokens (EOS ignored) for each chat-templated
  prompt of bench/data/spec_prompts.json, every prompt decoded alone (plain greedy, no batching):
  share of positions with the same token and the prefix before the first difference
  (dllm.eval.greedy_agreement); the share is positional, so after a first difference the
  shifted rest mostly counts as different;
- weight bytes read per decode step: every parameter and buffer of the model (quantized codes,
  scales and zeros included) but the rotary table, and not the embedding when the head is a
  separate matrix (a lookup reads one row of it);
- the GGUF source's quantization types, by share of parameters (a 4-bit copy of a 5/6/8-bit
  source loses what a 4-bit copy of a 4-bit source does not);
- ``int4_ppl_by_kind``: the perplexity increase with one matmul kind (qkv, o, gate_up, down,
  head) alone in int4 and the rest fp32, and their sum (close to the whole when the losses
  add up): what keeping one kind in int8 would buy.

Run: ``python -m bench.quant_quality [model ...]`` -> bench/results/quant-quality.json.
"""
from __future__ import annotations

import collections
import gc
import json
import math
import time
from pathlib import Path

import torch

from bench.common import write_result
from bench.runtime_cpu import weight_bytes_per_token

DATA = Path(__file__).parent / "data"
MODELS = ["smollm2", "qwen-coder-0.5b", "qwen-coder-1.5b"]
MODES = ["fp32", "int8", "int4"]
SLICES = (512, 1024)  # prefixes of the sample also reported
GREEDY_TOKENS = 64
TARGETS = {"int8": 0.03, "int4": 0.08}  # relative perplexity increase over fp32
SECONDS_NOTE = ("wall seconds of each step as this run went, on a machine it may share: a record, not a speed "
                "benchmark (bench/runtime_cpu.py and bench/cpu_fast_path.py measure speed)")


def source_types(name: str) -> dict:
    """Share of the GGUF's parameters stored in each quantization type."""
    from dllm.fetch import ensure_gguf
    from dllm.weights.gguf_import import GGUFSource

    src = GGUFSource(ensure_gguf(name))
    count = collections.Counter()
    for t in src.tensor_names():
        count[src.quant_type(t)] += math.prod(src.shape(t))
    total = sum(count.values())
    return {k: round(v / total, 3) for k, v in count.most_common()}


def bench_model(name: str, prompts: list[list[dict]]) -> dict:
    from dllm.eval import greedy_agreement, perplexity_of, token_nll
    from dllm.fetch import ensure_gguf, model_path
    from dllm.launch import local_engine
    from dllm.sampling import SamplingParams
    from dllm.tokenizer import Tokenizer

    model_dir = model_path(name)
    tok = Tokenizer.from_dir(model_dir)
    ids = tok.encode((DATA / "perplexity_sample.txt").read_text())
    chats = [tok.encode_chat(p) for p in prompts]
    out = {"gguf": ensure_gguf(name).name, "gguf_source_types": source_types(name), "ppl_tokens": len(ids),
           "modes": {}}
    greedy_ref = None
    for mode in MODES:
        t0 = time.perf_counter()
        engine = local_engine(model_dir, quant=None if mode == "fp32" else mode,
                              kv_tokens=max(len(ids), max(map(len, chats)) + GREEDY_TOKENS) + 64)
        t1 = time.perf_counter()
        stage = engine.model
        row = {"weight_bytes_per_token": weight_bytes_per_token(stage)}
        nll = token_nll(stage, ids)
        row["ppl"] = round(perplexity_of(nll), 4)
        row["ppl_slices"] = {str(n): round(perplexity_of(nll, n), 4) for n in SLICES}
        t2 = time.perf_counter()
        greedy = [engine.generate_all(c, SamplingParams(max_tokens=GREEDY_TOKENS, ignore_eos=True)) for c in chats]
        t3 = time.perf_counter()
        if mode == "fp32":
            greedy_ref = greedy
        else:
            ref = out["modes"]["fp32"]
            row["ppl_vs_fp32"] = round(row["ppl"] / ref["ppl"] - 1, 4)
            row["ppl_slices_vs_fp32"] = {n: round(v / ref["ppl_slices"][n] - 1, 4) for n, v in row["ppl_slices"].items()}
            row["target"] = TARGETS[mode]
            row["target_met"] = row["ppl_vs_fp32"] < TARGETS[mode]
            agree = [greedy_agreement(r, g) for r, g in zip(greedy_ref, greedy)]
            row["greedy"] = agree
            row["greedy_share_mean"] = round(sum(a["share"] for a in agree) / len(agree), 3)
            row["greedy_prefix_mean"] = round(sum(a["prefix"] for a in agree) / len(agree), 1)
        row["seconds"] = {"load": round(t1 - t0, 1), "perplexity": round(t2 - t1, 1), "greedy": round(t3 - t2, 1)}
        out["modes"][mode] = row
        print(f"  {name} {mode}: ppl {row['ppl']:.3f}  ({row['seconds']})", flush=True)
        del engine, stage
        gc.collect()
    fp32 = out["modes"]["fp32"]["weight_bytes_per_token"]
    for mode in MODES:
        out["modes"][mode]["bytes_vs_fp32"] = round(out["modes"][mode]["weight_bytes_per_token"] / fp32, 3)
    out["int4_ppl_by_kind"] = int4_by_kind(model_dir, ids, out["modes"]["fp32"]["ppl"])
    return out


def int4_by_kind(model_dir, ids: list[int], fp32_ppl: float) -> dict:
    """Relative perplexity increase with one matmul kind alone in int4 (the rest fp32, the
    activation-weighted search as the int4 mode runs it): where the int4 loss comes from, and so
    what keeping a kind in int8 buys (the int4 mode keeps q|k|v in int8)."""
    from dllm.eval import perplexity
    from dllm.model.calibrate import load_importance
    from dllm.model.stage import MATMUL_KINDS, StageModel

    out, importance = {}, load_importance(model_dir)
    for kind in MATMUL_KINDS:  # each kind in int4 as the recipe quantizes it, q|k|v included
        stage = StageModel.from_pretrained(model_dir, dtype=torch.float32).quantize(
            "int4", kinds=(kind,), importance=importance, int8_kinds=())
        out[kind] = round(perplexity(stage, ids) / fp32_ppl - 1, 4)
        del stage
        gc.collect()
    out["sum"] = round(sum(out.values()), 4)
    print(f"  int4 one kind at a time: {out}", flush=True)
    return out


def print_table(rows: dict) -> None:
    print(f"\n{'model':16} {'mode':5} {'ppl':>8} {'vs fp32':>8} {'target':>7} {'greedy share':>12} "
          f"{'prefix':>7} {'MB/token':>9} {'x fp32':>7}")
    for name, r in rows.items():
        for mode, m in r["modes"].items():
            vs = f"{100 * m['ppl_vs_fp32']:+.1f}%" if "ppl_vs_fp32" in m else ""
            slices = " ".join(f"{n}: {100 * v:+.1f}%" for n, v in m.get("ppl_slices_vs_fp32", {}).items())
            target = ("met" if m["target_met"] else "MISSED") if "target_met" in m else ""
            share = f"{m['greedy_share_mean']:.3f}" if "greedy_share_mean" in m else ""
            prefix = f"{m['greedy_prefix_mean']:.1f}" if "greedy_prefix_mean" in m else ""
            print(f"{name:16} {mode:5} {m['ppl']:>8.3f} {vs:>8} {target:>7} {share:>12} {prefix:>7} "
                  f"{m['weight_bytes_per_token'] / 1e6:>9.1f} {m['bytes_vs_fp32']:>7.3f}  {slices}")
        print(f"{'':16} source: {r['gguf']} {r['gguf_source_types']}")
        print(f"{'':16} int4 ppl, one kind alone: "
              + " ".join(f"{k} {100 * v:+.1f}%" for k, v in r["int4_ppl_by_kind"].items()))


def run_bench(models=MODELS, threads: int = 2, out: str = "bench/results/quant-quality.json") -> dict:
    torch.set_num_threads(threads)
    prompts = [p["messages"] for p in json.loads((DATA / "spec_prompts.json").read_text())]
    rows = {}
    t0 = time.perf_counter()
    for name in models:
        rows[name] = bench_model(name, prompts)
    print_table(rows)
    path = write_result(out, {
        "benchmark": "quant-quality", "threads": threads, "ppl_tokens": "all (per model: models.*.ppl_tokens)",
        "ppl_slices": list(SLICES), "ppl_text": "bench/data/perplexity_sample.txt", "greedy_tokens": GREEDY_TOKENS,
        "greedy_prompts": "bench/data/spec_prompts.json (chat template, each prompt alone, EOS ignored)",
        "targets": {k: f"ppl within {int(v * 100)}% of fp32" for k, v in TARGETS.items()},
        "seconds": round(time.perf_counter() - t0, 1), "seconds_note": SECONDS_NOTE, "models": rows})
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    import sys

    run_bench(sys.argv[1:] or MODELS)
