"""CPU fast path benchmark: dllm with weight-only quantized matmuls vs llama.cpp on the same GGUF.

Per model (SmolLM2-135M, Qwen2.5-Coder-0.5B, Qwen2.5-Coder-1.5B): greedy decode tok/s after a
128-token prompt at 2 threads, dllm (the CPU fast path, int4 and int8, plus fp32 for scale) and
llama.cpp (llama-cpp-python on the GGUF the dllm model was converted from, same prompt ids)
interleaved in the same run, each the best of N repeats (best-of, not median: on a shared 2-core
machine another process's burst only ever slows a run down, and every runner gets the same
chances). The 1-minute load average before the run is recorded. llama.cpp is the outside baseline;
the target is dllm >= 0.6x llama.cpp on every model.

llama-cpp-python builds from source here (about 10 minutes on 2 cores). Build it once into the
dllm cache and install the cached wheel afterwards:

    python -m bench.cpu_fast_path --build-llamacpp    # pip wheel -> ~/.cache/dllm/wheels, then install
    python -m bench.cpu_fast_path [--models smollm2,qwen-coder-0.5b] [--new-tokens 64]

Without it the llama.cpp columns are null and the benchmark says so. The result records
llama.cpp's own system info (the SIMD paths its build uses; the CPU's model name is in "machine"). On an
Intel Xeon with AMX, llama.cpp 0.3.36's native build (AVX-512 + AMX) segfaulted in its first
decode; an AVX2 build runs there (slower than a working native build would be, which flatters
the ratio):

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF" \
        python -m bench.cpu_fast_path --build-llamacpp
"""
from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import median, write_result
from bench.runtime_cpu import prompt_ids

MODELS = ("smollm2", "qwen-coder-0.5b", "qwen-coder-1.5b")
LLAMACPP_VERSION = "0.3.36"
WHEELS = Path.home() / ".cache" / "dllm" / "wheels"
TARGET = 0.6


def llamacpp():
    """The llama_cpp module, or None with the reason printed."""
    try:
        import llama_cpp

        return llama_cpp
    except ImportError as e:
        wheels = sorted(WHEELS.glob("llama_cpp_python-*.whl"))
        hint = (f"pip install --no-deps {wheels[-1]} diskcache" if wheels
                else "python -m bench.cpu_fast_path --build-llamacpp")
        print(f"llama.cpp baseline MISSING ({e}); install it with: {hint}", file=sys.stderr)
        return None


def build_llamacpp() -> None:
    WHEELS.mkdir(parents=True, exist_ok=True)
    if not list(WHEELS.glob(f"llama_cpp_python-{LLAMACPP_VERSION}-*.whl")):
        subprocess.run([sys.executable, "-m", "pip", "wheel", f"llama-cpp-python=={LLAMACPP_VERSION}", "--no-deps",
                        "-w", str(WHEELS)], check=True, env={**__import__("os").environ, "CMAKE_BUILD_PARALLEL_LEVEL": "2"})
    wheel = sorted(WHEELS.glob(f"llama_cpp_python-{LLAMACPP_VERSION}-*.whl"))[-1]
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", str(wheel), "diskcache"], check=True)


class LlamaCppRunner:
    def __init__(self, module, gguf: Path, threads: int, n_ctx: int):
        self.llm = module.Llama(str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def last_logits(self):
        """The last evaluated position's logits, read from the context (llama-cpp-python 0.3 no
        longer copies them into Llama.scores unless logits_all is set, which would copy every row)."""
        import numpy as np

        return np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.n_vocab,))

    def decode(self, ids: list[int], new_tokens: int) -> tuple[float, list[int]]:
        """Greedy: (decode tok/s after the prompt, tokens)."""
        llm = self.llm
        llm.reset()
        llm.eval(ids)
        out, stamps = [], []
        for _ in range(new_tokens):
            tok = int(self.last_logits().argmax())
            out.append(tok)
            stamps.append(time.perf_counter())
            llm.eval([tok])
        return (len(stamps) - 1) / (stamps[-1] - stamps[0]), out


class DllmRunner:
    def __init__(self, model_dir: Path, quant: str | None, n_ctx: int):
        from dllm.launch import local_engine

        self.engine = local_engine(model_dir, dtype="float32", quant=quant, kv_tokens=n_ctx)

    def decode(self, ids: list[int], new_tokens: int) -> tuple[float, list[int]]:
        from dllm.sampling import SamplingParams

        out, stamps = [], []
        for tok in self.engine.generate(ids, SamplingParams(max_tokens=new_tokens, ignore_eos=True)):
            out.append(tok)
            stamps.append(time.perf_counter())
        return (len(stamps) - 1) / (stamps[-1] - stamps[0]), out


