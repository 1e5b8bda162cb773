"""The installed package works from any directory, beside unrelated packages with common names.

PyPI's `kernels` (a dependency of transformers 5, so of this project's own test extra) once
shadowed this project's Triton ops whenever Python did not start in the repository: `dllm run`
from a home directory died in StageModel with "module 'kernels' has no attribute
'triton_available'". The ops now install as `dllm_kernels`. The test plants a foreign `kernels`
package first on the path, so it fails on that mistake whether or not HF's package is installed.
"""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dllm_imports_its_own_kernels_outside_the_repo(tmp_path):
    foreign = tmp_path / "site" / "kernels"
    foreign.mkdir(parents=True)
    (foreign / "__init__.py").write_text("FOREIGN = True\n")
    code = ("import dllm_kernels, kernels; from dllm.model.stage import kernels_default; kernels_default(); "
            "import dllm.model.layers as L; print(dllm_kernels.__file__); print(L.kernels.__name__); "
            "print(getattr(kernels, 'FOREIGN', False))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    ours, bound, shadowed = out.stdout.split()
    assert Path(ours).resolve() == ROOT / "kernels" / "__init__.py"
    assert bound == "dllm_kernels"
    assert shadowed == "True"  # the foreign package really was the one `import kernels` found
