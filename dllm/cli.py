"""`dllm` command line. Each command is a thin shell over a module that does the work."""
from __future__ import annotations

import os
import sys
import time

import click

from dllm.errors import DllmError

DEFAULT_MODEL = "smollm2"
# --dtype / --quant of run, stage and node; dllm.launch.resolve_precision turns them into what runs
DTYPE_CHOICES = ["auto", "float32", "bfloat16", "float16"]
QUANT_CHOICES = ["none", "int8", "int4"]
DTYPE_HELP = "Activation dtype; auto: float32 with int4 weights on CPU (or the checkpoint's stored quantization)."
QUANT_HELP = "Weight quantization (default: int4 with --dtype auto on CPU, else none; a quantized checkpoint's own)."


class CliGroup(click.Group):
    """Print our typed errors as one line, not a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.BadParameter as e:  # a bad flag value: one line too, without the usage block
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(2)
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


def build_engine(model_dir, *, stages=1, split=None, dtype="float32", peers=None, local_stages=0,
                 emulate_rtt=0.0, identity_path=None, deadline=30.0, draft="none", tree="auto", kv_tokens=8192,
                 threads=None, eos_ids=None, drafters=None, draft_deadline=0.05, quant=None, draft_dtype="auto",
                 one_sequence=False):
    """Engine for `dllm run`: in-process stages, a remote chain (--peers), or local stage processes.

    ``dtype`` / ``quant`` are the --dtype / --quant flags, resolved once here
    (dllm.launch.resolve_precision) and given as such to every local stage process, so a local
    chain computes what one process would. A --draft model runs in ``draft_dtype`` (default auto:
    the CPU fast path, int4 weights, whatever the target's precision): a draft changes speed only.
    ``one_sequence`` (a one-shot --prompt): an in-process fp32 CPU engine without a drafter takes
    the "single" CPU layout (launch.local_engine), the fastest for one sequence.
    Returns (engine, cleanup callable)."""
    from dllm.config import ModelConfig
    from dllm.launch import (
        chain_engine,
        default_split,
        local_engine,
        parse_split,
        resolve_precision,
    )

    cfg = ModelConfig.from_dir(model_dir)
    cleanups = []
    split_ranges = parse_split(split, cfg.num_layers) if split else None
    spec_kw = _speculation(model_dir, draft, tree, draft_dtype, drafters, draft_deadline, cfg.vocab_size)
    dtype, quant = resolve_precision(dtype, quant, model_dir=model_dir)
    if local_stages and local_stages > 1:
        from dllm.net.local_cluster import LocalCluster

        if threads is None:  # the processes share this machine: each gets its own cores, as on separate nodes
            threads = local_stage_threads(local_stages)
            _threads(threads)
        ranges = split_ranges or default_split(model_dir, cfg.num_layers, local_stages)
        if len(ranges) != local_stages:
            raise click.UsageError(f"--split has {len(ranges)} ranges but --local-stages is {local_stages}")
        cluster = LocalCluster(model_dir, ranges[1:], dtype=dtype, quant=quant, kv_tokens=kv_tokens,
                               emulate_rtt_ms=emulate_rtt, threads=threads)
        cleanups.append(cluster.stop)
        peers = [str(a) for a in cluster.addresses]
        first = ranges[0]
    elif peers:
        first = split_ranges[0] if split_ranges else None
    else:
        single = one_sequence and spec_kw.get("drafter") is None and dtype == "float32" and quant is None
        engine = local_engine(model_dir, stages=stages, split=split_ranges, dtype=dtype, quant=quant,
                              kv_tokens=kv_tokens, eos_ids=eos_ids, cpu_layout="single" if single else "batched",
                              **spec_kw)
        return engine, lambda: None
    from dllm.net.crypto import Identity

    ident = Identity.load(identity_path) if identity_path else Identity.generate()
    try:
        engine = chain_engine(model_dir, peers, first, identity=ident, dtype=dtype, quant=quant, kv_tokens=kv_tokens,
                              emulate_rtt_ms=emulate_rtt, deadline_s=deadline, eos_ids=eos_ids, **spec_kw)
    except BaseException:
        for c in cleanups:
            c()
        raise

    def cleanup():
        engine.pipeline.close()
        for c in cleanups:
            c()
    return engine, cleanup


def local_stage_threads(processes: int, cores: int | None = None) -> int:
    """Intra-op threads for each of ``processes`` processes sharing this machine's cores
    (--local-stages without --threads): a share each, at least one. Every process would
    otherwise start a thread per core. On 2 cores, the default SmolLM2 demo (int4, 2 processes)
    decodes one stream at ~26 tok/s with 2 threads each and ~38 with 1 (its small matmuls pay
    more for the oversubscribed team than they gain from it); 8 streams together lose ~10%
    (73 vs 81 tok/s, prefill included). --threads overrides."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores // max(1, processes))


def _speculation(model_dir, draft: str, tree: str, draft_dtype: str = "auto", drafters=None, draft_deadline=0.05,
                 vocab_size=1 << 31) -> dict:
    """Engine keyword arguments for --draft, --drafters and --tree."""
    if draft in (None, "", "none") and not drafters:
        return {}
    from dllm.spec.drafters import ModelDrafter, NgramDrafter, check_draft_compatible
    from dllm.spec.planner import TreePlanner

    if draft in (None, "", "none"):
        drafter = None
    elif draft == "ngram":
        drafter = NgramDrafter()
    else:
        from dllm.fetch import model_path as resolve_model

        draft_dir = resolve_model(draft)
        check_draft_compatible(model_dir, draft_dir)
        drafter = ModelDrafter.from_pretrained(draft_dir, dtype=draft_dtype)
    if drafters:
        from dllm.spec.remote import ForestDrafter

        drafter = ForestDrafter(drafter, drafters, vocab_size=vocab_size, deadline_s=draft_deadline)
    kw = {"drafter": drafter}
    if tree == "auto":
        kw["planner"] = TreePlanner()
    elif tree == "chain":
        kw.update(spec_depth=4, spec_width=1)
    else:
        try:
            w, d = (int(v) for v in tree.lower().split("x"))
        except ValueError:
            raise click.BadParameter(f"--tree {tree!r}: expected auto, chain or WxD (e.g. 2x4)") from None
        kw.update(spec_depth=d, spec_width=w)
    return kw


@main.command()
@click.option("--prompt", help="Answer this user message and exit (without it: serve the API and chat page).")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Model directory, .gguf file or known name.")
@click.option("--system", default=None, help="System message for the chat template.")
@click.option("--raw", is_flag=True, help="Send the prompt as-is, without the chat template.")
@click.option("--max-tokens", default=256, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float)
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--top-k", default=0, show_default=True, type=int)
@click.option("--seed", default=None, type=int)
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(DTYPE_CHOICES), help=DTYPE_HELP)
@click.option("--quant", default=None, type=click.Choice(QUANT_CHOICES), help=QUANT_HELP)
@click.option("--stages", default=1, show_default=True, type=int, help="Run the layers as N in-process stages.")
@click.option("--split", default=None, help="Layer ranges, e.g. 0:12,12:24 (default: manifest's or even).")
@click.option("--peers", default=None, help="Comma-separated KEY@host:port stage servers (spares welcome).")
@click.option("--local-stages", default=None, type=int,
              help="Start N-1 stage processes on 127.0.0.1 and chain them (default: 2 when serving, 0 with --prompt).")
