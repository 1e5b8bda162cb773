"""Weight-only int8 / int4 CPU matmuls (dllm/model/cpu_quant.py): exact against a torch reference
up to bf16 rounding, each output row independent of the others bit for bit, and therefore
speculative decoding with a quantized target commits exactly that target's plain greedy tokens.

No real model needed: odd random shapes and the session's tiny random llama (tests/conftest.py).
"""
import random
import zlib

import pytest
import torch

from dllm.batch import SeqChunk
from dllm.engine import Engine, LocalPipeline
from dllm.model.cpu_quant import (
    INT4_GROUPS,
    CpuInt4Weight,
    Int8Weight,
    fit_group,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)
from dllm.model.runner import StageRunner
from dllm.model.stage import StageModel
from dllm.sampling import SamplingParams
from tests.test_speculative import SPLITS, RandomTreeDrafter, greedy_oracle

KINDS = {"int8": Int8Weight.from_dense, "int4": CpuInt4Weight.from_dense}
# out not a power of two (int4 needs out % 16 == 0: ATen's int4 packing, see test_int4_out_not_multiple_of_16)
SHAPES = {"int8": [(96, 64), (200, 96), (33, 64), (48, 160)],
          "int4": [(96, 64), (208, 96), (48, 160), (80, 576)]}
ROWS = [1, 3, 16, 33]


def reference(w, x):
    """What the kernel computes: bf16-rounded activations times the dequantized weight, in fp32."""
    return x.bfloat16().float() @ w.dequantize().T


def seed(*key) -> int:
    return zlib.crc32(repr(key).encode())


def cases():
    return [(kind, shape, rows) for kind, shapes in SHAPES.items() for shape in shapes for rows in ROWS]


@pytest.mark.parametrize("kind,shape,rows", cases())
def test_matches_dequantized_reference(kind, shape, rows):
    torch.manual_seed(seed(kind, shape, rows))
    n_out, n_in = shape
    w = KINDS[kind](torch.randn(n_out, n_in))
    x = torch.randn(rows, n_in)
    y = w(x)
    assert y.shape == (rows, n_out) and y.dtype == torch.float32
    ref = reference(w, x)
    # the kernel rounds its output to bf16 (8 significant bits) and sums in its own order
    scale = (x.bfloat16().float().abs() @ w.dequantize().abs().T)  # bound on the accumulated magnitudes
    err = (y - ref).abs()
    assert (err <= 2**-7 * scale + 1e-6).all(), f"max err {err.max():.4g} vs magnitude {scale.max():.4g}"
    # leading dims pass through
    x3 = x.reshape(1, rows, n_in)
    assert torch.equal(w(x3), y.reshape(1, rows, n_out))


@pytest.mark.parametrize("kind,shape,rows", [c for c in cases() if c[2] > 1])
def test_rows_are_independent_bit_for_bit(kind, shape, rows):
    """y(X)[i] == y(X[i:i+1]) exactly: a verify pass over a tree of rows gives the logits that
    single-token decode steps give, which is what keeps speculative decoding exact."""
    torch.manual_seed(seed(kind, shape, rows, 1))
    n_out, n_in = shape
    w = KINDS[kind](torch.randn(n_out, n_in))
    x = torch.randn(rows, n_in)
    y = w(x)
    for i in range(rows):
        assert torch.equal(y[i:i + 1], w(x[i:i + 1])), f"row {i} of {rows} differs when run alone"
    # and any sub-batch of rows, in any order
    perm = torch.randperm(rows)
    assert torch.equal(w(x[perm]), y[perm])


