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


#: paths that only exist beside a checkout on some machine, never in the repository (spelled in two
#: pieces so that this file does not match itself)
OUTSIDE_PATHS = tuple(a + b for a, b in (("shared/", "design"), ("../", "shared"), ("/work", "/")))


def _repository_files() -> list[Path]:
    """The tracked files (the tree under REPO when it is not a git checkout, minus build outputs)."""
    try:
        names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
        files = [REPO / name for name in names.decode().split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", "build", "__pycache__", ".pytest_cache"}
        files = [p for p in REPO.rglob("*") if p.is_file() and not skip & set(p.relative_to(REPO).parts)]
    return [p for p in files if p.is_file()]


def test_no_file_refers_to_a_path_outside_the_repository():
    offenders = []
    for path in _repository_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            offenders += [f"{path.relative_to(REPO)}:{lineno}: {needle}" for needle in OUTSIDE_PATHS if needle in line]
    assert not offenders, "references outside the repository (point to docs/ instead):\n" + "\n".join(offenders)


def test_docs_links_resolve():
    """Every relative Markdown link in README.md and docs/ names a file of the repository."""
    import re

    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    assert len(pages) >= 8, "docs/ lost a page"
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)", page.read_text(encoding="utf-8")):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, f"broken links: {broken}"
