"""GGUF import: names, layout, dequantization and llama q/k un-permute against the HF oracle.

The oracle is transformers' own GGUF loader (AutoModelForCausalLM.from_pretrained(dir,
gguf_file=...)), which dequantizes with gguf-py and reverses llama.cpp's permutation itself.
Tiny hand-written GGUFs (gguf.GGUFWriter) cover the error paths in milliseconds.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from dllm.errors import ConfigError, UnsupportedQuantError, WeightsError
from dllm.weights.gguf_import import GGUFSource, can_dequantize, hf_tensor_name, unpermute_rope_rows

from .models import gguf_or_skip as fetch_or_skip

REAL_MODELS = ["smollm2", "qwen-coder-0.5b"]  # llama (permuted q/k, tied head) and qwen2 (biases, own head)




@pytest.fixture(scope="module", params=REAL_MODELS)
def real(request):
    """(GGUFSource, HF model loaded from the same GGUF) for one real model."""
    transformers = pytest.importorskip("transformers")
    src = GGUFSource(fetch_or_skip(request.param))
    # transformers opens the file with gguf.GGUFReader; hand it our already-parsed reader so the
    # vocabulary is parsed once (the oracle's dequantize/permute/name code still runs in full).
    orig = gguf.GGUFReader
    gguf.GGUFReader = lambda *a, **k: src.reader
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            str(src.path.parent), gguf_file=src.path.name, dtype=torch.float32)
    finally:
        gguf.GGUFReader = orig
    yield src, hf
    del hf


def test_every_tensor_matches_hf(real):
    src, hf = real
    sd = hf.state_dict()
    ours = set(src.tensor_names())
    expect = set(sd) - ({"lm_head.weight"} if src.config.tie_word_embeddings else set())
    assert ours == expect
    for name in src.tensor_names():
        got = src.load(name)
        assert got.dtype == torch.float32 and got.shape == sd[name].shape, name
        assert torch.equal(got, sd[name]), f"{name}: max diff {(got - sd[name]).abs().max()}"


def test_config_matches_hf(real):
    src, hf = real
    c, h = src.config, hf.config
    assert c.model_type == h.model_type
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.intermediate_size, c.vocab_size) == (
        h.hidden_size, h.num_hidden_layers, h.num_attention_heads, h.num_key_value_heads, h.intermediate_size, h.vocab_size)
    assert c.head_dim == (getattr(h, "head_dim", None) or h.hidden_size // h.num_attention_heads)
    assert c.rms_norm_eps == h.rms_norm_eps
    theta = h.rope_parameters["rope_theta"] if getattr(h, "rope_parameters", None) else h.rope_theta
    assert c.rope_theta == theta
    assert c.max_position_embeddings == h.max_position_embeddings
    assert c.tie_word_embeddings == h.tie_word_embeddings
    assert c.bos_token_id == h.bos_token_id
    assert c.eos_token_ids == [h.eos_token_id]
    assert c.qkv_bias == (c.model_type == "qwen2")


# ---- pure helpers ------------------------------------------------------------------------------

def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.LlamaModel.permute, verbatim."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("n_head,head_dim,cols", [(9, 64, 576), (3, 64, 576), (2, 6, 5), (4, 2, 0)])
def test_unpermute_inverts_llamacpp_permute(n_head, head_dim, cols):
    w = np.random.default_rng(0).standard_normal((n_head * head_dim, cols) if cols else (n_head * head_dim,))
    assert np.array_equal(unpermute_rope_rows(_llamacpp_permute(w, n_head), n_head), w)


def test_unpermute_rejects_odd_rows():
    with pytest.raises(WeightsError, match="un-permute"):
        unpermute_rope_rows(np.zeros((9, 4)), 3)


def test_name_mapping():
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    assert hf_tensor_name("output_norm.weight") == "model.norm.weight"
    assert hf_tensor_name("blk.7.attn_q.bias") == "model.layers.7.self_attn.q_proj.bias"
    assert hf_tensor_name("blk.0.attn_output.weight") == "model.layers.0.self_attn.o_proj.weight"
    assert hf_tensor_name("blk.3.attn_k_norm.weight") == "model.layers.3.self_attn.k_norm.weight"
    assert hf_tensor_name("blk.1.ffn_norm.weight") == "model.layers.1.post_attention_layernorm.weight"
    assert hf_tensor_name("blk.2.ffn_down.weight") == "model.layers.2.mlp.down_proj.weight"
    assert hf_tensor_name("blk.0.ffn_gate_exps.weight") is None


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_required_types_dequantize(qtype):
    assert can_dequantize(qtype)


# ---- tiny crafted GGUFs ------------------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, FFN, VOCAB = 64, 4, 2, 96, 32


def write_gguf(path, tensors: dict[str, tuple[np.ndarray, Q]], arch: str = "llama", extra=None,
               theta: float = 10000.0) -> str:
    """A minimal one-layer GGUF: metadata for ModelConfig, extra(writer) keys, the (array, type) tensors."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(theta)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if extra is not None:
        extra(w)
    for name, (arr, qtype) in tensors.items():
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(name, arr.astype(np.float32 if qtype == Q.F32 else np.float16))
        else:  # raw bytes of the quantized type; the writer recovers the element shape
            data = arr if arr.dtype == np.uint8 else gguf.quants.quantize(arr.astype(np.float32), qtype)
            w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def _rand(*shape):
    return np.random.default_rng(1).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0])
