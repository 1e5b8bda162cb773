"""Real models split over real stage processes: 2- and 3-stage chains equal the single process."""
import pytest

from dllm.config import ModelConfig
from dllm.launch import chain_engine, even_split, local_engine
from dllm.net.local_cluster import LocalCluster
from dllm.sampling import SamplingParams
from dllm.spec.drafters import NgramDrafter

from .models import model_dir_or_skip


@pytest.mark.parametrize("name", ["smollm2", "qwen-coder-0.5b"])
def test_real_model_chains_equal_single_process(name):
    from dllm.tokenizer import Tokenizer

    model_dir = model_dir_or_skip(name)
    tok = Tokenizer.from_dir(model_dir)
    prompts = [tok.encode_chat([{"role": "user", "content": "Write a haiku about distributed systems."}]),
               tok.encode("def quicksort(xs):\n")]
    n = ModelConfig.from_dir(model_dir).num_layers
    # the 0.5B's 4 runs x 2 prompts of 64 steps, 3 of them over 1-thread stage processes, were
    # ~200 s of CI on this 2-core machine; 32 steps still cross every stage boundary each step
    params = SamplingParams(max_tokens=64 if name == "smollm2" else 32, ignore_eos=True)
    single = local_engine(model_dir, kv_tokens=512)
    ref = [single.generate_all(p, params) for p in prompts]
    del single
    split3 = even_split(n, 3)
    # stages: [a:b] for the 3-stage chain's middle and last, and [a:n] for the 2-stage chain
    with LocalCluster(model_dir, [split3[1], split3[2], (split3[1][0], n)], threads=1, kv_tokens=512) as c:
        for peers in ([c.addresses[2]], [c.addresses[0], c.addresses[1]]):
            eng = chain_engine(model_dir, [str(a) for a in peers], split3[0], kv_tokens=512)
            try:
                assert [eng.generate_all(p, params) for p in prompts] == ref, f"{len(peers) + 1}-stage chain differs"
            finally:
                eng.pipeline.close()
        # speculation across the real chain keeps the tokens too
        eng = chain_engine(model_dir, [str(c.addresses[0]), str(c.addresses[1])], split3[0], kv_tokens=512,
                           drafter=NgramDrafter(), spec_depth=4)
        try:
            assert [eng.generate_all(p, params) for p in prompts] == ref
        finally:
            eng.pipeline.close()
