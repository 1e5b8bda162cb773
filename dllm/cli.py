"""`dllm` command line. Each command is a thin shell over a module that does the work."""
from __future__ import annotations

import sys
import time

import click

from dllm.errors import DllmError

DEFAULT_MODEL = "smollm2"


class CliGroup(click.Group):
    """Print our typed errors as one line, not a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DllmError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except (ValueError, FileNotFoundError) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=CliGroup)
def main():
    """dllm: one LLM split by layer across machines."""


def _threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


@main.command()
@click.option("--prompt", help="Generate an answer to this user message and exit.")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Model directory, .gguf file or known name.")
@click.option("--system", default=None, help="System message for the chat template.")
@click.option("--raw", is_flag=True, help="Send the prompt as-is, without the chat template.")
@click.option("--max-tokens", default=256, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float)
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--top-k", default=0, show_default=True, type=int)
@click.option("--seed", default=None, type=int)
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option("--stages", default=1, show_default=True, type=int, help="Run the layers as N in-process stages.")
@click.option("--split", default=None, help="Layer ranges, e.g. 0:12,12:24 (default: manifest's or even).")
@click.option("--threads", default=None, type=int, help="CPU threads (default: torch's).")
def run(prompt, model, system, raw, max_tokens, temperature, top_p, top_k, seed, dtype, stages, split, threads):
    """Run the model: answer --prompt, streaming to stdout, tokens/s to stderr."""
    from dllm.errors import RequestError
    from dllm.fetch import resolve_model
    from dllm.launch import local_engine, parse_split
    from dllm.config import ModelConfig
    from dllm.sampling import SamplingParams
    from dllm.tokenizer import StreamDecoder, Tokenizer

    _threads(threads)
    if prompt is None:
        raise click.UsageError("--prompt is required (serving without --prompt comes with the API)")
    if not prompt.strip():
        raise RequestError("empty prompt: give --prompt some text")
    model_dir = resolve_model(model)
    tok = Tokenizer.from_dir(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    engine = local_engine(model_dir, stages=stages, split=parse_split(split, cfg.num_layers) if split else None,
                          dtype=dtype, eos_ids=sorted(tok.eos_token_ids | set(cfg.eos_token_ids)))
    if raw:
        ids = tok.encode(prompt)
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = tok.encode_chat(messages)
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, max_tokens=max_tokens)
    stream = StreamDecoder(tok)
    t0 = time.perf_counter()
    t_first = None
    n = 0
    for t in engine.generate(ids, params):
        if t_first is None:
            t_first = time.perf_counter()
        n += 1
        if t in engine.eos_ids:
            break
        sys.stdout.write(stream.feed(t))
        sys.stdout.flush()
    sys.stdout.write(stream.flush() + "\n")
    t1 = time.perf_counter()
    decode_rate = (n - 1) / (t1 - t_first) if n > 1 else 0.0
    click.echo(f"[{n} tokens, prompt {len(ids)} tokens, first token {1000 * (t_first - t0):.0f} ms, "
               f"decode {decode_rate:.1f} tok/s]", err=True)


@main.command()
@click.argument("src")
@click.argument("out")
@click.option("--stages", default=1, show_default=True, type=int, help="Even split into N per-stage shards.")
@click.option("--split", default=None, help="Explicit layer ranges, e.g. 0:12,12:24.")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]))
def convert(src, out, stages, split, dtype):
    """Convert an HF directory or a GGUF file into per-stage safetensors shards + manifest."""
    from dllm.convert import convert as do_convert

    m = do_convert(src, out, stages=stages, split=split, dtype=dtype)
    click.echo(f"wrote {out}: {len(m.stages)} stage(s) {m.split()}, dtype {m.dtype}")


@main.command()
@click.argument("name")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]))
def fetch(name, dtype):
    """Download, verify and convert a known model (smollm2, qwen-coder-0.5b, qwen-coder-1.5b)."""
    from dllm.fetch import ensure_model

    click.echo(str(ensure_model(name, dtype=dtype)))


@main.command()
@click.option("--model", "models", multiple=True, default=[DEFAULT_MODEL], show_default=True)
@click.option("--prompt-tokens", default=128, show_default=True, type=int)
@click.option("--new-tokens", default=64, show_default=True, type=int)
@click.option("--dtype", default="float32", show_default=True)
@click.option("--threads", default=2, show_default=True, type=int)
@click.option("--no-hf", is_flag=True, help="Skip the HF transformers baseline.")
@click.option("--out", default="bench/results/runtime-cpu.json", show_default=True)
def bench(models, prompt_tokens, new_tokens, dtype, threads, no_hf, out):
    """Prefill/decode tokens/s against HF transformers and the memory-bandwidth roofline."""
    from bench.runtime_cpu import run_bench

    run_bench(list(models), prompt_tokens=prompt_tokens, new_tokens=new_tokens, dtype=dtype,
              threads=threads, hf=not no_hf, out=out)


if __name__ == "__main__":
    main()
