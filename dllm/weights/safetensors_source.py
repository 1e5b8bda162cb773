"""Read an HF checkpoint directory tensor by tensor, with the same interface as GGUFSource.

The directory holds config.json plus model.safetensors, or shards listed in
model.safetensors.index.json. Tensors are read lazily through safetensors' mmap, so a converter
holds one tensor at a time however large the model is.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from dllm.config import ModelConfig
from dllm.errors import WeightsError
from dllm.weights.loader import weight_map

# Files a converted model dir needs besides weights; copied verbatim when the source has them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
# Buffers some exporters save that are not parameters (recomputed from the config at load time).
_SKIP_SUFFIXES = (".rotary_emb.inv_freq",)


class HFDirSource:
    """One HF directory: ``.config``, ``.tensor_names()``, ``.load(name)`` in the checkpoint's dtype."""

    kind = "hf"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = ModelConfig.from_dir(self.path)
        with open(self.path / "config.json") as f:
            self.hf_config = json.load(f)
        self._file_of = weight_map(self.path)
        self._handles: dict[str, object] = {}
        names = [n for n in self._file_of if not n.endswith(_SKIP_SUFFIXES)]
        if self.config.tie_word_embeddings:
            names = [n for n in names if n != "lm_head.weight"]  # tied: the embedding is the head
        elif "lm_head.weight" not in names:
            raise WeightsError(f"{self.path}: tie_word_embeddings is false but there is no lm_head.weight")
        self._names = names

    def tensor_names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def check_supported(self) -> None:
        """safetensors holds plain float tensors: nothing to reject up front."""

    def load(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def tensors(self, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.tensor_names() if names is None else names:
            yield name, self.load(name)

    def weight_files(self) -> list[Path]:
        return [self.path / f for f in sorted(set(self._file_of.values()))]

    def tokenizer_files(self) -> dict[str, bytes]:
        """filename -> bytes of the tokenizer/generation files present in the directory."""
        return {n: (self.path / n).read_bytes() for n in TOKENIZER_FILES if (self.path / n).is_file()}

    def _handle(self, name: str):
        file = self._file_of.get(name)
        if file is None:
            raise WeightsError(f"{self.path} has no tensor {name!r}")
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(self.path / file, framework="pt")
            except Exception as e:  # SafetensorError / OSError on a missing or corrupt shard
                raise WeightsError(f"{self.path / file}: cannot open safetensors shard: {e}") from None
        return self._handles[file]