@click.option("--identity", "identity_path", default=None, type=click.Path(dir_okay=False),
              help="Coordinator identity (default: a fresh one).")
@click.option("--emulate-rtt", default=0.0, show_default=True, type=float, help="Delay each hop by RTT/2 ms.")
@click.option("--deadline", default=30.0, show_default=True, type=float, help="Seconds before a stalled pass fails over.")
@click.option("--draft", default=None,
              help="Draft model (dir or name), 'ngram' or 'none' (default: ngram when serving, none with --prompt).")
@click.option("--draft-dtype", default="auto", show_default=True, type=click.Choice(DTYPE_CHOICES),
              help="Precision of the --draft model; auto drafts with int4 weights on CPU (a draft changes speed, never output).")
@click.option("--tree", default="auto", show_default=True, help="Draft tree: auto, chain or WxD.")
@click.option("--drafters", default=None, help="Comma-separated KEY@host:port remote drafter nodes.")
@click.option("--draft-deadline", default=50.0, show_default=True, type=float,
              help="Milliseconds to wait for remote drafts before verifying without them.")
@click.option("--serve", "serve_addr", default="127.0.0.1:8000", show_default=True, help="HOST:PORT for the API and page.")
@click.option("--rate", default=30.0, show_default=True, type=float, help="Free requests per minute per client IP (0: no limit).")
@click.option("--burst", default=10, show_default=True, type=int, help="Free requests allowed at once per client IP.")
@click.option("--kv-tokens", default=8192, show_default=True, type=int, help="KV cache capacity per stage, in tokens.")
@click.option("--x402", "x402_on", is_flag=True, help="Open the paid door (x402 payments in CIRC).")
@click.option("--x402-config", default=None, type=click.Path(dir_okay=False), help="TOML/JSON file with the x402 settings.")
@click.option("--mint", default=None, help="CIRC mint address (Token-2022).")
@click.option("--treasury", default=None, help="Treasury wallet address.")
@click.option("--price-usd", default=0.002, show_default=True, type=float)
@click.option("--circ-usd", default=None, type=float, help="USD per CIRC.")
@click.option("--rpc", default=None, help="Solana JSON-RPC URL.")
@click.option("--network", default=None, help="CAIP-2 network id, e.g. solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp.")
@click.option("--fee-payer-keypair", default=None, type=click.Path(dir_okay=False),
              help="Keypair that co-signs stock x402 'exact' payments (without it only pay-then-attach is offered).")
