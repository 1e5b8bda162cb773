"""Static cost of the W4A16 kernels without a GPU: SASS instructions in each kernel's main loop.

Compiles the kernels for sm_90 with triton's own LLVM and ptxas (both ship in the triton
wheel), disassembles with its cuobjdump, finds the longest backward branch (the K loop) and
divides its length by the weights each thread handles per iteration. The GEMV is issue-bound
(kernels/README.md), so this is the number its speed follows; a device still has to confirm it.

    python bench/w4_sass.py            # -> bench/results/w4-sass-sm90.json

Pointers and strides are declared 16-byte divisible, as triton's launcher specializes them at
run time (without that the loads do not vectorize and the counts mean nothing).
"""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from bench.common import RESULTS, write_result  # noqa: E402

W = importlib.import_module("dllm.kernels.w4a16_matmul")
TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"

_PTRS = {"x_ptr": "*bf16", "qw_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*u8", "part_ptr": "*fp32",
         "out_ptr": "*bf16", "lock_ptr": "*i32"}
GEMV_SIG = {**_PTRS, **{n: "i32" for n in ("N", "stride_xm", "stride_qk", "stride_sk", "stride_zk", "stride_ps",
                                           "stride_om", "k_steps_per_split", "k_steps")},
            **{n: "constexpr" for n in ("BLOCK_N", "BLOCK_K", "SPLIT_K", "USE_LOCKS", "EXACT", "H2")}}
DOT_SIG = {**_PTRS, **{n: "i32" for n in ("M", "N", "stride_xm", "stride_qk", "stride_sk", "stride_zk", "stride_ps",
                                          "stride_om", "k_steps_per_split", "k_steps")},
           **{n: "constexpr" for n in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "USE_LOCKS", "DQ", "EXACT")}}


def loop_instructions(fn, sig: dict, consts: dict, num_warps: int, num_stages: int = 3) -> int:
    """Instructions of the longest loop in fn's sm_90 SASS."""
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]]
             for n in names if sig[n] != "constexpr" and not n.startswith("k_steps")}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=TARGET,
                       options=dict(num_warps=num_warps, num_stages=num_stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        sass = subprocess.run([str(CUOBJDUMP), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    best = 0
    for m in re.finditer(r"/\*([0-9a-f]{4,5})\*/\s+@!?P\d BRA 0x([0-9a-f]+)", sass):
        end, start = int(m.group(1), 16), int(m.group(2), 16)
        if start < end:
            best = max(best, (end - start) // 16 + 1)
    return best


def main() -> None:
    rows = []
    group = 128
    # the GEMV at the plan's configs (kernels/w4a16_matmul.py _plan): gate_up/head, down, qkv/o
    for (bn, nw), h2 in [((b, w), h) for (b, w) in ((128, 8), (64, 4), (128, 4), (256, 8)) for h in (0, 1)]:
        n = loop_instructions(W._w4_gemv_kernel, GEMV_SIG, dict(BLOCK_N=bn, BLOCK_K=group, SPLIT_K=2, USE_LOCKS=True,
                                                                EXACT=False, H2=h2), nw)
        per_thread = group // 8 * bn * 8 // (32 * nw)  # weights a thread handles per K step
        rows.append(dict(kernel="gemv", h2=bool(h2), block_n=bn, num_warps=nw, loop_instructions=n,
                         weights_per_thread=per_thread, per_weight=round(n / per_thread, 2)))
        print(rows[-1], flush=True)
    for bm, bn, nw in ((16, 256, 4), (16, 128, 4)):
        n = loop_instructions(W._w4a16_kernel, DOT_SIG, dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=group, SPLIT_K=2,
                                                             USE_LOCKS=False, DQ=W.DQ_BF16, EXACT=False), nw)
        per_thread = group // 8 * bn * 8 // (32 * nw)
        rows.append(dict(kernel="dot", block_m=bm, block_n=bn, num_warps=nw, loop_instructions=n,
                         weights_per_thread=per_thread, per_weight=round(n / per_thread, 2)))
        print(rows[-1], flush=True)
    path = write_result(RESULTS / "w4-sass-sm90.json", {
        "benchmark": "w4-sass", "target": "sm_90", "triton": triton.__version__, "rows": rows,
        "note": "SASS instructions of each kernel's K loop divided by the weights a thread handles per "
                "K step (bf16 x, group 128), compiled without a GPU; the GEMV is issue-bound, so this is "
                "what its speed follows, but only a device run times it."})
    print(path)


if __name__ == "__main__":
    main()
