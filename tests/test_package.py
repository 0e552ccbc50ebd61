import importlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import dat_smt
from dat_smt.ops._extension import CPU_SOURCES, CUDA_SOURCES


def test_adapters_import_as_subpackage():
    adapters = importlib.import_module("dat_smt.adapters")
    assert adapters.__name__ == "dat_smt.adapters"


def test_version():
    assert dat_smt.__version__.count(".") == 2


@pytest.mark.slow
def test_built_wheel_ships_adapters_and_op_sources(tmp_path):
    """A regular (non-editable) wheel must carry `dat_smt.adapters` from `adapters/` and the op's C++/CUDA sources."""
    repo = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path / "dist"), str(repo)],
        check=True,
    )
    (wheel,) = (tmp_path / "dist").glob("dat_smt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "dat_smt/adapters/__init__.py" in names
    assert not any(name.startswith("adapters/") for name in names)
    assert any(name.startswith("dat_smt/ops/csrc/") and name.endswith(".h") for name in names)
    assert {f"dat_smt/ops/csrc/{source}" for source in CPU_SOURCES + CUDA_SOURCES} <= names

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), str(wheel)],
        check=True,
    )
    probe = "import dat_smt, dat_smt.adapters; print(dat_smt.__file__); print(dat_smt.adapters.__file__)"
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, check=True,
                         capture_output=True, text=True).stdout.split()
    assert all(Path(path).is_relative_to(target) for path in out), out