def grid_weight(n_out, n_in, group, s, m):
    """w = q * s + m per `group`-column block, every block using codes 0 and 15 (so its
    [min, max] range is exactly 15 steps) and random codes elsewhere."""
    q = torch.randint(0, 16, (n_out, n_in // group, group))
    q[..., 0], q[..., 1] = 0, 15
    q = q[..., torch.randperm(group)]  # the extremes anywhere in the block
    w = q.float() * s[..., None] + m[..., None]
    return q.reshape(n_out, n_in), w.reshape(n_out, n_in)


@pytest.mark.parametrize("n_out,n_in", [(48, 64), (96, 160)])
def test_int4_exact_on_a_4bit_grid(n_out, n_in):
    """A weight already on a 4-bit grid with 32-column blocks (a GGUF Q4_0/Q4_1 source) comes back
    with the same codes, scale and min, and dequantizes to itself up to bf16 rounding of the scale
    and zero (the kernel takes them in bf16) and of its bf16 output."""
    torch.manual_seed(n_out)
    blocks = n_in // 32
    s = torch.rand(n_out, blocks) * 0.1 + 0.01
    m = -torch.rand(n_out, blocks) * 0.8
    q, w = grid_weight(n_out, n_in, 32, s, m)
    codes, scale, lo = quantize_int4(w, 32)
    assert torch.equal(unpack_int4(codes), q.to(torch.int32))
    torch.testing.assert_close(scale, s, rtol=1e-5, atol=0)
    torch.testing.assert_close(lo, m, rtol=0, atol=1e-6)
    deq = CpuInt4Weight(codes, scale, lo).dequantize()
    # bf16 scale: 8 codes * |s| * 2^-8 from (q - 8) * s; bf16 zero (= m + 8 s): 2^-8 |zero|; bf16 output: 2^-8 |w|
    zero = (m + 8 * s).abs().repeat_interleave(32, 1)
    bound = 2**-8 * (8 * s.repeat_interleave(32, 1) + zero + w.abs()) + 1e-6
    assert ((deq - w).abs() <= bound).all()

    # a grid whose scale and zero are bf16-exact (powers of two, small multiples) comes back exactly
    s2 = 2.0 ** -torch.randint(3, 7, (n_out, blocks)).float()
    m2 = -s2 * torch.randint(0, 9, (n_out, blocks)).float()
    _, w2 = grid_weight(n_out, n_in, 32, s2, m2)
    deq2 = CpuInt4Weight.from_dense(w2, 32).dequantize()
    assert torch.equal(deq2, w2)


def test_int8_exact_on_an_int8_grid():
    torch.manual_seed(3)
    s = 2.0 ** -torch.randint(2, 8, (40,)).float()
    q = torch.randint(-127, 128, (40, 64))
    q[:, 5] = 127  # the row's max is exactly 127 steps
    w = q.float() * s[:, None]
    qq, scale = quantize_int8(w)
    assert torch.equal(qq, q.to(torch.int8)) and torch.equal(scale, s)
    assert torch.equal(Int8Weight(qq, scale).dequantize(), w)


def test_fit_group():
    assert fit_group(576, 128) == 64  # SmolLM2: 576 = 9 * 64
    assert fit_group(1536, 128) == 128  # Qwen2.5-1.5B
    assert fit_group(896, 128) == 128 and fit_group(4864, 32) == 32
    assert fit_group(96, 256) == 32
    for n in (100, 48, 16):
        with pytest.raises(ValueError):
            fit_group(n, 128)
    with pytest.raises(ValueError):
        quantize_int4(torch.randn(16, 100))
    assert set(INT4_GROUPS) == {32, 64, 128, 256}


def test_bad_shapes_and_dtypes_raise_value_error():
    q8, s8 = quantize_int8(torch.randn(32, 64))
    for args in [(q8.float(), s8), (q8.to(torch.uint8), s8), (q8[0], s8), (q8, s8[:-1]), (q8, s8[:, None])]:
        with pytest.raises(ValueError):
            Int8Weight(*args)
    codes, scale, lo = quantize_int4(torch.randn(32, 64), 32)
    bad = [(codes.to(torch.int8), scale, lo),           # codes must be uint8
           (codes, scale, lo[:, :1]),                   # scales / mins disagree
           (codes, scale[:-1], lo[:-1]),                # not one row of scales per output row
           (codes, scale[:, :1].repeat(1, 3), lo[:, :1].repeat(1, 3)),  # 64 columns in 3 groups
           (codes, scale.repeat(1, 2), lo.repeat(1, 2))]  # group 16: not a kernel group size
    for args in bad:
        with pytest.raises(ValueError):
            CpuInt4Weight(*args)


def test_int4_out_not_multiple_of_16():
    """ATen's int4 packing takes 16 output rows at a time: refused up front, with the way out."""
    with pytest.raises(ValueError, match="multiple of 16 output rows"):
        CpuInt4Weight.from_dense(torch.randn(200, 96))


def test_stage_quantize_rejects_bad_modes(tiny_models):
    d, _ = tiny_models["llama"]
    stage = StageModel.from_pretrained(d)
    for kw in [{"mode": "int3"}, {"mode": "int8", "backend": "w4a16"}, {"mode": "int4", "backend": "npu"}]:
        with pytest.raises(ValueError):
            stage.quantize(**kw)


def test_stage_quantize_one_kind(tiny_models):
    """kinds=(...) quantizes only those matmuls (the per-kind sensitivity of bench/quant_quality.py):
    the others stay dense, and the logits equal a dense model whose gate_up weights were replaced
    by the dequantized int4 values."""
    d, _ = tiny_models["llama"]
    stage = StageModel.from_pretrained(d).quantize("int4", kinds=("gate_up",))
    by_kind = {}
    for kind, module, name in stage.matmul_slots():
        w = getattr(module, name)
        by_kind.setdefault(kind, set()).add(isinstance(w, CpuInt4Weight))
    assert by_kind == {"qkv": {False}, "o": {False}, "gate_up": {True}, "down": {False}, "head": {False}}
    dense = StageModel.from_pretrained(d)
    for (kind, module, name), (_, qmodule, qname) in zip(dense.matmul_slots(), stage.matmul_slots()):
        if kind == "gate_up":
            delattr(module, name)
            setattr(module, name, torch.nn.Parameter(getattr(qmodule, qname).dequantize(), requires_grad=False))
    ids = torch.tensor([1, 5, 9, 2, 7])
    want = dense.logits(dense_forward(dense, ids))
    got = stage.logits(dense_forward(stage, ids))
    torch.testing.assert_close(got, want, rtol=0, atol=2e-2)
    with pytest.raises(ValueError, match="unknown matmul kinds"):
        StageModel.from_pretrained(d).quantize("int4", kinds=("mlp",))


def dense_forward(stage: StageModel, ids: torch.Tensor) -> torch.Tensor:
    runner = StageRunner.for_tokens(stage, 64)
    return runner.forward(stage.embed(ids), [SeqChunk(0, 0, len(ids))])


# ---- speculative decoding with a quantized target ------------------------------------------

@pytest.fixture(scope="module")
def quantized_llama(tiny_models):
    """(mode, stages) -> (whole quantized model, [stage models of that split]), each quantized once."""
    d, _ = tiny_models["llama"]
    out = {}
    for mode in ("int4", "int8"):
        whole = StageModel.from_pretrained(d, quant=mode)
        assert whole.quant == mode and isinstance(whole.lm_head, (CpuInt4Weight, Int8Weight))
        for stages in (1, 2):
            split = SPLITS[stages]
            parts = [StageModel.from_pretrained(d, layers=range(*split[0]), quant=mode)]
            parts += [StageModel.from_pretrained(d, layers=range(a, b), embed=False, head=False, quant=mode)
                      for a, b in split[1:]]
            out[mode, stages] = whole, parts
    return out


def cached(oracle):
    """The oracle (one prefill per call) memoised on the context: trees ask about the same paths again."""
    memo = {}

    def next_token(ctx):
        key = tuple(ctx)
        if key not in memo:
            memo[key] = oracle(ctx)
        return memo[key]
    return next_token


DRAFTS = [("wrong", None), ("random", 0.0), ("mostly-right", 0.8), ("oracle", 1.0)]
TRIALS = 13  # 4 draft kinds x 13 = 52 cases per (mode, stages); 208 in all


@pytest.mark.parametrize("mode", ["int4", "int8"])
@pytest.mark.parametrize("stages", [1, 2])
def test_quantized_target_speculation_is_exactly_greedy(quantized_llama, mode, stages):
    whole, parts = quantized_llama[mode, stages]
    oracle = cached(greedy_oracle(whole))
    rng = random.Random(f"{mode}-{stages}")
    cases = 0
    for kind, p_right in DRAFTS:
        for trial in range(TRIALS):
            prompt = [rng.randrange(128) for _ in range(rng.randint(1, 12))]
            n = rng.randint(1, 10)
            ref = Engine(StageRunner.for_tokens(whole, 512, 4)).generate_all(prompt, SamplingParams(max_tokens=n))
            if kind == "wrong":
                drafter = RandomTreeDrafter(rng, 128, oracle, wrong=True)
            else:
                drafter = RandomTreeDrafter(rng, 128, oracle if p_right else None, p_right)
            rest = [StageRunner.for_tokens(p, 1024, 4) for p in parts[1:]]
            eng = Engine(StageRunner.for_tokens(parts[0], 1024, 4), LocalPipeline(rest) if rest else None,
                         drafter=drafter, spec_depth=rng.randint(1, 5))
            got = eng.generate_all(prompt, SamplingParams(max_tokens=n))
            assert got == ref, (mode, stages, kind, trial)
            if kind == "wrong" and eng.stats.passes:  # nothing drafted is ever accepted: one token a pass
                assert eng.stats.mean_accepted == 1.0, eng.stats.mean_accepted
            cases += 1
    assert cases == 4 * TRIALS


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_quantized_target_batched_trees_are_exactly_greedy(quantized_llama, mode):
    """Several sequences' trees and prefills in one pass: rows of other sequences change nothing."""
    whole, _ = quantized_llama[mode, 1]
    rng = random.Random(mode)
    prompts = [[rng.randrange(128) for _ in range(rng.randint(2, 10))] for _ in range(4)]
    solo = [Engine(StageRunner.for_tokens(whole, 512, 4)).generate_all(p, SamplingParams(max_tokens=8))
            for p in prompts]
    eng = Engine(StageRunner.for_tokens(whole, 4096, 4),
                 drafter=RandomTreeDrafter(rng, 128, cached(greedy_oracle(whole)), 0.5), spec_depth=3)
    seqs = [eng.add(p, SamplingParams(max_tokens=8)) for p in prompts]
    while eng.has_work:
        eng.step()
    assert [s.output for s in seqs] == solo
    assert eng.stats.mean_accepted > 1.0  # the oracle half of the drafts did get accepted


def test_run_drafts_on_the_fast_path_whatever_the_targets_precision():
    """`dllm run --draft M` with an fp32 target drafts with int4 weights (--draft-dtype auto), and
    the answer is still the fp32 target's own greedy one."""
    from dllm.cli import build_engine

    from .models import model_dir_or_skip

    d = model_dir_or_skip("smollm2")
    prompt = list(range(1000, 1016))
    plain, done = build_engine(d, dtype="float32", kv_tokens=512)
    try:
        ref = plain.generate_all(prompt, SamplingParams(max_tokens=24))
    finally:
        done()
    spec, done = build_engine(d, dtype="float32", kv_tokens=512, draft=str(d), tree="chain")
    try:
        assert spec.model.quant is None and spec.drafter.model.quant == "int4"
        assert spec.generate_all(prompt, SamplingParams(max_tokens=24)) == ref
        assert spec.stats.mean_accepted > 1.5  # the int4 self-draft is mostly right
    finally:
        done()

