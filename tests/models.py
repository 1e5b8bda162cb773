"""Helpers for tests on real downloaded models: fetch or skip, and the HF oracle on the same GGUF."""
import functools

import pytest
import torch


def gguf_or_skip(name: str):
    """The assembled GGUF of a known model; skip only when the download itself fails
    (a sha256 mismatch or a broken assembly is a failure, not a skip)."""
    from dllm.errors import FetchError
    from dllm.fetch import ensure_gguf

    try:
        return ensure_gguf(name)
    except FetchError as e:
        if str(e).startswith("download failed"):
            pytest.skip(f"cannot fetch {name}: {e}")
        raise


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
