"""Kernel tests run on CPU through triton's numpy interpreter when no GPU is present.

TRITON_INTERPRET must be set before `@triton.jit` runs (triton picks the interpreter at
decoration time), so it is set here, and any `dllm.kernels` module that another test
directory imported earlier is reloaded (tests.kernels.use_interpreter_without_gpu). Tests
marked `triton` are skipped when triton is not importable; the reference-vs-independent
tests still run.
"""

import pytest

from tests.kernels import use_interpreter_without_gpu

use_interpreter_without_gpu()

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: runs a Triton kernel (skipped without triton)")


def pytest_runtest_setup(item):
    if item.get_closest_marker("triton") and not HAS_TRITON:
        pytest.skip("triton is not importable")
