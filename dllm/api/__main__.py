"""``python -m dllm.api``: serve a model on the OpenAI API (the CLI's ``dllm run`` does the same)."""
import argparse

from dllm.api.server import run_server


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m dllm.api", description=__doc__)
    p.add_argument("--model", default="smollm2", help="known model name, model dir or .gguf")
    p.add_argument("--serve", default="127.0.0.1:8000", help="HOST:PORT (port 0 = any free port)")
    p.add_argument("--stages", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--kv-tokens", type=int, default=8192)
    p.add_argument("--rate-per-minute", type=float, default=30.0, help="free requests per IP per minute (0: no limit)")
    p.add_argument("--burst", type=int, default=10)
    p.add_argument("--max-pending", type=int, default=256)
    a = p.parse_args(argv)
    host, _, port = a.serve.rpartition(":")
    run_server(a.model, host or "127.0.0.1", int(port), stages=a.stages, dtype=a.dtype, kv_tokens=a.kv_tokens,
               rate_per_minute=a.rate_per_minute, burst=a.burst, max_pending=a.max_pending,
               announce=lambda line: print(line, flush=True))


if __name__ == "__main__":
    main()
