"""ModelConfig: the shape of a decoder-only transformer, read from the checkpoint.

Everything model-specific (dims, heads, rope, norms, biases) comes from an HF-style
``config.json``; a GGUF file is first turned into that dict by ``dllm.weights.gguf_import``.
Nothing here knows about a particular model.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dllm.errors import ConfigError

# HF model_type -> what differs in the block. Everything else is shared llama structure.
SUPPORTED_ARCHS = {
    "llama": dict(qkv_bias=False, qk_norm=False),
    "mistral": dict(qkv_bias=False, qk_norm=False),
    "qwen2": dict(qkv_bias=True, qk_norm=False),
    "qwen3": dict(qkv_bias=False, qk_norm=True),
}


@dataclass
class ModelConfig:
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self):
        if self.model_type not in SUPPORTED_ARCHS:
            raise ConfigError(
                f"unsupported architecture {self.model_type!r}; supported: {', '.join(sorted(SUPPORTED_ARCHS))}"
            )
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config field {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        """Build from an HF config.json dict (transformers' field names)."""
        model_type = d.get("model_type")
        if model_type is None:
            archs = d.get("architectures") or []
            raise ConfigError(f"config has no model_type (architectures={archs}); supported: {', '.join(sorted(SUPPORTED_ARCHS))}")
        if model_type not in SUPPORTED_ARCHS:
            raise ConfigError(f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(SUPPORTED_ARCHS))}")
        try:
            hidden = int(d["hidden_size"])
            heads = int(d["num_attention_heads"])
            eos = d.get("eos_token_id")
            eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
            flags = dict(SUPPORTED_ARCHS[model_type])
            if d.get("attention_bias"):  # llama-family checkpoints may declare q/k/v/o bias
                flags["qkv_bias"] = True
            return cls(
                model_type=model_type,
                hidden_size=hidden,
                num_layers=int(d["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                intermediate_size=int(d["intermediate_size"]),
                vocab_size=int(d["vocab_size"]),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(d.get("rope_theta", 10000.0)),
                rope_scaling=d.get("rope_scaling"),
                max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                sliding_window=d.get("sliding_window") if d.get("use_sliding_window", model_type == "mistral") else None,
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=eos_ids,
                **flags,
            )
        except KeyError as e:
            raise ConfigError(f"config.json is missing required field {e.args[0]!r}") from None

    def to_hf(self) -> dict:
        """The HF config.json dict for this shape (what tools/convert writes)."""
        arch_names = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                      "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
        d = {
            "architectures": [arch_names[self.model_type]],
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else self.eos_token_ids,
        }
        if self.model_type == "llama" and self.qkv_bias:
            d["attention_bias"] = True
        if self.sliding_window:
            d["sliding_window"] = self.sliding_window
            d["use_sliding_window"] = True
        return d

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        p = Path(path) / "config.json"
        if not p.is_file():
            raise ConfigError(f"no config.json in {path}")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p} is not valid JSON: {e}") from None
        return cls.from_hf(d)

    def to_dict(self) -> dict:
        return asdict(self)