def test_crafted_types_roundtrip(tmp_path, qtype):
    """Each quantized [out, in] tensor loads as dequantize(quantize(x)) in HF layout."""
    x = _rand(FFN, HIDDEN)
    path = write_gguf(tmp_path / "t.gguf", {"token_embd.weight": (_rand(VOCAB, HIDDEN), Q.F32),
                                             "blk.0.ffn_up.weight": (x, qtype)})
    got = GGUFSource(path).load("model.layers.0.mlp.up_proj.weight")
    want = x if qtype == Q.F32 else gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype)
    assert got.shape == (FFN, HIDDEN)
    assert torch.equal(got, torch.from_numpy(np.asarray(want, dtype=np.float32)))
    rel_rms = np.sqrt(np.mean((got.numpy() - x) ** 2) / np.mean(x ** 2))
    assert rel_rms < 0.2  # and it is still x (4-bit blocks of 32 give ~0.1)


def test_crafted_llama_unpermutes_q_and_k(tmp_path):
    head_dim = HIDDEN // HEADS
    q, k = _rand(HEADS * head_dim, HIDDEN), _rand(KV_HEADS * head_dim, HIDDEN)
    path = write_gguf(tmp_path / "p.gguf", {"token_embd.weight": (_rand(VOCAB, HIDDEN), Q.F32),
                                             "blk.0.attn_q.weight": (_llamacpp_permute(q, HEADS), Q.F32),
                                             "blk.0.attn_k.weight": (_llamacpp_permute(k, KV_HEADS), Q.F32)})
    src = GGUFSource(path)
    assert torch.equal(src.load("model.layers.0.self_attn.q_proj.weight"), torch.from_numpy(q))
    assert torch.equal(src.load("model.layers.0.self_attn.k_proj.weight"), torch.from_numpy(k))
    assert src.config.tie_word_embeddings and src.config.vocab_size == VOCAB


def test_crafted_qwen3_not_permuted_and_key_length(tmp_path):
    head_dim = 32  # qwen3 sets head_dim independently of hidden / heads (= 16 here)
    q = _rand(HEADS * head_dim, HIDDEN)
    path = write_gguf(tmp_path / "q3.gguf", {"token_embd.weight": (_rand(VOCAB, HIDDEN), Q.F32),
                                              "output.weight": (_rand(VOCAB, HIDDEN), Q.F32),
                                              "blk.0.attn_q.weight": (q, Q.F32),
                                              "blk.0.attn_q_norm.weight": (_rand(head_dim), Q.F32)},
                      arch="qwen3", extra=lambda w: (w.add_key_length(head_dim), w.add_eot_token_id(7)))
    src = GGUFSource(path)
    c = src.config
    assert (c.model_type, c.head_dim, c.qk_norm, c.tie_word_embeddings) == ("qwen3", head_dim, True, False)
    assert c.eos_token_ids == [2, 7]  # eos, then end-of-turn
    assert torch.equal(src.load("model.layers.0.self_attn.q_proj.weight"), torch.from_numpy(q))
    assert src.load("model.layers.0.self_attn.q_norm.weight").shape == (head_dim,)


