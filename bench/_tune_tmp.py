import itertools, statistics, sys, time
import torch
sys.path.insert(0, ".")
import kernels as K
from bench.bench_kernels import _paged_setup, N_HEADS, N_KV, HEAD_DIM

def gtime(fn, n=10, reps=7):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(); fn()
    torch.cuda.current_stream().wait_stream(s); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n): fn()
    g.replay(); torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record(); g.replay(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b) / n * 1e3)
    return statistics.median(ts)

def w4(quick_sections):
    shapes = [(5120, 27648), (27648, 5120)]
    data = {}
    for n_in, n_out in shapes:
        ps = [K.quantize_w4(torch.randn(n_out, n_in, device="cuda", dtype=torch.bfloat16) * 0.02) for _ in range(2)]
        data[(n_in, n_out)] = ps

    def run(cfg, Ms=(1, 16, 64)):
        res = []
        for (n_in, n_out), ps in data.items():
            for M in Ms:
                x = torch.randn(M, n_in, device="cuda", dtype=torch.bfloat16)
                ref = K.w4a16_matmul_ref(x, ps[0])
                o = K.w4a16_matmul(x, ps[0], config=cfg)
                ok = torch.allclose(o.float(), ref.float(), atol=3e-2, rtol=3e-2)
                t = gtime(lambda: [K.w4a16_matmul(x, p, config=cfg) for p in ps]) / 2
                res.append(t if ok else float("nan"))
        return res

    for ip, bn, nw, wv in itertools.product((False, True), (128,), (4, 8), (4,)):
        cfg = dict(gemv=True, inplace=ip, block_n=bn, num_warps=nw, waves=wv)
        try:
            r = run(cfg, Ms=(1,))
            print("gemv", cfg, " ".join(f"{v:.1f}" for v in r), "sum", f"{sum(r):.1f}", flush=True)
        except Exception as e:
            print("FAIL", cfg, repr(e)[-600:], flush=True)


def attn():
    for S in (1, 32):
        kc, vc, bt, cl = _paged_setup(K, [4096] * S)
        kc2, vc2 = kc.clone(), vc.clone()
        q = torch.randn(S, N_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        ref = K.paged_decode_attention_ref(q, kc, vc, bt, cl)
        for bn, nw, ns, mp in itertools.product((32, 64, 128), (4, 8), (2, 3), (128, 256, 512)):
            cfg = dict(block_n=bn, num_warps=nw, num_stages=ns, min_partition=mp)
            try:
                o = K.paged_decode_attention(q, kc, vc, bt, cl, max_context_len=4096, config=cfg)
                ok = torch.allclose(o.float(), ref.float(), atol=3e-2, rtol=3e-2)
                t = gtime(lambda: [K.paged_decode_attention(q, a, b, bt, cl, max_context_len=4096, config=cfg) for a, b in ((kc, vc), (kc2, vc2))]) / 2
                print(f"decode S={S} {cfg} {t:.1f}us ok={ok}", flush=True)
            except Exception as e:
                print("FAIL", cfg, repr(e)[:200], flush=True)
    for nodes in (4, 16, 64):
        kc, vc, bt, cl = _paged_setup(K, [4096 + nodes])
        kc2, vc2 = kc.clone(), vc.clone()
        cu = torch.tensor([0, nodes], dtype=torch.int32, device="cuda")
        q = torch.randn(nodes, N_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        mask, moff = (t.cuda() for t in K.pack_masks([torch.ones(nodes, nodes, dtype=torch.bool).tril()]))
        for bm, bn, nw, ns, mp in itertools.product((16, 64), (32, 64), (4, 8), (2, 3), (256, 512)):
            cfg = dict(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns, min_partition=mp)
            f = lambda a, b: K.tree_attention(q, a, b, bt, cl, cu, mask, moff, max_q_len=nodes, max_context_len=4096 + nodes, lower_triangular=True, config=cfg)
            try:
                t = gtime(lambda: [f(kc, vc), f(kc2, vc2)]) / 2
                print(f"tree nodes={nodes} {cfg} {t:.1f}us", flush=True)
            except Exception as e:
                print("FAIL", cfg, repr(e)[:200], flush=True)

def small():
    x = torch.randn(1, 5120, device="cuda", dtype=torch.bfloat16); w = torch.ones(5120, device="cuda", dtype=torch.bfloat16)
    print("rmsnorm T=1 graph", gtime(lambda: K.rmsnorm(x, w)), flush=True)
    print("add_rmsnorm T=1 graph", gtime(lambda: K.add_rmsnorm(x, x, w)), flush=True)

if __name__ == "__main__":
    t0 = time.time()
    for which in sys.argv[1:]:
        {"w4": lambda: w4(None), "attn": attn, "small": small}[which]()
    print("elapsed", time.time() - t0)