def bench_model(name: str, lcpp, prompt_tokens: int, new_tokens: int, threads: int, repeats: int,
                modes=("int4", "int8", "fp32")) -> dict:
    from dllm.fetch import ensure_gguf, model_path
    from dllm.tokenizer import Tokenizer

    model_dir = model_path(name)
    ids = prompt_ids(Tokenizer.from_dir(model_dir), prompt_tokens)
    n_ctx = prompt_tokens + new_tokens + 64
    runners = {m: DllmRunner(model_dir, None if m == "fp32" else m, n_ctx) for m in modes}
    if lcpp is not None:
        runners["llamacpp"] = LlamaCppRunner(lcpp, ensure_gguf(name), threads, n_ctx)
    for r in runners.values():  # warm-up
        r.decode(ids[:16], 4)
    speeds = {k: [] for k in runners}
    tokens = {}
    for _ in range(repeats):  # interleaved, so a noisy moment hits every runner alike
        for k, r in runners.items():
            tps, tokens[k] = r.decode(ids, new_tokens)
            speeds[k].append(tps)
    row = {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens}
    for k in runners:
        row[f"{'dllm_' + k if k != 'llamacpp' else 'llamacpp'}_tok_s"] = round(max(speeds[k]), 2)
        row[f"{'dllm_' + k if k != 'llamacpp' else 'llamacpp'}_median_tok_s"] = round(median(speeds[k]), 2)
    row["dllm_tok_s"] = row[f"dllm_{modes[0]}_tok_s"]
    row["dllm_mode"] = modes[0]
    row["llamacpp_tok_s"] = row.get("llamacpp_tok_s")
    if row["llamacpp_tok_s"]:
        row["ratio"] = round(row["dllm_tok_s"] / row["llamacpp_tok_s"], 3)
        for m in modes:
            row[f"ratio_{m}"] = round(row[f"dllm_{m}_tok_s"] / row["llamacpp_tok_s"], 3)
        # llama.cpp's greedy tokens come from its own (block-quantized) weights: agreement is a sanity
        # check of the shared tokenizer ids and model, not an exactness claim
        row["same_first_tokens_as_llamacpp"] = next((i for i, (a, b) in enumerate(zip(tokens[modes[0]], tokens["llamacpp"]))
                                                     if a != b), new_tokens)
    del runners
    gc.collect()
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--out", default="bench/results/cpu-fast-path.json")
    ap.add_argument("--build-llamacpp", action="store_true", help="build and cache the llama-cpp-python wheel, then exit")
    args = ap.parse_args(argv)
    if args.build_llamacpp:
        build_llamacpp()
        return
    torch.set_num_threads(args.threads)
    load_before = round(__import__("os").getloadavg()[0], 2)
    lcpp = llamacpp()
    rows = {}
    print(f"{'model':18} {'int4':>7} {'int8':>7} {'fp32':>7} {'llama.cpp':>9} {'ratio':>6}")
    for name in args.models.split(","):
        rows[name] = r = bench_model(name, lcpp, args.prompt_tokens, args.new_tokens, args.threads, args.repeats)
        print(f"{name:18} {r['dllm_int4_tok_s']:>7.1f} {r['dllm_int8_tok_s']:>7.1f} {r['dllm_fp32_tok_s']:>7.1f} "
              f"{r['llamacpp_tok_s'] or float('nan'):>9.1f} {r.get('ratio', float('nan')):>6.2f}")
    payload = {"benchmark": "cpu-fast-path", "threads": args.threads, "target_ratio": TARGET,
               "repeats": args.repeats, "statistic": "best of repeats (medians alongside)",
               "load_1min_before": load_before,
               "llamacpp": getattr(lcpp, "__version__", None),
               "llamacpp_system_info": lcpp.llama_print_system_info().decode().strip() if lcpp else None,
               "models": rows}
    if lcpp is None:
        payload["llamacpp_missing"] = "llama-cpp-python not installed: python -m bench.cpu_fast_path --build-llamacpp"
    print(f"wrote {write_result(args.out, payload)}")


if __name__ == "__main__":
    main()