def _llama3_rope_factors(theta, dim, factor, low=1.0, high=4.0, orig=8192):
    """llama.cpp convert_hf_to_gguf LlamaModel.generate_extra_tensors, verbatim in numpy."""
    import math
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < orig / high:
            out.append(1)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_rope_scaling_from_metadata_and_rope_freqs(tmp_path):
    embd = {"token_embd.weight": (_rand(VOCAB, HIDDEN), Q.F32)}
    lin = write_gguf(tmp_path / "lin.gguf", embd, extra=lambda w: (
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR), w.add_rope_scaling_factor(4.0)))
    assert GGUFSource(lin).config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    freqs = _llama3_rope_factors(500000.0, HIDDEN // HEADS, 32.0)
    l3 = write_gguf(tmp_path / "l3.gguf", {**embd, "rope_freqs.weight": (freqs, Q.F32)}, theta=500000.0)
    src = GGUFSource(l3)
    assert src.config.rope_scaling == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert "rope_freqs.weight" not in src.tensor_names() and len(src.tensor_names()) == 1
    odd = write_gguf(tmp_path / "odd.gguf", {**embd, "rope_freqs.weight": (freqs * 1.5, Q.F32)}, theta=500000.0)
    with pytest.raises(ConfigError, match="rope_freqs"):
        GGUFSource(odd).config


def test_unsupported_quant_rejected(tmp_path):
    # Q8_K is llama.cpp's dot-product intermediate: gguf-py has no dequantizer for it.
    block, size = gguf.GGML_QUANT_SIZES[Q.Q8_K]
    raw = np.zeros((FFN, HIDDEN * 4 // block * size), dtype=np.uint8)
    path = write_gguf(tmp_path / "u.gguf", {"token_embd.weight": (_rand(VOCAB, HIDDEN), Q.F32),
                                             "blk.0.ffn_up.weight": (raw, Q.Q8_K)})
    src = GGUFSource(path)
    with pytest.raises(UnsupportedQuantError, match=r"blk\.0\.ffn_up\.weight.*Q8_K"):
        src.check_supported()
    with pytest.raises(UnsupportedQuantError, match="Q8_K"):
        src.load("model.layers.0.mlp.up_proj.weight")


def test_unsupported_arch_rejected(tmp_path):
    path = write_gguf(tmp_path / "a.gguf", {"token_embd.weight": (_rand(VOCAB, HIDDEN), Q.F32)}, arch="gpt2")
    with pytest.raises(ConfigError, match=r"'gpt2'.*supported: llama, qwen2, qwen3"):
        GGUFSource(path).config


def test_unknown_tensor_rejected(tmp_path):
    path = write_gguf(tmp_path / "x.gguf", {"token_embd.weight": (_rand(VOCAB, HIDDEN), Q.F32),
                                             "blk.0.ffn_gate_exps.weight": (_rand(4, HIDDEN), Q.F32)})
    with pytest.raises(WeightsError, match="ffn_gate_exps"):
        GGUFSource(path)


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        GGUFSource(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path):
    p = tmp_path / "fake.gguf"
    p.write_bytes(b"PK\x03\x04 definitely a zip")
    with pytest.raises(WeightsError, match="not a GGUF"):
        GGUFSource(p)


def test_truncated_gguf(tmp_path):
    path = write_gguf(tmp_path / "full.gguf", {"token_embd.weight": (_rand(VOCAB, HIDDEN), Q.F32),
                                                "blk.0.ffn_up.weight": (_rand(FFN, HIDDEN), Q.Q8_0)})
    data = open(path, "rb").read()
    cut = tmp_path / "cut.gguf"
    for n in (len(data) // 2, 40):  # inside the tensor data; inside the header
        cut.write_bytes(data[:n])
        with pytest.raises(WeightsError, match="corrupt or truncated"):
            GGUFSource(cut)
