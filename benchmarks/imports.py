"""Start-up cost of the ``mpae`` command and of importing the package; prints JSON.

Each case runs in a fresh interpreter, several times, cases alternating round by round (A, B,
C, D, D, C, B, A, ...) so that the slow and fast phases of a shared machine hit them alike:

* ``mpae --version`` and ``mpae --help``: the installed console script;
* ``import mpae_lightning.models``: the pure-PyTorch model, as a library user imports it;
* ``import mpae_lightning``: the top-level package.

``cpu_seconds`` is the child's user + system CPU time (``resource.getrusage(RUSAGE_CHILDREN)``
before and after), which tracks the work done even when other jobs steal the cores;
``wall_seconds`` is the wall clock. Medians over ``--repeats`` runs, after ``--warmup`` runs that
write the bytecode caches. ``imports`` says which heavy packages each case loads: the same
work run once more inside ``python -c``, which then reads ``sys.modules`` (for the command, the
``mpae`` console-script entry point is called with the same arguments, its output discarded).

Usage::

    python benchmarks/imports.py [--repeats 5] [--warmup 1]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

#: Packages whose presence in ``sys.modules`` is reported (heavy, or what a light import must avoid).
WATCHED = (
    "torch",
    "lightning",
    "lightning.pytorch",
    "torchvision",
    "timm",
    "torchmetrics",
    "jsonargparse",
    "sklearn",
    "scipy",
    "pycocotools",
    "matplotlib",
    "tensorboard",
    "PIL",
    "pandas",
)

#: Run inside ``python -c``: call the ``mpae`` entry point with argv[1:], then list the watched modules.
_PROBE_COMMAND = """
import contextlib, importlib.metadata, io, json, sys
argv, watched = json.loads(sys.argv[1]), json.loads(sys.argv[2])
(ep,) = importlib.metadata.entry_points(group="console_scripts", name="mpae")
sys.argv = ["mpae", *argv]
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    try:
        ep.load()()
    except SystemExit:
        pass
print(json.dumps({"entry_point": ep.value, "modules": {m: m in sys.modules for m in watched}}))
"""

_PROBE_IMPORT = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps({"modules": {m: m in sys.modules for m in json.loads(sys.argv[2])}}))
"""


def _mpae_script() -> str:
    """The console script installed beside this interpreter (else the one on PATH)."""
    beside = Path(sys.executable).with_name("mpae")
    found = str(beside) if beside.is_file() else shutil.which("mpae")
    if found is None:
        raise SystemExit("no `mpae` console script: run `pip install -e .` in this virtualenv first")
    return found


def cases() -> dict[str, tuple[list[str], list[str]]]:
    """Case name -> (the timed command, the probe command that reports its imports)."""
    mpae, python, watched = _mpae_script(), sys.executable, json.dumps(WATCHED)
    out = {}
    for flag in ("--version", "--help"):
        out[f"mpae {flag}"] = ([mpae, flag], [python, "-c", _PROBE_COMMAND, json.dumps([flag]), watched])
    for module in ("mpae_lightning.models", "mpae_lightning"):
        out[f"import {module}"] = ([python, "-c", f"import {module}"], [python, "-c", _PROBE_IMPORT, module, watched])
    return out


def timed_run(command: list[str]) -> tuple[float, float]:
    """(CPU seconds of the child, wall seconds) of one run; a failing command stops the benchmark."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit {done.returncode}):\n{done.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, wall


def probe(command: list[str]) -> dict[str, object]:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per case first (bytecode caches)")
    args = parser.parse_args()

    runs = cases()
    names = list(runs)
    for _ in range(args.warmup):
        for name in names:
            timed_run(runs[name][0])
    cpu: dict[str, list[float]] = {name: [] for name in names}
    wall: dict[str, list[float]] = {name: [] for name in names}
    for i in range(args.repeats):
        for name in names if i % 2 == 0 else reversed(names):
            c, w = timed_run(runs[name][0])
            cpu[name].append(c)
            wall[name].append(w)

    results = {}
    for name in names:
        found = probe(runs[name][1])
        modules = found.get("modules", {})
        results[name] = {
            "cpu_seconds": round(statistics.median(cpu[name]), 3),
            "min_cpu_seconds": round(min(cpu[name]), 3),
            "wall_seconds": round(statistics.median(wall[name]), 3),
            "all_cpu_seconds": [round(t, 3) for t in cpu[name]],  # in run order, to see the spread
            "imports_torch": modules.get("torch"),
            "imports_lightning": modules.get("lightning"),
            "imported": sorted(m for m, present in modules.items() if present),
            **({"entry_point": found["entry_point"]} if "entry_point" in found else {}),
            **({"probe_error": found["error"]} if "error" in found else {}),
        }
    print(json.dumps({
        "benchmark": "imports",
        "repeats": args.repeats,
        "warmup": args.warmup,
        "results": results,
        "versions": {
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
        },
    }, indent=2))


if __name__ == "__main__":
    main()
