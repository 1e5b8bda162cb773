"""Real checkpoints (SmolLM2-135M, Qwen2.5-Coder-0.5B) against HF transformers loading the same GGUF.

The oracle dequantizes and un-permutes with its own code, so this also checks our GGUF import.
Greedy tokens must be identical for 64 new tokens and last-position logits within 1e-3 (fp32).
"""
import pytest
import torch

from dllm.engine import Engine
from dllm.model.runner import StageRunner
from dllm.model.stage import StageModel
from dllm.sampling import SamplingParams

from .models import hf_gguf_model, model_dir_or_skip

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Write a Python function that reverses a string."}],
]
RAW = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


@pytest.fixture(scope="module", params=["smollm2", "qwen-coder-0.5b"])
def pair(request):
    name = request.param
    model_dir = model_dir_or_skip(name)
    return name, model_dir, StageModel.from_pretrained(model_dir), hf_gguf_model(name)


def prompts_for(model_dir):
    from dllm.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir)
    return [tok.encode_chat(m) for m in PROMPTS] + [tok.encode(RAW)]


def hf_greedy(hf, ids, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                          pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


def test_greedy_64_tokens_identical_to_hf(pair):
    name, model_dir, stage, hf = pair
    hf.generation_config.eos_token_id = None
    for ids in prompts_for(model_dir):
        engine = Engine(StageRunner.for_tokens(stage, 1024))
        ours = engine.generate_all(ids, SamplingParams(max_tokens=64, ignore_eos=True))
        assert ours == hf_greedy(hf, ids, 64), f"{name}: greedy tokens differ from HF for prompt of {len(ids)} tokens"


def test_last_position_logits_within_1e3(pair):
    name, model_dir, stage, hf = pair
    for ids in prompts_for(model_dir):
        runner = StageRunner.for_tokens(stage, 1024)
        from dllm.batch import SeqChunk

        ours = stage.logits(runner.forward(stage.embed(torch.tensor(ids)), [SeqChunk(0, 0, len(ids))]))[-1]
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0, -1].float()
        assert (ours - ref).abs().max().item() < 1e-3, name
