"""The GPU path: Triton kernels in the model, int4 weights, CUDA-graph buckets.

On a CPU machine the kernels run through triton's interpreter (TRITON_INTERPRET=1, CPU
tensors): the tiny random models must give the same greedy tokens with the kernel path forced
on and off, with and without draft trees. The CUDA-graph tests need CUDA and skip without it.

Triton picks the interpreter when `@triton.jit` runs, triton.language's own functions included,
so when another test module imported triton first, the kernel tests re-run themselves in a fresh
pytest process with TRITON_INTERPRET=1 (`ran_elsewhere`).
"""
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.kernels import use_interpreter_without_gpu  # noqa: E402

use_interpreter_without_gpu()

from dllm import kernels  # noqa: E402
from dllm.batch import SeqChunk  # noqa: E402
from dllm.engine import Engine  # noqa: E402
from dllm.model.cuda_graph import GraphRunner  # noqa: E402
from dllm.model.quant import Int4Weight, PackedWeight  # noqa: E402
from dllm.model.runner import StageRunner  # noqa: E402
from dllm.model.stage import StageModel  # noqa: E402
from dllm.sampling import SamplingParams  # noqa: E402

from .test_speculative import RandomTreeDrafter  # noqa: E402

pytestmark = pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not importable")
CUDA = torch.cuda.is_available()
# True when triton was imported before TRITON_INTERPRET was set (its language functions compiled)
RERUN = False
if kernels.HAS_TRITON and not CUDA:
    import triton.language.standard
    from triton.runtime.interpreter import InterpretedFunction

    RERUN = not isinstance(triton.language.standard.sum, InterpretedFunction)
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")
DEVICE = "cuda" if CUDA else "cpu"
PROMPT = [5, 17, 3, 99, 42, 7, 64]


_ELSEWHERE: dict[str, str | None] = {}  # test name -> failure text (None = passed), from the re-run


def ran_elsewhere(request) -> bool:
    """When this process cannot interpret kernels, run every test of this file once in a fresh
    pytest process with TRITON_INTERPRET=1 and report this test's outcome from there."""
    if not RERUN:
        return False
    if not _ELSEWHERE:
        import xml.etree.ElementTree as ET

        root = Path(__file__).resolve().parent.parent
        report = Path(os.environ.get("TMPDIR", "/tmp")) / f"dllm-gpu-path-{os.getpid()}.xml"
        subprocess.run([sys.executable, "-m", "pytest", str(Path(__file__).relative_to(root)), "-q",
                        "-p", "no:cacheprovider", f"--junitxml={report}"], cwd=root, capture_output=True,
                       timeout=1200, env={**os.environ, "TRITON_INTERPRET": "1"})
        for case in ET.parse(report).getroot().iter("testcase"):
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            _ELSEWHERE[case.get("name")] = None if bad is None else (bad.text or bad.get("message", ""))[-4000:]
        report.unlink()
    name = request.node.name
    assert name in _ELSEWHERE, f"{name} did not run in the interpreter process"
    assert _ELSEWHERE[name] is None, _ELSEWHERE[name]
    return True


def load(d, kernels_on: bool, device=DEVICE) -> StageModel:
    return StageModel.from_pretrained(d, device=device).set_kernels(kernels_on)


def greedy(stage, n=8, drafter=None, eager=True, **kw):
    eng = Engine(StageRunner.for_tokens(stage, 256, 4, eager=eager), drafter=drafter, **kw)
    return eng.generate_all(PROMPT, SamplingParams(max_tokens=n)), eng


def logits_walk(stage, runner):
    """Prefill in two chunks (causal kernel, then one after context), two decode steps, a tree."""
    rows = []
    for c, ids in [(SeqChunk(0, 0, 4), PROMPT[:4]), (SeqChunk(0, 4, 3), PROMPT[4:]),
                   (SeqChunk(0, 7, 1), [9]), (SeqChunk(0, 8, 1), [11]),
                   (SeqChunk(0, 9, 5, parents=(-1, 0, 0, 1, -1)), [1, 2, 3, 4, 5])]:
        x = runner.forward(stage.embed(torch.tensor(ids, device=stage.device)), [c])
        rows.append(stage.logits(x))
    return torch.cat(rows)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_kernel_path_logits_and_greedy_tokens_match_torch(tiny_models, arch, request):
    if ran_elsewhere(request):
        return
    d, _ = tiny_models[arch]
    ref_stage, k_stage = load(d, False), load(d, True)
    ref = logits_walk(ref_stage, StageRunner.for_tokens(ref_stage, 256, 4, eager=True))
    got = logits_walk(k_stage, StageRunner.for_tokens(k_stage, 256, 4, eager=True))
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=2e-4)
    assert greedy(k_stage, 6)[0] == greedy(ref_stage, 6)[0]


