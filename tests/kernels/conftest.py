"""Kernel tests run on CPU through triton's numpy interpreter when no GPU is present.

TRITON_INTERPRET must be set before `@triton.jit` runs (triton picks the interpreter at
decoration time), so it is set here, and any `kernels` module that another test
directory imported earlier is reloaded. Tests marked `triton` are skipped when triton
is not importable; the reference-vs-independent tests still run.
"""

import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

# Reload already-imported kernel modules so their kernels pick up the interpreter.
_ORDER = ["kernels.utils", "kernels.paged_attention", "kernels.rmsnorm", "kernels.rope",
          "kernels.swiglu", "kernels.tree_attention", "kernels.w4a16_matmul", "kernels"]
for _name in _ORDER:
    if _name in sys.modules and not getattr(sys.modules.get("kernels.utils"), "INTERPRETED_AT_IMPORT", False):
        importlib.reload(sys.modules[_name])


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: runs a Triton kernel (skipped without triton)")


def pytest_runtest_setup(item):
    if item.get_closest_marker("triton") and not HAS_TRITON:
        pytest.skip("triton is not importable")