@click.option("--threads", default=None, type=int, help="CPU threads (default: torch's).")
def run(prompt, model, system, raw, max_tokens, temperature, top_p, top_k, seed, dtype, quant, stages, split, peers,
        local_stages, identity_path, emulate_rtt, deadline, draft, draft_dtype, tree, drafters, draft_deadline, serve_addr, rate,
        burst, kv_tokens, x402_on, x402_config, mint, treasury, price_usd, circ_usd, rpc, network, fee_payer_keypair,
        threads):
    """Run the model. With --prompt: answer and exit. Without: serve the OpenAI API and the chat page.

    With no arguments at all: SmolLM2, two local stages over the encrypted link, n-gram drafting,
    the API and the page on http://127.0.0.1:8000/.
    """
    from dllm.config import ModelConfig
    from dllm.errors import RequestError
    from dllm.fetch import model_path as resolve_model
    from dllm.launch import resolve_precision
    from dllm.sampling import SamplingParams
    from dllm.tokenizer import Tokenizer

    _threads(threads)
    serving = prompt is None
    if local_stages is None:
        local_stages = 2 if serving and not peers and stages == 1 else 0
    if draft is None:
        draft = "ngram" if serving else "none"
    if not serving and not prompt.strip():
        raise RequestError("empty prompt: give --prompt some text")
    gate = _payment_gate(x402_on, x402_config, mint, treasury, price_usd, circ_usd, rpc, network, fee_payer_keypair)
    model_dir = resolve_model(model, resolve_precision(dtype, quant)[0])  # a known name converts in that dtype
    tok = Tokenizer.from_dir(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    engine, cleanup = build_engine(model_dir, stages=stages, split=split, dtype=dtype, quant=quant,
                                   peers=peers.split(",") if peers else None, local_stages=local_stages,
                                   emulate_rtt=emulate_rtt, identity_path=identity_path, deadline=deadline,
                                   draft=draft, draft_dtype=draft_dtype, tree=tree, threads=threads, kv_tokens=kv_tokens,
                                   drafters=drafters.split(",") if drafters else None,
                                   draft_deadline=draft_deadline / 1000.0, one_sequence=not serving,
                                   eos_ids=sorted(tok.eos_token_ids | set(cfg.eos_token_ids)))
    try:
        if serving:
            from dllm.api.server import run_server

            host, _, port = serve_addr.rpartition(":")
            run_server(str(model_dir), host or "127.0.0.1", int(port), engine=engine,
                       model_name=model if not model.startswith(("/", ".")) else None, rate_per_minute=rate,
                       burst=burst, payment_gate=gate, announce=lambda m: click.echo(m, err=True))
            return
        if raw:
            ids = tok.encode(prompt)
        else:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            ids = tok.encode_chat(messages)
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, max_tokens=max_tokens)
        _stream_answer(engine, tok, ids, params)
    finally:
        cleanup()


