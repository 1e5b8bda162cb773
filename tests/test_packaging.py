"""The installed package works from any directory, beside unrelated packages with common names.

PyPI's `kernels` (a dependency of transformers since 5.2x, so of this project's own test
extra) collided with this project's Triton ops while they were a top-level `kernels` package:
outside the repository `dllm run` died in StageModel ("module 'kernels' has no attribute
'triton_available'"), and inside it transformers imported ours. The ops now live in
`dllm.kernels`. The test plants a foreign `kernels` package first on the path, so it fails on
that mistake whether or not HF's package is installed.
"""
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_dllm_uses_its_own_kernels_beside_a_foreign_kernels_package(tmp_path):
    try:
        importlib.metadata.distribution("dllm")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("dllm is not installed (pip install -e .): only an installed package imports outside the repo")
    foreign = tmp_path / "site" / "kernels"
    foreign.mkdir(parents=True)
    (foreign / "__init__.py").write_text("FOREIGN = True\n")
    code = ("import kernels; from dllm.model.stage import kernels_default; kernels_default(); "
            "import dllm.model.layers as L; print(L.kernels.__file__); print(getattr(kernels, 'FOREIGN', False))")
    for cwd in (tmp_path, ROOT):  # outside the repository, and at its root (where pytest runs)
        out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120,
                             env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"})
        assert out.returncode == 0, out.stderr[-2000:]
        ours, shadowed = out.stdout.split()
        assert Path(ours).resolve() == ROOT / "dllm" / "kernels" / "__init__.py"
        assert shadowed == "True"  # `import kernels` found the foreign package, and dllm did not care
