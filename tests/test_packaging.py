"""The built wheel: the version comes from one place, and the typing marker and data files ship."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import mpae_lightning

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_has_the_package_version_typing_marker_and_celeba_lists(tmp_path):
    """Build the wheel from a copy of the sources (so no build/ folder lands in the checkout) and read it."""
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    src = tmp_path / "src_copy"
    for name in ("setup.cfg", "pyproject.toml", "README.md", "LICENSE"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src), "-w", str(out)],
        check=True,
        capture_output=True,
    )
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
        version_line = next(
            line for line in zf.read(metadata).decode().splitlines() if line.startswith("Version:")
        )
    assert version_line == f"Version: {mpae_lightning.__version__}", version_line
    assert "mpae_lightning/py.typed" in names
    assert "mpae_lightning/data/celeba/MAFL_test_lm.txt" in names
    assert "mpae_lightning/data/celeba/cele_train_lm.txt" in names
