"""Shared helpers of the benchmark scripts: model builders, interleaved timing, memory accounting.

Implementations timed side by side in one process:

* ``ours``: this checkout's ``src/mpae_lightning``;
* ``base``: another checkout's source tree (``--base-src``, e.g. a copy of an earlier
  commit), to measure a change on the same machine in the same run;
* ``authors``: the authors' code (``--authors-repo``, a local clone of
  github.com/Jiahao-UTS/MPAE, with Meta's DINOv2 code from ``--dinov2-repo``).

Only ``mpae_lightning.models`` (and ``mpae_lightning.losses``, where a checkout keeps the
objective there) is imported, without running the package's ``__init__`` (which imports the
data modules and their optional dependencies such as pycocotools), so the scripts run
wherever torch, torchvision and timm are installed.
All models get random weights: speed and memory do not depend on the values.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import torch
from torch import nn

REPO_SRC = Path(__file__).resolve().parents[1] / "src"


# --------------------------------------------------------------------------- our models
def load_models_package(src: str | Path, alias: str) -> ModuleType:
    """Import ``<src>/mpae_lightning/models`` as ``<alias>.models`` without the package ``__init__``.

    The models and losses use relative imports only, so two source trees (this one and
    an earlier commit's) can live side by side in one process under different aliases.
    """
    package_dir = Path(src).expanduser().resolve() / "mpae_lightning"
    if not (package_dir / "models" / "__init__.py").is_file():
        raise SystemExit(f"{src}: no mpae_lightning/models package under this source directory")
    if alias not in sys.modules:
        package = types.ModuleType(alias)
        package.__path__ = [str(package_dir)]
        package.__file__ = str(package_dir / "__init__.py")
        sys.modules[alias] = package
    return importlib.import_module(f"{alias}.models")


def uses_fused_adam(src: str | Path) -> bool:
    """Whether the checkout's ``MPAEModule`` picks Adam's fused kernel without mixed precision.

    Read from its source, because the benchmarks import only ``mpae_lightning.models``."""
    module = Path(src) / "mpae_lightning" / "lightning_module.py"
    return module.is_file() and "def _fused_adam" in module.read_text()


class Ours:
    """One checkout's MPAE at full size (DINOv2 ViT-B/14 reg4, VGG-19, C=256) with random weights, its
    objective and its Adam, over the two layouts a checkout may have: the objective as
    ``losses.MPAELoss`` next to the model (``criterion``), or inside ``MPAE`` (``compute_losses``,
    commits before the core reshape)."""

    def __init__(self, src: str | Path, alias: str, num_parts: int, image_size: int, mini_group: int,
                 device: torch.device, fused: bool = False) -> None:
        models = load_models_package(src, alias)
        losses_dir = Path(src).expanduser().resolve() / "mpae_lightning" / "losses"
        objective = (losses_dir / "objective.py").is_file()
        self.models = models
        self.criterion: nn.Module | None = None
        if objective:
            self.model = models.MPAE(num_parts=num_parts, image_size=image_size, backbone_weights="random").to(device)
            losses = importlib.import_module(f"{alias}.losses")
            self.criterion = losses.MPAELoss(mini_group=mini_group, vgg_weights="random").to(device)
        else:
            self.model = models.MPAE(num_parts=num_parts, image_size=image_size, backbone_weights="random",
                                     vgg_weights="random", mini_group=mini_group).to(device)
        self.optimizer = torch.optim.Adam(self.model.trainable_parameters(), lr=5e-4, fused=fused or None)

    @property
    def vgg(self) -> nn.Module:
        return self.criterion.vgg if self.criterion is not None else self.model.restoration_loss.features

    def train(self) -> None:
        self.model.train()
        if self.criterion is not None:
            self.criterion.train()

    def resolve_vgg(self) -> None:
        if self.criterion is not None:
            self.criterion.resolve()
        else:
            self.model.resolve_vgg()

    def total_loss(self, images: torch.Tensor) -> torch.Tensor:
        """The training objective of one batch (what ``MPAEModule.training_step`` minimises)."""
        if self.criterion is not None:
            return self.criterion(self.model(images))["total"]
        return self.model.compute_losses(images).total

    def restoration_loss(self, restored: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.criterion is not None:
            return self.criterion.restoration(restored, target)["restoration"]
        return self.model.restoration_loss(restored, target)["restoration"]

    def compile_regions(self) -> None:
        self.model.compile_regions()
        if self.criterion is not None and hasattr(self.criterion, "compile_regions"):
            self.criterion.compile_regions()

    def modules(self) -> list[nn.Module]:
        return [self.model] + ([self.criterion] if self.criterion is not None else [])


def build_ours(
    src: str | Path, alias: str, num_parts: int, image_size: int, mini_group: int, device: torch.device,
    fused: bool = False,
) -> Ours:
    """:class:`Ours` for the checkout at ``src`` (``fused``: Adam's fused kernel, as ``MPAEModule``
    picks it in full precision)."""
    return Ours(src, alias, num_parts, image_size, mini_group, device, fused)


# --------------------------------------------------------------------------- authors' model
@contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _load_file(module_name: str, path: Path) -> ModuleType:
    if not path.is_file():
        raise SystemExit(f"authors' code: {path} is missing (is --authors-repo a clone of Jiahao-UTS/MPAE?)")
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def _dinov2_builder(dinov2_repo: str | None) -> Callable[..., nn.Module]:
    """``dinov2_vitb14_reg`` from a local copy of facebookresearch/dinov2 (what ``torch.hub.load`` fetches)."""
    candidates = [dinov2_repo] if dinov2_repo else [str(Path(torch.hub.get_dir()) / "facebookresearch_dinov2_main")]
    for root in candidates:
        if root and (Path(root).expanduser() / "dinov2" / "hub" / "backbones.py").is_file():
            sys.path.insert(0, str(Path(root).expanduser().resolve()))
            try:
                from dinov2.hub.backbones import dinov2_vitb14_reg
            finally:
                sys.path.pop(0)
            return dinov2_vitb14_reg
    raise SystemExit(
        f"authors' code needs Meta's DINOv2 model code: pass --dinov2-repo /path/to/dinov2 "
        f"(a clone of facebookresearch/dinov2); looked in {candidates}"
    )


def build_authors(
    repo: str, dinov2_repo: str | None, num_parts: int, image_size: int, mini_group: int, device: torch.device
) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    """The authors' ``MPAE`` module and ``Vgg19`` as their ``train.py`` builds them, with random weights.

    Only import plumbing is adapted, never the model's arithmetic: ``backbone`` and
    ``utils`` are assembled from just the files ``MPAE.py`` needs (their ``utils/__init__``
    also imports OpenCV and logging helpers), ``torch.hub.load`` builds DINOv2 from a local
    copy of Meta's code without downloading weights, torchvision's VGG-19 is created
    without downloading weights, and ``np.float`` (removed in NumPy 1.24, used by their
    sin-cos tables) is aliased to ``float``.
    """
    import numpy as np
    import torchvision

    root = Path(repo).expanduser().resolve()
    if not hasattr(np, "float"):
        np.float = float  # type: ignore[attr-defined]
    saved = {name: sys.modules.pop(name, None) for name in ("backbone", "utils")}
    try:
        for name, files in (
            ("backbone", {"Transformer": "Get_vit", "Arcmagrin": "ArcMarginProduct", "MAE": "MaskedAutoencoderViT"}),
            ("utils", {"presence_loss": ("EnforcedPresenceLoss", "PresenceLoss"), "total_variation": "TotalVariationLoss"}),
        ):
            package = types.ModuleType(name)
            package.__path__ = [str(root / name)]
            sys.modules[name] = package
            for file, symbols in files.items():
                module = _load_file(f"{name}.{file}", root / name / f"{file}.py")
                for symbol in (symbols,) if isinstance(symbols, str) else symbols:
                    setattr(package, symbol, getattr(module, symbol))
        authors_mpae = _load_file("authors_MPAE", root / "MPAE.py")
        vgg_module = _load_file("authors_VGG", root / "backbone" / "VGG.py")
    finally:
        for name, module in saved.items():
            sys.modules.pop(name, None)
            if module is not None:
                sys.modules[name] = module

    build_dinov2 = _dinov2_builder(dinov2_repo)
    cfg = SimpleNamespace(MODEL=SimpleNamespace(BACKGROUND=1))
    grid = image_size // 14
    with _patched(torch.hub, "load", lambda *args, **kwargs: build_dinov2(pretrained=False)):
        model = authors_mpae.MPAE(num_parts + 1, 256, 128 / grid, image_size, mini_group, 0.9, cfg)
    random_vgg19 = torchvision.models.vgg19
    with _patched(vgg_module.models, "vgg19", lambda *args, **kwargs: random_vgg19(weights=None)):
        vgg = vgg_module.Vgg19()
    for p in model.backbone1.parameters():  # as their train.py does
        p.requires_grad = False
    model, vgg = model.to(device), vgg.to(device).eval()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
    return model, vgg, optimizer


# --------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def static_bytes(*objects: nn.Module | torch.optim.Optimizer) -> int:
    """Bytes held between steps: parameters, buffers, cached weight copies and optimizer state (each storage once)."""
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and t.device.type != "cpu":
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()

    for obj in objects:
        if isinstance(obj, nn.Module):
            for t in list(obj.parameters()) + list(obj.buffers()):
                add(t)
            for module in obj.modules():  # half-precision copies of frozen weights, kept between steps
                for t in (module.__dict__.get("_autocast_weight_copies") or ((), {}))[1].values():
                    add(t)
        else:
            for state in obj.state.values():
                for t in state.values():
                    add(t)
    return total


def interleaved(
    steps: dict[str, Callable[[], Any]],
    static: dict[str, Callable[[], int]],
    device: torch.device,
    repeats: int,
    warmup: int,
) -> dict[str, dict[str, float | None]]:
    """Median seconds per call of each step, calls alternating A, B, (C), B, A, ... to cancel drift.

    On CUDA, the peak memory of a step counts its own static tensors plus what the step
    allocates on top of everything resident (the other implementations' static tensors are
    subtracted), i.e. what the implementation would peak at alone.
    """
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu_times: dict[str, list[float]] = {name: [] for name in names}
    peaks: dict[str, int] = {name: 0 for name in names}
    for i in range(repeats):
        for name in names if i % 2 == 0 else reversed(names):
            if device.type == "cuda":
                resident = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            steps[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
            if device.type == "cuda":
                others = resident - static[name]()
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device) - others)
    return {
        name: {
            "seconds": round(statistics.median(times[name]), 4),
            "min_seconds": round(min(times[name]), 4),
            # CPU time of the whole process: on a shared machine (other jobs stealing the cores)
            # with --threads 1 this tracks the work done better than the wall clock.
            "cpu_seconds": round(statistics.median(cpu_times[name]), 4),
            "peak_memory_gib": round(peaks[name] / 2**30, 2) if device.type == "cuda" else None,
            "all_seconds": [round(t, 3) for t in times[name]],  # in call order, to see the spread
            "all_cpu_seconds": [round(t, 3) for t in cpu_times[name]],
        }
        for name in names
    }


def speedups(results: dict[str, dict[str, Any]], timed: dict[str, Any]) -> dict[str, float]:
    """Their median time over ours, on the wall clock and (``cpu_...``) on the process CPU time, and
    (``paired_...``) the median over rounds of their time over ours in the same round.

    Why the paired ratio: a shared or virtual machine runs in slow and fast phases of several
    seconds; the two calls of one round share a phase, while the medians of the two lists can fall
    in different phases and then compare a slow step with a fast one.
    """
    out = {}
    for other in ("base", "authors"):
        if other in timed and "ours" in timed:
            out[f"ours_vs_{other}"] = round(results[other]["seconds"] / results["ours"]["seconds"], 3)
            out[f"cpu_ours_vs_{other}"] = round(results[other]["cpu_seconds"] / results["ours"]["cpu_seconds"], 3)
            pairs = zip(results[other]["all_seconds"], results["ours"]["all_seconds"])
            out[f"paired_ours_vs_{other}"] = round(statistics.median(theirs / ours for theirs, ours in pairs), 3)
            if "all_cpu_seconds" in results[other] and "all_cpu_seconds" in results["ours"]:
                pairs = zip(results[other]["all_cpu_seconds"], results["ours"]["all_cpu_seconds"])
                out[f"paired_cpu_ours_vs_{other}"] = round(statistics.median(theirs / ours for theirs, ours in pairs), 3)
    return out


def setup_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def prepare(args: Any) -> tuple[torch.device, int, torch.Tensor]:
    """What every benchmark sets up first: threads, the device, the mini-group and the seeded input batch."""
    setup_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    return device, min(8, args.batch_size), images


def add_if_it_runs(name: str, step: Callable[[], Any], static_fn: Callable[[], int], steps: dict[str, Any],
                   static: dict[str, Any], errors: dict[str, str]) -> None:
    """Time ``step`` under ``name`` if one call succeeds; otherwise record why (e.g. the authors'
    BCE refuses autocast, so their code cannot run bf16)."""
    try:
        step()
    except Exception as err:  # noqa: BLE001 - reported in the JSON instead
        errors[name] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
        return
    steps[name], static[name] = step, static_fn


def print_report(benchmark: str, args: Any, device: torch.device, results: dict[str, Any], steps: dict[str, Any],
                 errors: dict[str, str]) -> None:
    """One JSON line: the settings, each implementation's result (or why it could not run) and the speed-ups."""
    for name, error in errors.items():
        results[name] = {"error": error}
    print(json.dumps({
        "benchmark": benchmark,
        "device": device_name(device),
        "precision": args.precision,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "num_parts": args.num_parts,
        "steps": args.steps,
        "compile": args.compile,
        "winograd": getattr(args, "winograd", False),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "results": results,
        "speedup": speedups(results, steps),
    }))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)"


def autocast(device: torch.device, precision: str) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def add_common_arguments(parser: Any) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-parts", type=int, default=16)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU runs); default: torch's choice")
    parser.add_argument("--steps", type=int, default=10, help="timed calls per implementation")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--base-src", help="another checkout's src/ directory to time in the same run (e.g. .bench_base/src)")
    parser.add_argument("--authors-repo", help="local clone of github.com/Jiahao-UTS/MPAE to time in the same run")
    parser.add_argument("--dinov2-repo", help="local clone of facebookresearch/dinov2 (default: the torch.hub cache)")
    parser.add_argument("--no-ours", action="store_true", help="time only --base-src / --authors-repo")
