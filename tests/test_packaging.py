"""A wheel built from the repo installs into a fresh venv and imports without the source tree."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_and_imports_without_source_tree(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheels)], check=True, cwd=tmp_path)
    (wheel,) = wheels.glob("kfopt-*.whl")
    venv = tmp_path / "venv"
    # torch/triton/numpy come from the system site-packages (no download); kfopt itself from the wheel.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True)
    code = ("import kfopt, kfopt.kernels, kfopt.autotune, torch;"
            "print(kfopt.__file__); print(kfopt.kernels.__file__); print(kfopt.autotune.__file__);"
            "p = torch.nn.Parameter(torch.randn(4)); p.grad = torch.randn(4);"
            "kfopt.LAMB([p]).step(); print('stepped')")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    out = subprocess.run([str(python), "-c", code], check=True, cwd=tmp_path, env=env, capture_output=True,
                         text=True).stdout.split()
    for path in out[:3]:
        assert path.startswith(str(venv)), f"imported {path} instead of the installed wheel"
    assert out[3] == "stepped"
    usage = subprocess.run([str(python), "-m", "kfopt", "compare", "--help"], check=True, cwd=tmp_path, env=env,
                           capture_output=True, text=True).stdout
    assert "usage: kfopt compare" in usage
