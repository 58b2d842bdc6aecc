"""The package as a user installs it from a wheel (not the source tree): the CUDA extension's
sources travel with it (fastortho/csrc), so the lazy JIT build works from any install, and the
op packages and kernels are all in it."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    env = {**os.environ, "FASTORTHO_SKIP_CUDA_BUILD": "1"}  # the sources, not a compiled extension
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(ROOT)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (found,) = out.glob("fastortho-*.whl")
    return found


def test_wheel_ships_every_package_and_the_extension_sources(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in ("fastortho/csrc/ortho_penalty.cu", "fastortho/csrc/module.cpp", "fastortho/kernels/orthoreg.py",
                 "fastortho/kernels/_common.py", "fastortho/ops/orthoreg/triton_backend.py",
                 "fastortho/ops/lora/torch_backend.py", "fastortho/ops/dual/triton_backend.py",
                 "fastortho/train/loop.py", "fastortho/commands/ablate.py", "fastortho/_config.py"):
        assert path in names, path
    assert not any(n.startswith("kernels/") for n in names)  # never a top-level "kernels" module


def test_installed_wheel_finds_its_extension_sources(wheel, tmp_path):
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    probe = ("import fastortho, fastortho.ops.cuda_ext as c; print(fastortho.__file__); "
             "print('\\n'.join(c.sources()))")
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.split()
    assert lines[0].startswith(str(target)), lines[0]  # the installed copy, not the source tree
    sources = lines[1:]
    assert sources and all(s.startswith(str(target / "fastortho" / "csrc")) for s in sources), sources
    assert any(s.endswith("ortho_penalty.cu") for s in sources)
