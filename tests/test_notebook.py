"""notebooks/quickstart.ipynb: stored executed (small, public API only) and still runs top to bottom (small settings)."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402  (installed with nbclient)
from jupyter_client.manager import KernelManager  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
KERNEL_NAME = "mpae-notebook-test"


def _kernel_manager(tmp_path: Path) -> KernelManager:
    """A kernel running this very interpreter, whatever kernel specs the machine has (none in a fresh venv)."""
    spec_dir = tmp_path / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "mpae notebook test",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)


def test_notebook_is_stored_executed_small_and_public():
    """Readers see the outputs of a full run where the notebook is rendered; the file stays small."""
    assert NOTEBOOK.stat().st_size < 1_000_000, f"{NOTEBOOK.name} is {NOTEBOOK.stat().st_size:,} bytes; keep it < 1 MB"
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", []), "the first code cell holds the parameters"
    assert "RUN_CUB = False" in code[0].source, "the CUB cells must stay switched off by default"
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), f"store the notebook executed top to bottom once, got {counts}"
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "small run: False" in text, "store the outputs of the default (full) run, not of MPAE_NOTEBOOK_SMALL=1"
    assert "site-packages" not in text and "/home/" not in text, "stored outputs must not show local paths"
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) >= 4, "the folder, the parts, mpae predict's overlays and the scored parts are shown"
    source = "\n".join(c.source for c in code)
    assert "mpae_lightning.demo" not in source, "use the public API, not the demo script's helpers"
    assert not re.search(r"mpae_lightning[\w.]*\._[A-Za-z]|import\s+_[A-Za-z]|\._[A-Za-z]\w*\(", source), "no private names"


def test_notebook_runs_small(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("MPAE_NOTEBOOK_SMALL", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # let ipykernel pick the inline backend
    for var in ("IPYTHONDIR", "JUPYTER_RUNTIME_DIR", "MPLCONFIGDIR"):  # keep the kernel's files out of $HOME
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the small run must not download anything

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        km=_kernel_manager(tmp_path),
        timeout=300,
        resources={"metadata": {"path": str(work)}},  # the kernel's working directory
    )
    client.execute()  # raises CellExecutionError if any cell errors

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) >= 2, "the data and the discovered parts are shown inline"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "reloaded model gives the same part maps: True" in text
    assert "RUN_CUB is False: skipped" in text
    out = work / "mpae_quickstart"
    assert out.is_dir(), "the notebook writes into its working directory only"
    folder = sorted((out / "my_images").glob("*.png"))
    overlays = sorted((out / "predictions").glob("*_overlay.png"))
    assert folder and len(overlays) == len(folder), "mpae predict writes one overlay per image of the folder"
    assert f"mpae predict wrote {3 * len(folder)} files for {len(folder)} images" in text
    assert "test/keypoint_nmi" in text and "test/mask_nmi" in text, "the parts are scored against ground truth"