def _payment_gate(on, config_path, mint, treasury, price_usd, circ_usd, rpc, network, fee_payer):
    """X402Gate from --x402-config and/or the flags (flags win), or None when the paid door is off."""
    if not (on or config_path):
        return None
    from dllm.pay.gate import X402Config, X402Gate, load_config

    base = load_config(config_path) if config_path else None
    fields = {k: v for k, v in dict(mint=mint, treasury=treasury, circ_usd=circ_usd, rpc_url=rpc, network=network,
                                     fee_payer_keypair_path=fee_payer).items() if v is not None}
    if base is not None:
        from dataclasses import replace

        cfg = replace(base, **fields, **({"price_usd": price_usd} if price_usd != 0.002 else {}))
    else:
        missing = [f for f in ("mint", "treasury", "circ_usd", "rpc_url", "network") if f not in fields]
        if missing:
            raise click.UsageError("--x402 needs " + ", ".join("--" + m.replace("_url", "").replace("_", "-") for m in missing))
        cfg = X402Config(price_usd=price_usd, **fields)
    return X402Gate(cfg)


def _stream_answer(engine, tok, ids, params) -> None:
    from dllm.tokenizer import StreamDecoder

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
    extra = f", {engine.stats.mean_accepted:.2f} tokens/pass" if engine.stats.passes else ""
    click.echo(f"[{n} tokens, prompt {len(ids)} tokens, first token {1000 * (t_first - t0):.0f} ms, "
               f"decode {decode_rate:.1f} tok/s{extra}]", err=True)


@main.command()
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="Identity file to create (mode 0600).")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def keygen(out, force):
    """Make an ed25519 node identity and print its public key."""
    from dllm.net.crypto import Identity

    ident = Identity.generate()
    ident.save(out, overwrite=force)
    click.echo(ident.public_key)


def _serve_node(server, ident, host: str, port: int) -> None:
    """Serve a node (stage or drafter: anything with .app()) until interrupted, after printing
    the ``ready KEY@host:port`` line that LocalCluster and operators wait for."""
    import asyncio

    from dllm.net.stage_server import serve_stage

    async def main_():
        runner = await serve_stage(server, host, port)
        click.echo(f"ready {ident.public_key}@{host}:{port}")
        sys.stdout.flush()
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(main_())
    except KeyboardInterrupt:
        pass


@main.command()
@click.option("--model", required=True, help="Model directory (or known name).")
@click.option("--layers", required=True, help="Layer range A:B this stage serves.")
@click.option("--listen", default="127.0.0.1:7000", show_default=True, help="HOST:PORT to listen on.")
@click.option("--identity", "identity_path", required=True, type=click.Path(dir_okay=False))
@click.option("--allow", default=None, help="Comma-separated public keys allowed to connect (default: any authenticated key).")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(DTYPE_CHOICES), help=DTYPE_HELP)
@click.option("--quant", default=None, type=click.Choice(QUANT_CHOICES), help=QUANT_HELP)
@click.option("--kv-tokens", default=8192, show_default=True, type=int, help="KV cache capacity in tokens.")
@click.option("--emulate-rtt", default=0.0, show_default=True, type=float, help="Delay each outgoing hop by RTT/2 ms.")
@click.option("--session-ttl", default=600.0, show_default=True, type=float, help="Free sequences idle this long (s).")
@click.option("--threads", default=None, type=int)
def stage(model, layers, listen, identity_path, allow, dtype, quant, kv_tokens, emulate_rtt, session_ttl, threads):
    """Serve layers A:B of a model to coordinators over an encrypted WebSocket."""
    from dllm.fetch import model_path as resolve_model
    from dllm.launch import resolve_precision
    from dllm.model.runner import StageRunner
    from dllm.model.stage import StageModel
    from dllm.net.crypto import Identity
    from dllm.net.stage_server import StageServer

    _threads(threads)
    ident = Identity.load(identity_path)
    model_dir = resolve_model(model)
    try:
        a, b = (int(v) for v in layers.split(":"))
    except ValueError:
        raise click.BadParameter(f"--layers {layers!r}: expected A:B") from None
    host, _, port = listen.rpartition(":")
    dtype, quant = resolve_precision(dtype, quant, model_dir=model_dir)
    model_ = StageModel.from_pretrained(model_dir, layers=range(a, b), embed=False, head=False, dtype=dtype,
                                        quant=quant)
    server = StageServer(StageRunner.for_tokens(model_, kv_tokens), ident, model_name=str(model_dir),
                         allowed=allow.split(",") if allow else None, emulate_rtt_ms=emulate_rtt,
                         session_ttl_s=session_ttl)

    _serve_node(server, ident, host, int(port))


