"""Helpers for tests on real downloaded models: fetch or skip, and the HF oracle on the same GGUF."""
import functools

import pytest
import torch


def model_dir_or_skip(name: str):
    from dllm.errors import FetchError
    from dllm.fetch import ensure_model

    try:
        return ensure_model(name)
    except FetchError as e:
        pytest.skip(f"{name} unavailable: {e}")


@functools.lru_cache(maxsize=2)
def hf_gguf_model(name: str):
    """transformers' own GGUF loader (dequantize + un-permute in its code, not ours)."""
    import transformers
    from dllm.fetch import ensure_gguf

    path = ensure_gguf(name)
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, torch_dtype=torch.float32).eval()
