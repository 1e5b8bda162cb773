"""Where a decode step and a 16-node verify spend GPU time (device only).

The 32B shape with random int4 weights, 8 layers (every layer is alike), run eagerly under
torch.profiler: GPU time per kernel name for one step and for one 16-node tree pass, and the
difference, largest first. Prints a table and writes $OUT/gpu_profile.json.

    python -m bench.gpu_profile [--layers 8] [--nodes 16] [--quant int4|bf16]
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.gpu import Decoder, build_random, shape_dict
from dllm.config import ModelConfig


def kernel_us(fn, reps: int = 5) -> dict[str, float]:
    """Mean GPU microseconds per call of fn, per kernel name."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0) > 0:
            out[e.key[:90]] += getattr(e, "self_device_time_total", 0.0) / reps
    return dict(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-32b", help="a bench.gpu shape name")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--quant", default="int4", choices=["int4", "bf16"])
    args = ap.parse_args()
    cfg = ModelConfig.from_hf(shape_dict(args.shape))
    st = build_random(cfg, range(args.layers), True, True, args.quant, "cuda")  # the first layers of the full shape
    d = Decoder(st, 32, eager=True)
    step = kernel_us(d.step)
    verify = kernel_us(d.verifier(args.nodes))
    rows = sorted(((verify.get(k, 0) - step.get(k, 0), step.get(k, 0), verify.get(k, 0), k)
                   for k in set(step) | set(verify)), reverse=True)
    print(f"{args.layers} layers {args.quant}: step {sum(step.values()):.0f} us, "
          f"verify{args.nodes} {sum(verify.values()):.0f} us (GPU time, eager)")
    print(f"{'extra':>8} {'step':>8} {'verify':>8}  kernel")
    for extra, s, v, k in rows[:25]:
        print(f"{extra:8.1f} {s:8.1f} {v:8.1f}  {k}")
    out = Path(os.environ.get("OUT", "/tmp")) / "gpu_profile.json"
    out.write_text(json.dumps({"layers": args.layers, "quant": args.quant, "nodes": args.nodes,
                               "gpu": torch.cuda.get_device_name(), "step_us": step, "verify_us": verify}, indent=1))


if __name__ == "__main__":
    main()
