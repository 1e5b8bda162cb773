"""Memory planner (pure Python)."""
import pytest

from dllm import plan as P
from dllm.errors import ConfigError


def test_qwen32b_int4_on_two_l4_with_8k_context():
    c = P.shape_config("qwen2.5-32b")
    stages = P.plan(c, [24, 24], "int4", context=8192)
    assert [s.layers for s in stages] == [(0, 32), (32, 64)]
    for s in stages:
        assert s.total_bytes <= 24 * P.GIB
        assert P.max_kv_tokens(c, s) >= 8192


def test_llama70b_int4_on_four_cards_uses_all_four():
    c = P.shape_config("llama-3-70b")
    stages = P.plan(c, [24] * 4, "int4", context=8192)
    assert len(stages) == 4 and stages[-1].layers[1] == 80
    assert max(s.layers[1] - s.layers[0] for s in stages) - min(s.layers[1] - s.layers[0] for s in stages) <= 1
    assert all(s.total_bytes <= 24 * P.GIB for s in stages)


def test_bf16_32b_on_two_l4_is_refused_with_numbers():
    with pytest.raises(ConfigError, match=r"does not fit: 64 layers need .* GiB .*room for \d+ layers"):
        P.plan(P.shape_config("qwen2.5-32b"), [24, 24], "bfloat16")


def test_uneven_cards_get_layers_by_capacity():
    c = P.shape_config("qwen2.5-32b")
    stages = P.plan(c, [8, 24, 24], "int4", context=4096)
    n = [s.layers[1] - s.layers[0] for s in stages]
    assert sum(n) == 64 and n[0] < n[1] and all(s.total_bytes <= s.gpu_gib * P.GIB for s in stages)


def test_layer_bytes_match_parameter_count():
    c = P.shape_config("qwen2.5-32b")
    # 64 layers x layer params + embedding + head ~ 32.8e9 parameters for Qwen2.5-32B
    total = 64 * P.layer_params(c) + 2 * c.vocab_size * c.hidden_size
    assert 32.0e9 < total < 33.5e9


def test_bad_inputs():
    c = P.shape_config("qwen2.5-7b")
    with pytest.raises(ConfigError, match="unknown quantization"):
        P.plan(c, [24], "int3")
    with pytest.raises(ConfigError, match="positive"):
        P.plan(c, [0], "int4")
    with pytest.raises(ConfigError, match="unknown shape"):
        P.shape_config("gpt-5")
