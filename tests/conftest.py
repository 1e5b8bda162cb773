import os

import pytest
import torch

# Kernel tests run through triton's interpreter on a CPU machine; it must be on before anything
# imports the kernels (the runtime imports them, and @triton.jit chooses at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY_ARCHS = ["llama", "mistral", "qwen2", "qwen3"]


def make_tiny_hf(arch: str, path, seed: int = 0, **overrides):
    """A random-weight HF model of ``arch`` saved as safetensors in ``path``; returns the HF model."""
    import transformers

    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[arch]
    kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=512,
              tie_word_embeddings=arch in ("qwen2", "qwen3"), rms_norm_eps=1e-6)
    if arch == "qwen3":
        kw["head_dim"] = 24  # qwen3 decouples head_dim from hidden/heads
    if arch == "mistral":
        kw["sliding_window"] = 9  # short enough that tests cross it
    kw.update(overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cls(**kw), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.25)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """arch -> (model_dir, hf_model), built once per test session."""
    out = {}
    for arch in TINY_ARCHS:
        d = tmp_path_factory.mktemp(f"tiny-{arch}")
        out[arch] = (d, make_tiny_hf(arch, d))
    return out