@main.command()
@click.option("--role", type=click.Choice(["auto", "drafter", "stage"]), default="auto", show_default=True,
              help="auto: stage on a CUDA machine, drafter on a CPU-only one.")
@click.option("--model", required=True, help="Model directory or known name (the drafter's model, or the stage's).")
@click.option("--layers", default=None, help="Layer range A:B (stage role).")
@click.option("--listen", default="127.0.0.1:7100", show_default=True)
@click.option("--identity", "identity_path", required=True, type=click.Path(dir_okay=False))
@click.option("--allow", default=None, help="Comma-separated public keys allowed to connect.")
@click.option("--draft", "draft_kind", default="model", type=click.Choice(["model", "ngram"]), show_default=True,
              help="Drafter role: draft with the model, or by prompt lookup.")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(DTYPE_CHOICES), help=DTYPE_HELP)
@click.option("--quant", default=None, type=click.Choice(QUANT_CHOICES), help=QUANT_HELP)
@click.option("--emulate-rtt", default=0.0, show_default=True, type=float)
@click.option("--threads", default=None, type=int)
@click.pass_context
def node(ctx, role, model, layers, listen, identity_path, allow, draft_kind, dtype, quant, emulate_rtt, threads):
    """Run a network node; its role follows its hardware unless --role says otherwise."""
    import torch

    if role == "auto":
        role = "stage" if torch.cuda.is_available() else "drafter"
    if role == "stage":
        if not layers:
            raise click.UsageError("the stage role needs --layers A:B")
        return ctx.invoke(stage, model=model, layers=layers, listen=listen, identity_path=identity_path, allow=allow,
                          dtype=dtype, quant=quant, kv_tokens=8192, emulate_rtt=emulate_rtt, session_ttl=600.0, threads=threads)
    from dllm.fetch import model_path
    from dllm.net.crypto import Identity
    from dllm.net.drafter_server import DrafterServer
    from dllm.spec.drafters import ModelDrafter, NgramDrafter

    _threads(threads)
    ident = Identity.load(identity_path)
    drafter = (NgramDrafter() if draft_kind == "ngram"
               else ModelDrafter.from_pretrained(model_path(model), dtype=dtype, quant=quant))
    server = DrafterServer(drafter, ident, allowed=allow.split(",") if allow else None, emulate_rtt_ms=emulate_rtt)
    host, _, port = listen.rpartition(":")

    _serve_node(server, ident, host, int(port))


@main.command()
@click.option("--model", default=None, help="Model directory or known name (its config.json gives the shape).")
@click.option("--shape", default=None, help="A named reference shape instead (qwen2.5-32b, qwen2.5-7b, llama-3-70b).")
@click.option("--gpus", required=True, help="GPU memory sizes in GiB, in chain order, e.g. 24,24.")
@click.option("--quant", default="bfloat16", show_default=True,
              type=click.Choice(["float32", "bfloat16", "float16", "int8", "int4"]))
@click.option("--context", default=8192, show_default=True, type=int, help="KV tokens each stage must hold.")
@click.option("--reserve", default=1.5, show_default=True, type=float, help="GiB per GPU for CUDA context and activations.")
@click.option("--draft-gib", default=0.0, show_default=True, type=float, help="Extra GiB on stage 0 for a draft model.")
def plan(model, shape, gpus, quant, context, reserve, draft_gib):
    """Plan the layer split over GPUs; refuse a plan that does not fit."""
    from dllm import plan as planner
    from dllm.config import ModelConfig

    if bool(model) == bool(shape):
        raise click.UsageError("give exactly one of --model or --shape")
    if shape:
        cfg = planner.shape_config(shape)
    else:
        from dllm.fetch import model_path

        cfg = ModelConfig.from_dir(model_path(model))
    try:
        sizes = [float(g) for g in gpus.split(",")]
    except ValueError:
        raise click.BadParameter(f"--gpus {gpus!r}: expected comma-separated GiB values") from None
    stages = planner.plan(cfg, sizes, quant, context, reserve, draft_gib)
    click.echo(planner.format_plan(cfg, stages, quant, context))
    click.echo("split: " + ",".join(f"{s.layers[0]}:{s.layers[1]}" for s in stages))