def test_kernel_path_with_draft_trees_is_greedy(tiny_models, request):
    if ran_elsewhere(request):
        return
    d, _ = tiny_models["qwen2"]
    ref = greedy(load(d, False), 10)[0]
    drafter = RandomTreeDrafter(random.Random(3), 128, max_nodes=9)
    got, eng = greedy(load(d, True), 10, drafter=drafter, spec_depth=3)
    assert got == ref and eng.stats.drafted > 0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_int4_equals_model_with_dequantized_weights(tiny_models, arch, request):
    if ran_elsewhere(request):
        return
    d, _ = tiny_models[arch]
    q = load(d, False).quantize("int4", 32, backend="w4a16")
    dense = load(d, False)
    n_int4 = 0
    for name, w in q.named_modules():
        if isinstance(w, Int4Weight):
            value = w.dequantize(torch.float32)
            try:
                sub = dense.get_submodule(name)
            except AttributeError:
                sub = None
            if isinstance(sub, PackedWeight):  # CPU layout: the dense model keeps it packed for oneDNN
                parent, _, attr = name.rpartition(".")
                setattr(dense.get_submodule(parent) if parent else dense, attr, PackedWeight(value))
            elif name == "lm_head" and dense.lm_head is None:
                # a tied head is quantized on its own; the dense twin gets that head, untied
                dense.lm_head = torch.nn.Parameter(value, requires_grad=False)
            else:
                dense.get_parameter(name).copy_(value)
            n_int4 += 1
    if q.lm_head is not None:
        assert isinstance(q.lm_head, Int4Weight)
    assert n_int4 == 4 * len(q.layers) + (q.lm_head is not None)
    ref = logits_walk(dense, StageRunner.for_tokens(dense, 256, 4))
    got = logits_walk(q, StageRunner.for_tokens(q, 256, 4))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    # the W4A16 kernel gives the same tokens as the torch reference
    assert greedy(q.set_kernels(True), 5)[0] == greedy(dense, 5)[0]


def test_graph_buckets_pad_trees_without_changing_tokens(tiny_models, request):
    """The bucket plumbing (static buffers, padding, truncation) run without capture on CPU,
    captured and replayed on CUDA."""
    if ran_elsewhere(request):
        return
    d, _ = tiny_models["llama"]
    ref = greedy(load(d, False), 10)[0]
    stage = load(d, True)
    runner = StageRunner.for_tokens(stage, 256, 4, eager=True)
    runner.graphs = GraphRunner(runner, buckets=(1, 4, 16))
    eng = Engine(runner, drafter=RandomTreeDrafter(random.Random(7), 128, max_nodes=12), spec_depth=4)
    assert eng.generate_all(PROMPT, SamplingParams(max_tokens=10)) == ref
    assert runner.graphs.replays > 0
    runner.blocks.check()


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_equals_eager(tiny_models, dtype):
    d, _ = tiny_models["qwen2"]
    stage = StageModel.from_pretrained(d, dtype=dtype, device="cuda")
    assert stage.use_kernels
    eager, _ = greedy(stage, 12, eager=True)
    got, eng = greedy(stage, 12, eager=False)
    assert eng.head.graphs is not None and eng.head.graphs.replays >= 10
    assert got == eager
    if dtype == torch.float32:
        assert got == greedy(StageModel.from_pretrained(d, device="cuda").set_kernels(False), 12)[0]


@needs_cuda
def test_cuda_graph_trees_and_int4(tiny_models):
    d, _ = tiny_models["llama"]
    ref = greedy(load(d, False), 10)[0]
    drafter = RandomTreeDrafter(random.Random(11), 128, max_nodes=20)
    got, eng = greedy(load(d, True), 10, drafter=drafter, eager=False, spec_depth=4)
    assert got == ref and eng.head.graphs.replays > 0
    q = load(d, True).quantize("int4", 32, backend="w4a16")
    assert greedy(q, 8, eager=False)[0] == greedy(q, 8, eager=True)[0]


@needs_cuda
def test_int4_checkpoint_runs_w4a16_on_cuda(tiny_models, tmp_path):
    """A `convert --quant int4` checkpoint (float group offsets, made for the CPU kernel) loads on
    CUDA as the Triton W4A16 weights, requantized: close to the stored values, and it decodes."""
    from dllm.convert import convert

    d, _ = tiny_models["llama"]
    convert(d, tmp_path / "q", quant="int4", progress=False)
    gpu = StageModel.from_pretrained(tmp_path / "q", dtype=torch.bfloat16, device="cuda")
    cpu = StageModel.from_pretrained(tmp_path / "q")
    for lg, lc in zip(gpu.layers, cpu.layers):
        for name in ("gate_up_weight", "down_weight"):
            wg, wc = getattr(lg.mlp, name), getattr(lc.mlp, name)
            assert isinstance(wg, Int4Weight)
            err = (wg.dequantize(torch.float32).cpu() - wc.dequantize()).norm() / wc.dequantize().norm()
            assert err < 0.1, (name, float(err))
    assert isinstance(gpu.lm_head, Int4Weight)
    assert len(greedy(gpu, 8)[0]) == 8


def test_eager_switch(tiny_models, monkeypatch):
    d, _ = tiny_models["llama"]
    stage = load(d, True)
    monkeypatch.setenv("DLLM_EAGER", "1")
    assert StageRunner.for_tokens(stage, 64, 4).graphs is None
    monkeypatch.setenv("DLLM_KERNELS", "0")
    assert not StageModel.from_pretrained(d).use_kernels
