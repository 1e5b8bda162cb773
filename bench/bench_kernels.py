"""Time every dllm Triton kernel against its torch reference at Qwen2.5-32B shapes.

    python bench/bench_kernels.py [--ops rmsnorm,w4a16] [--quick] [--out PATH]

GPU only: without CUDA (or triton) it says so and exits 0. Each op is first checked
against its `*_ref` once (exit 1 on a mismatch), then timed (p20/p50/p80 in ms):
  triton, baselines  GPU time: N calls captured in a CUDA graph, each behind a 128 MiB
                     L2 flush, minus the flush-only graph (the runtime replays graphs, so
                     the Python launch cost is not what it pays)
  triton_eager       triton's do_bench on the eager call: GPU time plus launch overhead
  torch_ref          do_bench (the references sync on the host and cannot be captured)
Rows go to bench/results/kernels-<gpu>.json with the GPU, versions and commit.

Shapes (random weights): hidden 5120, 40 heads / 8 kv heads, head_dim 128,
intermediate 27648; W4A16 at M = 1, 4, 16, 64 on 5120->27648 and 27648->5120;
paged decode at context 4096; tree verify with 4/16/64 nodes after a 4096 prefix.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HIDDEN, N_HEADS, N_KV, HEAD_DIM, INTER = 5120, 40, 8, 128, 27648
DTYPE = torch.bfloat16
BLOCK_SIZE = 16
TOL = dict(atol=3e-2, rtol=3e-2)


def _time(fn, quick):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100,
                                   quantiles=[0.2, 0.5, 0.8])


_FLUSH = None


def _graph_time(fn, quick):
    """(p20, p50, p80) ms of GPU time per call of fn, from CUDA-graph replays."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(32 * 2**20, dtype=torch.int32, device="cuda")  # 128 MiB > L2
    n, reps = (5, 10) if quick else (20, 30)

    def capture(call):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (compile, allocator) outside the capture
            call()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(n):
                _FLUSH.zero_()
                call()
        return g

    def samples(g):
        g.replay()
        out = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / n)
        return sorted(out)

    with_fn, flush_only = samples(capture(fn)), samples(capture(lambda: None))
    base = flush_only[len(flush_only) // 2]
    q = lambda f: max(with_fn[min(int(f * reps), reps - 1)] - base, 0.0)  # noqa: E731
    return q(0.2), q(0.5), q(0.8)


def _check(name, got, ref):
    got, ref = (got if isinstance(got, tuple) else (got,)), (ref if isinstance(ref, tuple) else (ref,))
    for g, r in zip(got, ref):
        if not torch.allclose(g.float(), r.float(), **TOL):
            err = (g.float() - r.float()).abs().max().item()
            raise SystemExit(f"MISMATCH {name}: max abs err {err:.3g} vs reference")


class Bench:
    def __init__(self, quick: bool):
        self.quick, self.rows = quick, []

    def run(self, op, shape, kernel, ref, extra=None, baselines=None, check=True):
        """Check kernel() against ref() once, then time kernel, ref and any baselines."""
        if check:
            _check(f"{op} {shape}", kernel(), ref())
        times = {"triton": _graph_time(kernel, self.quick), "triton_eager": _time(kernel, self.quick),
                 "torch_ref": _time(ref, self.quick)}
        times.update({name: _graph_time(fn, self.quick) for name, fn in (baselines or {}).items()})
        for name, (p20, p50, p80) in times.items():
            row = dict(op=op, shape=shape, provider=name, p20_ms=p20, p50_ms=p50, p80_ms=p80,
                       timing="eager" if name in ("triton_eager", "torch_ref") else "cuda_graph",
                       ref_over_this=times["torch_ref"][1] / max(p50, 1e-6), **(extra or {}))
            if "bytes" in row:
                row["gb_per_s"] = row["bytes"] / (p50 * 1e-3) / 1e9
            self.rows.append(row)
        t, r = times["triton"][1], times["torch_ref"][1]
        more = "".join(f"  {k} {v[1] * 1e3:.1f}us" for k, v in times.items() if k not in ("triton", "torch_ref"))
        gbs = f"  {extra['bytes'] / (t * 1e-3) / 1e9:7.0f} GB/s" if extra and "bytes" in extra else ""
        print(f"{op:14s} {shape:34s} triton {t * 1e3:9.1f}us  ref {r * 1e3:9.1f}us  x{r / t:6.1f}{gbs}{more}",
              flush=True)
        return t


def bench_norms(b, K):
    for T in ([1, 4096] if b.quick else [1, 16, 256, 4096]):
        x = torch.randn(T, HIDDEN, device="cuda", dtype=DTYPE)
        r = torch.randn_like(x)
        w = torch.rand(HIDDEN, device="cuda", dtype=DTYPE) + 0.5
        nbytes = 2 * x.numel() * 2
        b.run("rmsnorm", f"T={T} H={HIDDEN}", lambda: K.rmsnorm(x, w), lambda: K.rmsnorm_ref(x, w),
              dict(bytes=nbytes))
        b.run("add_rmsnorm", f"T={T} H={HIDDEN}", lambda: K.add_rmsnorm(x, r, w),
              lambda: K.add_rmsnorm_ref(x, r, w), dict(bytes=2 * nbytes))


def bench_rope(b, K):
    cos, sin = (t.cuda() for t in K.rope_cache(32768, HEAD_DIM, base=1e6))
    for T in ([1, 4096] if b.quick else [1, 64, 4096]):
        q = torch.randn(T, N_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        k = torch.randn(T, N_KV, HEAD_DIM, device="cuda", dtype=DTYPE)
        pos = torch.randint(0, 32768, (T,), device="cuda")
        q_ref, k_ref = K.rope_ref(q, k, pos, cos, sin)
        q2, k2 = q.clone(), k.clone()
        _check(f"rope T={T}", K.rope(q2, k2, pos, cos, sin), (q_ref, k_ref))
        # timed in place on scratch copies (repeated rotation is fine for timing)
        b.run("rope", f"T={T} {N_HEADS}/{N_KV}x{HEAD_DIM}", lambda: K.rope(q2, k2, pos, cos, sin),
              lambda: K.rope_ref(q, k, pos, cos, sin), dict(bytes=2 * 2 * (q.numel() + k.numel())),
              check=False)  # checked above: the op is in place


def bench_rope_store_kv(b, K):
    """The fused bias + rope + cache write against the launches it replaces (bias add, rope, 2 index_copy)."""
    cos, sin = (t.cuda() for t in K.rope_cache(32768, HEAD_DIM, base=1e6))
    blocks = 4096 // BLOCK_SIZE + 8
    kc = torch.zeros(blocks, BLOCK_SIZE, N_KV, HEAD_DIM, device="cuda", dtype=DTYPE)
    vc = torch.zeros_like(kc)
    width = (N_HEADS + 2 * N_KV) * HEAD_DIM
    bias = torch.randn(width, device="cuda", dtype=DTYPE)
    for T in ([1, 64] if b.quick else [1, 16, 64]):
        qkv = torch.randn(T, width, device="cuda", dtype=DTYPE)
        q, k, v = (t.view(T, -1, HEAD_DIM) for t in qkv.split([N_HEADS * HEAD_DIM, N_KV * HEAD_DIM, N_KV * HEAD_DIM], -1))
        pos = torch.randint(0, 32768, (T,), device="cuda")
        slots = torch.randperm(blocks * BLOCK_SIZE, device="cuda")[:T]
        kc_ref, vc_ref, q_ref = kc.clone(), vc.clone(), q.clone()
        K.rope_store_kv_ref(q_ref, k, v, pos, cos, sin, kc_ref, vc_ref, slots, bias)
        q2 = q.clone()
        K.rope_store_kv(q2, k, v, pos, cos, sin, kc, vc, slots, bias)
        _check(f"rope_store_kv T={T}", (q2, kc, vc), (q_ref, kc_ref, vc_ref))

        def unfused():
            y = qkv + bias
            yq, yk, yv = (t.view(T, -1, HEAD_DIM) for t in y.split([N_HEADS * HEAD_DIM, N_KV * HEAD_DIM, N_KV * HEAD_DIM], -1))
            K.rope(yq, yk, pos, cos, sin)
            kc.view(-1, N_KV, HEAD_DIM).index_copy_(0, slots, yk)
            vc.view(-1, N_KV, HEAD_DIM).index_copy_(0, slots, yv)

        b.run("rope_store_kv", f"T={T} {N_HEADS}/{N_KV}x{HEAD_DIM} bias",
              lambda: K.rope_store_kv(q2, k, v, pos, cos, sin, kc, vc, slots, bias),
              lambda: K.rope_store_kv_ref(q_ref, k, v, pos, cos, sin, kc_ref, vc_ref, slots, bias),
              dict(bytes=2 * (2 * T * width + T * N_HEADS * HEAD_DIM)),
              {"bias_rope_index_copy": unfused}, check=False)  # checked above: the op writes in place


def bench_swiglu(b, K):
    for T in ([1, 4096] if b.quick else [1, 64, 4096]):
        x = torch.randn(T, 2 * INTER, device="cuda", dtype=DTYPE)
        b.run("swiglu", f"T={T} I={INTER}", lambda: K.swiglu(x), lambda: K.swiglu_ref(x),
              dict(bytes=3 * T * INTER * 2),
              {"torch_native": lambda: torch.nn.functional.silu(x[:, :INTER]) * x[:, INTER:]})


def bench_w4a16(b, K):
    for n_in, n_out in [(HIDDEN, INTER), (INTER, HIDDEN)]:
        w = torch.randn(n_out, n_in, device="cuda", dtype=DTYPE) * 0.02
        p = K.quantize_w4(w)
        w_dense = K.dequantize_w4_ref(p, DTYPE)
        wbytes = p.qweight.numel() * 4 + p.scales.numel() * 2 + p.zeros.numel()
        t1 = None
        for M in [1, 4, 16, 64]:
            x = torch.randn(M, n_in, device="cuda", dtype=DTYPE)
            t = b.run("w4a16_matmul", f"M={M} {n_in}->{n_out}", lambda: K.w4a16_matmul(x, p),
                      lambda: K.w4a16_matmul_ref(x, p), dict(bytes=wbytes + 2 * M * (n_in + n_out)),
                      {"bf16_dense_cublas": lambda: x @ w_dense.t()})
            t1 = t1 or t
            b.rows[-4]["time_over_M1"] = t / t1
            print(f"{'':14s} time(M={M}) / time(M=1) = {t / t1:.2f}")


def _paged_setup(K, ctx_lens, seed=0):
    """Random paged cache holding ctx_lens tokens per seq, fragmented block tables."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    need = [math.ceil(c / BLOCK_SIZE) for c in ctx_lens]
    nb = sum(need)
    kc = torch.randn(nb, BLOCK_SIZE, N_KV, HEAD_DIM, device="cuda", dtype=DTYPE, generator=g)
    vc = torch.randn_like(kc)
    perm = torch.randperm(nb, device="cuda", generator=g).to(torch.int32)
    bt = torch.zeros(len(ctx_lens), max(need), dtype=torch.int32, device="cuda")
    used = 0
    for i, n in enumerate(need):
        bt[i, :n] = perm[used : used + n]
        used += n
    return kc, vc, bt, torch.tensor(ctx_lens, dtype=torch.int32, device="cuda")


def bench_paged_decode(b, K):
    ctx = 4096
    for S in ([1, 32] if b.quick else [1, 8, 32, 64]):
        kc, vc, bt, cl = _paged_setup(K, [ctx] * S)
        q = torch.randn(S, N_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        kv_bytes = 2 * S * ctx * N_KV * HEAD_DIM * 2
        b.run("paged_decode", f"S={S} ctx={ctx}",
              lambda: K.paged_decode_attention(q, kc, vc, bt, cl, max_context_len=ctx),
              lambda: K.paged_decode_attention_ref(q, kc, vc, bt, cl), dict(bytes=kv_bytes))


def bench_tree(b, K):
    prefix = 4096
    for S in ([1] if b.quick else [1, 8]):
        for nodes in [4, 16, 64]:
            kc, vc, bt, cl = _paged_setup(K, [prefix + nodes] * S)
            cu = torch.arange(0, (S + 1) * nodes, nodes, dtype=torch.int32, device="cuda")
            q = torch.randn(S * nodes, N_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
            # a random tree in topological order: parent of node i is uniform in [0, i)
            masks = []
            for _ in range(S):
                par = [-1] + [int(torch.randint(0, i, (1,))) for i in range(1, nodes)]
                m = torch.zeros(nodes, nodes, dtype=torch.bool)
                for i in range(nodes):
                    j = i
                    while j >= 0:
                        m[i, j], j = True, par[j]
                masks.append(m)
            mask, moff = (t.cuda() for t in K.pack_masks(masks))
            kv_bytes = 2 * S * (prefix + nodes) * N_KV * HEAD_DIM * 2
            b.run("tree_verify", f"S={S} nodes={nodes} prefix={prefix}",
                  lambda: K.tree_attention(q, kc, vc, bt, cl, cu, mask, moff, max_q_len=nodes,
                                           max_context_len=prefix + nodes, lower_triangular=True),
                  lambda: K.tree_attention_ref(q, kc, vc, bt, cl, cu, mask, moff), dict(bytes=kv_bytes))


OPS = {"norms": bench_norms, "rope": bench_rope, "rope_store_kv": bench_rope_store_kv, "swiglu": bench_swiglu, "w4a16": bench_w4a16,
       "paged_decode": bench_paged_decode, "tree": bench_tree}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma list of {','.join(OPS)}")
    ap.add_argument("--quick", action="store_true", help="fewer shapes, shorter timing")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/kernels-<gpu>.json)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA GPU here; nothing to time (the kernels' CPU parity tests "
              "are tests/kernels under TRITON_INTERPRET=1).")
        return 0
    try:
        import triton
    except ImportError:
        print("bench_kernels: triton is not installed; `pip install triton` to time the kernels.")
        return 0
    from dllm import kernels as K

    torch.manual_seed(0)
    gpu = torch.cuda.get_device_name()
    print(f"GPU {gpu} | torch {torch.__version__} | triton {triton.__version__} | commit {_commit()}")
    b = Bench(args.quick)
    for name in args.ops.split(","):
        if name not in OPS:
            raise SystemExit(f"unknown op {name!r}; choose from {','.join(OPS)}")
        OPS[name](b, K)
        torch.cuda.empty_cache()
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"kernels-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                commit=_commit(), time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                dtype=str(DTYPE), quick=args.quick, host=os.uname().nodename)
    out.write_text(json.dumps(dict(meta=meta, rows=b.rows), indent=1))
    print(f"wrote {len(b.rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