@main.command()
@click.argument("src")
@click.argument("out")
@click.option("--stages", default=1, show_default=True, type=int, help="Even split into N per-stage shards.")
@click.option("--split", default=None, help="Explicit layer ranges, e.g. 0:12,12:24.")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option("--quant", default=None, type=click.Choice(["int8", "int4"]),
              help="Store the matmul weights quantized: int8 per row, or int4 in groups of --group columns.")
@click.option("--group", default=32, show_default=True, type=int, help="int4 group size: 32, 64, 128 or 256.")
@click.option("--importance", default=None, type=click.Path(dir_okay=False),
              help="int4: weigh rounding by this importance.safetensors (default: the source dir's own).")
@click.option("--calibrate", is_flag=True,
              help="int4: with no importance at hand, measure it first (a dense pass over the calibration text).")
def convert(src, out, stages, split, dtype, quant, group, importance, calibrate):
    """Convert an HF directory or a GGUF file into per-stage safetensors shards + manifest."""
    from dllm.convert import convert as do_convert

    m = do_convert(src, out, stages=stages, split=split, dtype=dtype, quant=quant, group=group,
                   importance=importance, calibrate=calibrate)
    click.echo(f"wrote {out}: {len(m.stages)} stage(s) {m.split()}, dtype {m.dtype}, quant {_quant_text(m.quant)}")


def _quant_text(q: dict | None) -> str:
    """A manifest's "quant" entry as the convert summaries print it."""
    if not q:
        return "none"
    if q["mode"] != "int4":
        return q["mode"]
    return f"int4 (group {q['group']}, " + ("activation-weighted)" if q.get("importance_sha256") else "round to nearest)")


@main.command()
@click.argument("name")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]))
def fetch(name, dtype):
    """Download, verify and convert a known model (smollm2, qwen-coder-0.5b, qwen-coder-1.5b)."""
    from dllm.fetch import ensure_model

    click.echo(str(ensure_model(name, dtype=dtype)))


@main.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
def calibrate(model_dir):
    """Measure the activation importance int4 weighs its rounding by (a whole dense model dir;
    dllm fetch does it for the models it knows). Writes MODEL_DIR/importance.safetensors."""
    from dllm.model.calibrate import write_importance

    try:
        click.echo(str(write_importance(model_dir)))
    except ValueError as e:
        raise click.ClickException(str(e)) from None


@main.command()
@click.option("--model", "models", multiple=True, default=[DEFAULT_MODEL], show_default=True)
@click.option("--prompt-tokens", default=128, show_default=True, type=int)
@click.option("--new-tokens", default=64, show_default=True, type=int)
@click.option("--dtype", default="float32", show_default=True)
@click.option("--threads", default=2, show_default=True, type=int)
@click.option("--no-hf", is_flag=True, help="Skip the HF transformers baseline.")
@click.option("--out", default="bench/results/runtime-cpu.json", show_default=True)
@click.option("--gpu", is_flag=True, help="The GPU benchmark (bench/gpu.py): --shape, --dtype bf16|int4|both.")
@click.option("--shape", default="qwen2.5-32b", show_default=True, help="GPU benchmark: reference shape.")
@click.option("--random-weights", is_flag=True, help="GPU benchmark: random weights (the only mode; speed is value-free).")
def bench(models, prompt_tokens, new_tokens, dtype, threads, no_hf, out, gpu, shape, random_weights):
    """Prefill/decode tokens/s against HF transformers and the memory-bandwidth roofline."""
    if gpu:
        from bench.gpu import main as gpu_bench

        argv = ["--shape", shape, "--dtype", dtype if dtype in ("bf16", "int4", "both") else "both",
                "--new-tokens", str(new_tokens)] + (["--no-hf"] if no_hf else [])
        if out != "bench/results/runtime-cpu.json":
            argv += ["--out", out]
        return gpu_bench(argv)
    from bench.runtime_cpu import run_bench

    run_bench(list(models), prompt_tokens=prompt_tokens, new_tokens=new_tokens, dtype=dtype,
              threads=threads, hf=not no_hf, out=out)


def _add_pay_command() -> None:
    """`dllm pay`: the x402 client (pay a 402 and retry); its dependencies are optional."""
    try:
        from dllm.pay.client import pay_command
    except ImportError:
        return
    main.add_command(pay_command)


_add_pay_command()

if __name__ == "__main__":
    main()
