"""Runtime benchmark on CPU: dllm vs HF transformers eager, and the memory-bandwidth roofline.

Same prompt, dtype, thread count and greedy decoding for both; the machine's read bandwidth is
measured in the same run (the best of a reduction and a one-row sgemv over 1 GiB,
bench.common.read_bandwidth_probes) so the roofline (weight bytes read per token / bandwidth) is known.
Run: ``dllm bench --model smollm2 --model qwen-coder-1.5b`` or ``python -m bench.runtime_cpu``.
"""
from __future__ import annotations

import gc
import time
from pathlib import Path

import torch

from bench.common import median, read_bandwidth_probes, write_result

PROMPT_FILE = Path(__file__).parent / "data" / "runtime_prompt.txt"


def prompt_ids(tok, n: int) -> list[int]:
    ids = tok.encode(PROMPT_FILE.read_text())
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def weight_bytes_per_token(stage) -> int:
    """Bytes of weights one decode step reads: parameters and buffers (packed or quantized
    matmul weights are buffers: codes and scales count), not the rotary table, and not the
    embedding when the head is its own matrix (the lookup reads one row; a copy of a tied
    embedding made for the head counts as the head)."""
    separate_head = stage.embed_tokens is not None and stage.lm_head is not None
    total = 0
    for name, t in list(stage.named_parameters()) + list(stage.named_buffers()):
        if name.startswith("rotary.") or (separate_head and name.startswith("embed_tokens.")):
            continue
        total += t.numel() * t.element_size()
    return total


def time_dllm(engine, ids, new_tokens, repeats=3):
    from dllm.sampling import SamplingParams

    engine.generate_all(ids[:16], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    prefill, decode = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        stamps = []
        for _tok in engine.generate(ids, SamplingParams(max_tokens=new_tokens, ignore_eos=True)):
            stamps.append(time.perf_counter())
        prefill.append(len(ids) / (stamps[0] - t0))
        decode.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return median(prefill), median(decode)


def time_hf(model_dir, ids, new_tokens, dtype, repeats=3):
    import transformers
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.t = []

        def put(self, value):
            self.t.append(time.perf_counter())

        def end(self):
            pass

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=dtype, attn_implementation="eager").eval()
    model.generation_config.eos_token_id = None
    x = torch.tensor([ids])
    kw = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    model.generate(x[:, :16], **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
    prefill, decode = [], []
    for _ in range(repeats):
        s = Stamps()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(x, streamer=s, **kw)
        first, last = s.t[1], s.t[-1]  # put #0 is the prompt itself
        prefill.append(len(ids) / (first - t0))
        decode.append((len(s.t) - 2) / (last - first))
    del model
    gc.collect()
    return median(prefill), median(decode)


def bench_model(name, prompt_tokens, new_tokens, dtype, hf, bandwidth):
    """One model's row. ``dllm_*``: the engine in the "single" CPU layout, what a one-shot
    ``dllm run --prompt`` without a drafter runs (one sequence, MKL sgemv on fp32
    weights); ``dllm_batched_*``: the "batched" layout that serving, batching and speculation run
    (oneDNN packed weights, a row the same bits alone or batched). Both decode the same tokens
    (tests/test_cpu_layout.py). Other dtypes have one layout and report it once."""
    from dllm.fetch import model_path as resolve_model
    from dllm.launch import local_engine
    from dllm.model.stage import parse_dtype
    from dllm.tokenizer import Tokenizer

    model_dir = resolve_model(name)
    ids = prompt_ids(Tokenizer.from_dir(model_dir), prompt_tokens)
    layouts = ["single", "batched"] if parse_dtype(dtype) == torch.float32 else ["batched"]
    row = {"dtype": dtype, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens}
    for layout in layouts:
        engine = local_engine(model_dir, dtype=dtype, kv_tokens=prompt_tokens + new_tokens + 64, cpu_layout=layout)
        wbytes = weight_bytes_per_token(engine.model)
        d_pre, d_dec = time_dllm(engine, ids, new_tokens)
        del engine
        gc.collect()
        key = "dllm" if layout == layouts[0] else f"dllm_{layout}"
        row.update({f"{key}_tok_s": round(d_dec, 2), f"{key}_prefill_tok_s": round(d_pre, 1)})
    row.update(weight_bytes_per_token=wbytes, roofline_tok_s=round(bandwidth * 1e9 / wbytes, 2))
    row["roofline_fraction"] = round(row["dllm_tok_s"] / row["roofline_tok_s"], 3)
    if "dllm_batched_tok_s" in row:
        row["batched_roofline_fraction"] = round(row["dllm_batched_tok_s"] / row["roofline_tok_s"], 3)
    if hf:
        h_pre, h_dec = time_hf(model_dir, ids, new_tokens, parse_dtype(dtype))
        row.update(hf_tok_s=round(h_dec, 2), hf_prefill_tok_s=round(h_pre, 1), speedup=round(row["dllm_tok_s"] / h_dec, 2),
                   hf_roofline_fraction=round(h_dec / row["roofline_tok_s"], 3))
        if "dllm_batched_tok_s" in row:
            row["batched_speedup"] = round(row["dllm_batched_tok_s"] / h_dec, 2)
    return row


def run_bench(models, prompt_tokens=128, new_tokens=64, dtype="float32", threads=2, hf=True,
              out="bench/results/runtime-cpu.json"):
    torch.set_num_threads(threads)
    probes = read_bandwidth_probes()
    bandwidth = max(probes.values())
    rows = {}
    print(f"read bandwidth {bandwidth:.1f} GB/s (" + ", ".join(f"{k} {v:.1f}" for k, v in probes.items())
          + f"), {threads} threads")
    print(f"{'model':18} {'dllm tok/s':>10} {'batched':>8} {'hf tok/s':>9} {'speedup':>8} {'roofline':>9} {'fraction':>9}")
    for name in models:
        key = name if dtype == "float32" else f"{name}-{dtype}"
        rows[key] = r = bench_model(name, prompt_tokens, new_tokens, dtype, hf, bandwidth)
        print(f"{key:18} {r['dllm_tok_s']:>10.2f} {r.get('dllm_batched_tok_s', float('nan')):>8.2f} "
              f"{r.get('hf_tok_s', float('nan')):>9.2f} "
              f"{r.get('speedup', float('nan')):>8.2f} {r['roofline_tok_s']:>9.2f} {r['roofline_fraction']:>9.3f}")
    path = write_result(out, {"benchmark": "runtime-cpu", "threads": threads, "read_bandwidth_gbs": round(bandwidth, 2),
                              "read_bandwidth_probes_gbs": {k: round(v, 2) for k, v in probes.items()},
                              "models": rows})
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    import sys

    run_bench(sys.argv[1:] or ["smollm2"])
