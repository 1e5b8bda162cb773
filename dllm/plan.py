"""Memory planner: split a model's layers over GPUs so weights + KV fit each card. Pure Python.

Per stage: weights of its layers (+ embedding and head on stage 0, the coordinator), KV for
``context`` tokens of its layers, and a fixed reserve for the CUDA context, activations and
workspace. Layers go to cards in order, as many as fit, so the first stage (which also holds the
embedding, head and optionally a draft model) gets fewer layers. A plan that does not fit is
refused with the numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

from dllm.config import ModelConfig
from dllm.errors import ConfigError

GIB = 1 << 30

# Reference shapes for planning and random-weight benchmarks (the field names of config.json).
SHAPES = {
    "qwen2.5-32b": dict(model_type="qwen2", hidden_size=5120, num_hidden_layers=64, num_attention_heads=40,
                        num_key_value_heads=8, intermediate_size=27648, vocab_size=152064, tie_word_embeddings=False,
                        rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768),
    "llama-3-70b": dict(model_type="llama", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, intermediate_size=28672, vocab_size=128256, tie_word_embeddings=False,
                        rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192),
}

# bits per weight of a matmul weight: int4 group-wise with an fp16 scale and zero per 128 weights
BITS = {"float32": 32.0, "bfloat16": 16.0, "float16": 16.0, "int8": 8.0 + 16.0 / 4096, "int4": 4.0 + 32.0 / 128}


def shape_config(name: str) -> ModelConfig:
    if name not in SHAPES:
        raise ConfigError(f"unknown shape {name!r}; known: {', '.join(sorted(SHAPES))}")
    return ModelConfig.from_hf(SHAPES[name])


def layer_params(c: ModelConfig) -> int:
    """Matmul weights of one decoder layer (norms and biases are negligible and counted apart)."""
    return c.hidden_size * (c.q_size + 2 * c.kv_size) + c.q_size * c.hidden_size + 3 * c.hidden_size * c.intermediate_size


def layer_bytes(c: ModelConfig, quant: str) -> int:
    small = (2 * c.hidden_size + (c.q_size + 2 * c.kv_size if c.qkv_bias else 0)) * 2  # norms, biases in fp16
    return int(layer_params(c) * BITS[quant] / 8) + small


def embed_head_bytes(c: ModelConfig, quant: str) -> int:
    """Embedding kept in 16-bit (a lookup reads one row); an untied head is quantized like the layers."""
    emb = c.vocab_size * c.hidden_size * 2
    head = 0 if c.tie_word_embeddings else int(c.vocab_size * c.hidden_size * BITS[quant] / 8)
    return emb + head + c.hidden_size * 2


def kv_bytes_per_token(c: ModelConfig, layers: int, kv_dtype_bytes: int = 2) -> int:
    return layers * 2 * c.num_kv_heads * c.head_dim * kv_dtype_bytes


@dataclass
class StagePlan:
    gpu_gib: float
    layers: tuple[int, int]
    weight_bytes: int
    kv_bytes: int
    reserve_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.reserve_bytes


def plan(c: ModelConfig, gpus_gib: list[float], quant: str = "bfloat16", context: int = 8192,
         reserve_gib: float = 1.5, coordinator_extra_gib: float = 0.0) -> list[StagePlan]:
    """Split the layers over all given GPUs (in chain order) as evenly as their memory allows.

    Decode time per stage grows with its layers and the slowest stage sets the pace, so layers
    are handed out one at a time to the card holding the fewest that still has room; stage 0
    also carries the embedding, the head and any draft model. ConfigError if it cannot fit."""
    if quant not in BITS:
        raise ConfigError(f"unknown quantization {quant!r}; choose one of {', '.join(BITS)}")
    if not gpus_gib or any(g <= 0 for g in gpus_gib):
        raise ConfigError(f"GPU sizes must be positive GiB values, got {gpus_gib}")
    lb = layer_bytes(c, quant)
    kvb = kv_bytes_per_token(c, 1) * context
    per_layer = lb + kvb
    reserve = int(reserve_gib * GIB)
    extra = [embed_head_bytes(c, quant) + int(coordinator_extra_gib * GIB) if i == 0 else 0 for i in range(len(gpus_gib))]
    caps = [max(0, (int(g * GIB) - reserve - e) // per_layer) for g, e in zip(gpus_gib, extra)]
    if sum(caps) < c.num_layers:
        total = sum(extra) + len(gpus_gib) * reserve + c.num_layers * per_layer
        raise ConfigError(
            f"does not fit: {c.num_layers} layers need {total / GIB:.1f} GiB in all ({lb / GIB:.2f} GiB weights + "
            f"{kvb / GIB:.3f} GiB KV per layer at {context} tokens, {extra[0] / GIB:.2f} GiB embedding/head on "
            f"stage 0, {reserve_gib} GiB reserve per GPU) but the GPUs hold {sum(gpus_gib):.0f} GiB "
            f"(room for {sum(caps)} layers); add GPUs, quantize, or shorten the context")
    counts = [0] * len(gpus_gib)
    for _ in range(c.num_layers):
        # fewest layers first; on a tie prefer later cards, since stage 0 also runs embedding, head and drafts
        i = min((i for i in range(len(counts)) if counts[i] < caps[i]), key=lambda i: (counts[i], -i))
        counts[i] += 1
    stages, at = [], 0
    for g, n, e in zip(gpus_gib, counts, extra):
        stages.append(StagePlan(g, (at, at + n), e + n * lb, n * kvb, reserve))
        at += n
    return stages


def max_kv_tokens(c: ModelConfig, s: StagePlan) -> int:
    """KV tokens the stage could hold if all its free memory went to KV."""
    n = s.layers[1] - s.layers[0]
    if n == 0:
        return 0
    free = int(s.gpu_gib * GIB) - s.weight_bytes - s.reserve_bytes
    return free // kv_bytes_per_token(c, n)


def format_plan(c: ModelConfig, stages: list[StagePlan], quant: str, context: int) -> str:
    lines = [f"{c.model_type} {c.num_layers} layers, hidden {c.hidden_size}, {quant}, KV for {context} tokens per stage",
             f"{'stage':>5} {'gpu GiB':>8} {'layers':>9} {'weights':>9} {'KV':>8} {'reserve':>8} {'total':>8} {'free':>7}"
             f" {'max KV tokens':>14}"]
    for i, s in enumerate(stages):
        lines.append(f"{i:>5} {s.gpu_gib:>8.0f} {s.layers[0]:>4}:{s.layers[1]:<4} {s.weight_bytes / GIB:>8.2f}G "
                     f"{s.kv_bytes / GIB:>7.2f}G {s.reserve_bytes / GIB:>7.2f}G {s.total_bytes / GIB:>7.2f}G "
                     f"{s.gpu_gib - s.total_bytes / GIB:>6.2f}G {max_kv_tokens(c, s):>14,}")
    return "\n".join(lines)
