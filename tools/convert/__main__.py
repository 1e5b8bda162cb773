"""python -m tools.convert SRC OUT [--stages N | --split 0:12,12:24] [--dtype float32|float16|bfloat16] [--quant int8|int4 [--group 32]]

SRC is a .gguf file or an HF directory (config.json + safetensors). See dllm/convert.py for OUT's layout.
"""
from __future__ import annotations

import argparse
import sys

from dllm.convert import DTYPES, convert
from dllm.errors import DllmError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.convert", description=__doc__.splitlines()[0])
    p.add_argument("src", help="GGUF file or HF model directory")
    p.add_argument("out", help="output model directory (must not exist, or be empty)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--stages", type=int, default=1, help="split the layers evenly into N stages (default 1)")
    how.add_argument("--split", help="explicit layer ranges per stage, e.g. 0:12,12:24")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="stored dtype (default float32: exact GGUF values, needed for 1e-3 logit parity)")
    p.add_argument("--quant", default=None, metavar="int8|int4",
                   help="store the matmul weights quantized: int8 per row, or int4 in groups of --group columns")
    p.add_argument("--group", type=int, default=32, help="int4 group size: 32 (default), 64, 128 or 256")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it already holds a model")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        m = convert(args.src, args.out, stages=args.stages, split=args.split, dtype=args.dtype,
                    progress=not args.quiet, overwrite=args.overwrite, quant=args.quant, group=args.group)
    except DllmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    split = ",".join(f"{a}:{b}" for a, b in m.split())
    q = m.quant
    quant = (q["mode"] + (f" (group {q['group']})" if q["mode"] == "int4" else "")) if q else "none"
    print(f"wrote {args.out}: {m.num_layers} layers in {len(m.stages)} stage(s) [{split}], {m.dtype}, quant {quant}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
