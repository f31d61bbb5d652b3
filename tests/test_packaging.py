"""Packaging: the built wheel (one version, typing marker, data files), light imports and the cheap
``mpae --version``."""
from __future__ import annotations

import configparser
import importlib.metadata
import json
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


def _python(code: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (so ``sys.modules`` shows only what it imported)."""
    done = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr
    return done


def test_models_metrics_and_losses_import_without_lightning(tmp_path):
    """The pure-PyTorch parts are usable where Lightning is not wanted (or not installed)."""
    done = _python(
        "import json, sys, mpae_lightning.models, mpae_lightning.metrics, mpae_lightning.losses\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'lightning' or m.startswith('lightning.'))))",
        tmp_path,
    )
    assert json.loads(done.stdout) == []


def test_bare_package_import_is_light_and_dir_lists_the_public_names(tmp_path):
    done = _python(
        "import json, sys, mpae_lightning\n"
        "print(json.dumps({'dir': dir(mpae_lightning), 'all': mpae_lightning.__all__,\n"
        "                  'torch': 'torch' in sys.modules, 'version': mpae_lightning.__version__}))",
        tmp_path,
    )
    found = json.loads(done.stdout)
    assert not found["torch"]
    assert set(found["all"]) <= set(found["dir"])
    assert {"MPAE", "MPAEModule", "CUBDataModule", "PartNMI", "models", "data"} <= set(found["dir"])
    assert found["version"] == mpae_lightning.__version__


def test_public_names_import_from_the_top_level_package():
    from mpae_lightning import MPAE, MPAEModule
    from mpae_lightning.lightning_module import MPAEModule as module_class
    from mpae_lightning.models import MPAE as model_class

    assert MPAE is model_class and MPAEModule is module_class
    for name in mpae_lightning.__all__:  # every advertised name resolves, to an object of that name
        assert getattr(mpae_lightning, name).__name__ == name
    assert mpae_lightning.data.PartDataModule.__name__ == "PartDataModule"  # subpackages as attributes
    assert not hasattr(mpae_lightning, "NoSuchName")
    with pytest.raises(ImportError):
        from mpae_lightning import NoSuchName  # noqa: F401


def test_version_is_the_installed_distributions():
    assert mpae_lightning.__version__ == importlib.metadata.version("mpae_lightning")


def test_console_script_is_the_light_entry_function():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    scripts = config["options.entry_points"]["console_scripts"].split()
    assert scripts == ["mpae", "=", "mpae_lightning.__main__:main"]


@pytest.mark.parametrize("argv", [["--version"], ["-V"], ["--debug", "--version"]])
def test_version_flag_answers_without_importing_torch(tmp_path, argv):
    done = _python(
        "import json, sys\n"
        "argv, sys.argv = json.loads(sys.argv[1]), ['mpae']\n"
        "from mpae_lightning.__main__ import main\n"
        "main(argv)\n"
        "print('torch' in sys.modules, 'lightning' in sys.modules)",
        tmp_path,
        json.dumps(argv),
    )
    version_line, imported = done.stdout.splitlines()
    assert version_line == f"mpae {mpae_lightning.__version__}"
    assert imported == "False False"


def test_python_m_answers_the_version(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "mpae_lightning", "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["__main__.py", mpae_lightning.__version__]  # argparse's prog, as before


def test_fast_version_text_equals_the_full_clis(monkeypatch, capsys):
    """The shortcut prints exactly what the LightningCLI parser prints for ``--version``."""
    from mpae_lightning.__main__ import main
    from mpae_lightning.cli import main as cli_main

    monkeypatch.setattr(sys, "argv", ["mpae"])
    main(["--version"])
    fast = capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--version"])
    assert exit_info.value.code in (0, None)
    assert capsys.readouterr().out == fast == f"mpae {mpae_lightning.__version__}\n"


def test_other_arguments_go_to_the_full_cli(monkeypatch):
    import mpae_lightning.cli
    from mpae_lightning.__main__ import main

    calls = []
    monkeypatch.setattr(mpae_lightning.cli, "main", calls.append)
    main(["fit", "--version"])  # --version after a subcommand is the full CLI's to judge
    main(["--config", "x.yaml", "--version"])
    assert calls == [["fit", "--version"], ["--config", "x.yaml", "--version"]]
