"""Build an Engine from a model directory: the coordinator's stage plus the rest of the split.

One place decides how a model directory becomes running stages, so the CLI, the server and the
benchmarks all build the same thing.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dllm.config import ModelConfig
from dllm.convert import check_split, even_split
from dllm.convert import parse_split as split_ranges
from dllm.engine import Engine, LocalPipeline
from dllm.errors import ConfigError, WeightsError
from dllm.model.runner import StageRunner
from dllm.model.stage import StageModel, parse_dtype
from dllm.weights.manifest import Manifest

QUANT_CHOICES = ("none", "int8", "int4")  # --quant of run / stage / node (--dtype adds "auto" to the dtypes)


def resolve_precision(dtype: str | torch.dtype = "auto", quant: str | None = None, device: str | torch.device = "cpu",
                      model_dir: str | Path | None = None) -> tuple[str, str | None]:
    """The (activation dtype name, weight quantization or None) a model runs in, from --dtype
    and --quant; the one place that decides it for run, stage, node, the drafter and LocalCluster.

    ``quant``: None (not given), "none" (dense), "int8" or "int4". An explicit value wins.
    Otherwise a quantized checkpoint (manifest "quant" in ``model_dir``) runs as stored, and
    ``dtype="auto"`` on CPU means int4 weights (int8 when a matmul shape does not fit the int4
    kernel: an input width not a multiple of 32, an output not of 16). ``dtype="auto"`` is float32 activations on CPU
    (the weight-only kernels keep them fp32 around the matmul) and bfloat16 on CUDA, where
    ``quant`` stays as given. An explicit dtype runs dense unless --quant says otherwise.
    A quantized checkpoint asked for another mode (or "none") raises WeightsError."""
    if quant not in (None,) + QUANT_CHOICES:
        raise ValueError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANT_CHOICES)}")
    on_cpu = torch.device(device).type == "cpu"
    auto = isinstance(dtype, str) and dtype == "auto"
    name = ("float32" if on_cpu else "bfloat16") if auto else str(parse_dtype(dtype)).removeprefix("torch.")
    manifest = Manifest.load(model_dir) if model_dir is not None else None
    stored = manifest.quant["mode"] if manifest is not None and manifest.quant else None
    if quant is not None:
        mode = None if quant == "none" else quant
        if stored is not None and mode != stored:
            raise WeightsError(f"{model_dir} is a {stored} checkpoint; it cannot run "
                               + (f"as {mode} (convert the original weights with --quant {mode})" if mode
                                  else "unquantized (--quant none): convert the original weights without --quant"))
        return name, mode
    if stored is not None:
        return name, stored
    if auto and on_cpu:
        return name, "int4" if model_dir is None or _int4_fits(ModelConfig.from_dir(model_dir)) else "int8"
    return name, None


def _int4_fits(cfg: ModelConfig) -> bool:
    """Every matmul's input width (hidden, heads x head_dim, intermediate) takes an int4 group,
    and every output height (qkv, o, gate_up, down, head) is a multiple of the kernel's 16 rows."""
    inputs = (cfg.hidden_size, cfg.q_size, cfg.intermediate_size)
    outputs = (cfg.q_size + 2 * cfg.kv_size, cfg.hidden_size, 2 * cfg.intermediate_size, cfg.vocab_size)
    return all(n % 32 == 0 for n in inputs) and all(n % 16 == 0 for n in outputs)


def parse_split(text: str, num_layers: int) -> list[tuple[int, int]]:
    """'0:12,12:24' -> [(0, 12), (12, 24)], checked to cover 0..num_layers contiguously."""
    return check_split(split_ranges(text), num_layers)


def default_split(model_dir: str | Path, num_layers: int, stages: int) -> list[tuple[int, int]]:
    """The manifest's split when it has that many stages, else an even one."""
    m = Manifest.load(model_dir)
    if m is not None and len(m.stages) == stages:
        return [tuple(s) for s in m.split()]
    return even_split(num_layers, stages)


def local_engine(model_dir: str | Path, stages: int = 1, split: list[tuple[int, int]] | None = None,
                 dtype: str | torch.dtype = "float32", kv_tokens: int = 8192, block_size: int = 16,
                 eos_ids=None, quant: str | None = None, cpu_layout: str = "batched", **engine_kw) -> Engine:
    """All stages in this process (stage 0 holds embedding + head + its layers).
    ``dtype`` / ``quant`` as resolve_precision takes them ("auto" included). ``cpu_layout``
    (StageModel.optimize_cpu_layout): "batched" for everything; "single" for an engine that runs
    one sequence at a time and verifies no drafts (its one-row results round differently from
    the same rows in a batch), the fastest fp32 decode on CPU: it gets ``max_seqs=1``."""
    if cpu_layout == "single":
        if engine_kw.get("drafter") is not None:
            raise ConfigError("the 'single' CPU layout cannot verify drafts: a verified row must equal the same "
                              "row decoded alone, which only the 'batched' layout guarantees")
        if engine_kw.setdefault("max_seqs", 1) != 1:
            raise ConfigError("the 'single' CPU layout runs one sequence at a time (max_seqs=1)")
    config = ModelConfig.from_dir(model_dir)
    dtype, quant = resolve_precision(dtype, quant, model_dir=model_dir)
    split = split or default_split(model_dir, config.num_layers, stages)
    check_split(split, config.num_layers)
    head = StageModel.from_pretrained(model_dir, layers=range(*split[0]), embed=True, head=True, dtype=dtype,
                                      config=config, quant=quant, cpu_layout=cpu_layout)
    rest = [StageModel.from_pretrained(model_dir, layers=range(a, b), embed=False, head=False, dtype=dtype,
                                       config=config, quant=quant, cpu_layout=cpu_layout)
            for a, b in split[1:]]
    runners = [StageRunner.for_tokens(s, kv_tokens, block_size) for s in rest]
    return Engine(StageRunner.for_tokens(head, kv_tokens, block_size), LocalPipeline(runners) if runners else None,
                  eos_ids=config.eos_token_ids if eos_ids is None else eos_ids, **engine_kw)


def chain_engine(model_dir: str | Path, peers, split_first: tuple[int, int] | None = None, *,
                 identity=None, dtype: str | torch.dtype = "float32", kv_tokens: int = 8192, block_size: int = 16,
                 emulate_rtt_ms: float = 0.0, deadline_s: float = 30.0, eos_ids=None, quant: str | None = None,
                 **engine_kw) -> Engine:
    """Coordinator: embedding + head + layers ``split_first`` here, the rest over RemoteChain.
    ``dtype`` / ``quant`` (resolve_precision) apply to this process only: each stage server
    runs the precision it was started with."""
    from dllm.net.chain import RemoteChain
    from dllm.net.crypto import Identity

    config = ModelConfig.from_dir(model_dir)
    dtype, quant = resolve_precision(dtype, quant, model_dir=model_dir)
    if split_first is None:
        m = Manifest.load(model_dir)
        split_first = tuple(m.split()[0]) if m is not None and len(m.stages) > 1 else (0, 0)
    head = StageModel.from_pretrained(model_dir, layers=range(*split_first), embed=True, head=True, dtype=dtype,
                                      config=config, quant=quant)
    chain = RemoteChain(identity or Identity.generate(), list(peers), split_first[1], config.num_layers,
                        emulate_rtt_ms=emulate_rtt_ms, deadline_s=deadline_s)
    return Engine(StageRunner.for_tokens(head, kv_tokens, block_size), chain,
                  eos_ids=config.eos_token_ids if eos_ids is None else eos_ids, **engine_kw)
