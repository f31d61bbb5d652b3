"""``make demo``: train MPAE on synthetic parts on the CPU and write a report a person can look at.

    python -m mpae_lightning.demo --config configs/demo.yaml --out reports/demo

Writes ``metrics.json`` (trained vs untrained MPAE vs k-means on the backbone's
features, keypoint and mask NMI/ARI in percent), ``parts.png`` (test images, the
discovered parts, ground truth and restored images), ``parts_untrained.png``,
the Lightning checkpoint and the TensorBoard log.
"""
from __future__ import annotations

import argparse
import copy
import json
import signal
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer

from .baselines import KMeansParts
from .callbacks import PartVisualization
from .cli import MPAECLI, quiet_lightning
from .errors import Interrupted, run_cleanly, split_debug
from .lightning_module import MPAEModule
from .metrics import KeypointPartMetrics, MaskPartMetrics
from .visualize import picture_title, save_grid


def _split_scores(logged: dict[str, Any]) -> dict[str, dict[str, float]]:
    get = lambda k: round(float(logged[f"test/{k}"]), 2)  # noqa: E731
    return {
        "keypoint": {k: get(f"keypoint_{k}") for k in ("nmi", "ari", "fg_nmi", "fg_ari")},
        "mask": {"nmi": get("mask_nmi"), "ari": get("mask_ari")},
        "parts_per_image": get("parts_per_image"),
    }


def evaluate(module: MPAEModule, datamodule: Any) -> dict[str, dict[str, float]]:
    """Test-split keypoint and mask scores of ``module`` (a throw-away Trainer, no logging)."""
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False)
    logged = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    return _split_scores(logged)


def evaluate_kmeans(module: MPAEModule, datamodule: Any, max_fit_images: int = 256) -> dict[str, dict[str, float]]:
    """The direct-clustering baseline on the same backbone, scored like MPAE."""
    model = module.model
    datamodule.setup("fit")
    datamodule.setup("test")
    # Fitted on training images, like MPAE; scored on the test split.
    kmeans = KMeansParts(model.backbone, model.num_parts + 1, model.grid_size)
    kmeans.fit(datamodule.train_dataloader(), max_fit_images)
    keypoint = KeypointPartMetrics(datamodule.num_keypoints, model.num_parts)
    mask = MaskPartMetrics(datamodule.num_mask_labels, model.num_parts)
    map_size = round(model.grid_size[0] * model.eval_scale_factor)
    for batch in datamodule.test_dataloader():
        scores = kmeans.predict_parts(batch["image"], map_size)
        keypoint.update(scores, batch["keypoints"], batch["visible"], model.image_size)
        mask.update(scores, batch["mask"])
    kp, mk = keypoint.compute(), mask.compute()
    return {
        "keypoint": {k: round(float(kp[k]), 2) for k in ("nmi", "ari", "fg_nmi", "fg_ari")},
        "mask": {k: round(float(mk[k]), 2) for k in ("nmi", "ari")},
        "parts_per_image": round(float(kp["parts_per_image"]), 2),
    }


def write_grid(module: MPAEModule, datamodule: Any, path: Path, num_images: int = 8, title: str | None = None) -> None:
    """The validation picture of the first test images, written to ``path`` under ``title``."""
    batch = next(iter(datamodule.test_dataloader()))
    grid = PartVisualization(num_images=num_images).render(module, batch, datamodule, title=title)
    save_grid(path, grid, title=title)


def _title(model: str, module: MPAEModule, scores: dict[str, Any], epoch: int | None = None) -> str:
    return picture_title(model, epoch, ("test keypoint NMI", scores["keypoint"]["nmi"]), module.model.num_parts)


def run_demo(config: str, out: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train, evaluate and write the report; returns the metrics dict written to ``metrics.json``."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    args = ["--config", config, f"--trainer.default_root_dir={out_dir}",
            f"--trainer.logger.init_args.save_dir={out_dir}", *(overrides or [])]
    start = time.time()
    cli = MPAECLI(args=args, run=False)
    module, datamodule, trainer = cli.model, cli.datamodule, cli.trainer

    timings: dict[str, float] = {}

    def phase(name: str, since: float) -> float:
        now = time.time()
        timings[name] = round(now - since, 1)
        return now

    print("[demo] evaluating the untrained model and the k-means baseline ...", flush=True)
    t = time.time()
    untrained = evaluate(copy.deepcopy(module), datamodule)
    write_grid(module, datamodule, out_dir / "parts_untrained.png", title=_title("untrained", module, untrained))
    t = phase("untrained_eval", t)
    kmeans = evaluate_kmeans(module, datamodule)
    t = phase("kmeans", t)

    print("[demo] training MPAE on synthetic parts ...", flush=True)
    trainer.fit(module, datamodule=datamodule)
    t = phase("training", t)
    trained = evaluate(module, datamodule)
    callback = trainer.checkpoint_callback
    checkpoint = (callback.last_model_path or callback.best_model_path) if callback else ""
    name = Path(checkpoint).name if checkpoint else "trained"
    write_grid(module, datamodule, out_dir / "parts.png",
               title=_title(name, module, trained, epoch=max(trainer.current_epoch - 1, 0)))
    phase("trained_eval", t)

    metrics = {
        "trained": trained,
        "untrained": untrained,
        "kmeans": kmeans,
        "config": str(config),
        "epochs": trainer.current_epoch,
        "seconds": round(time.time() - start, 1),
        "phase_seconds": timings,
        "checkpoint": str(trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path)
        if trainer.checkpoint_callback else None,
        "tensorboard": str(Path(trainer.logger.log_dir)) if trainer.logger else None,
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--out", default="reports/demo")
    parser.add_argument("overrides", nargs="*", help="extra mpae CLI arguments, e.g. --trainer.max_epochs=1")
    ns, extra = parser.parse_known_args(argv)
    overrides, debug = split_debug(ns.overrides + extra)
    metrics: dict[str, Any] = {}

    def stopped(stop: Interrupted) -> str:
        name = signal.Signals(stop.signum).name
        at = f" at {stop.where}" if stop.where else ""
        saved = f"; the checkpoint so far is {stop.checkpoint}" if stop.checkpoint else ""
        return f"demo: stopped by {name}{at}{saved}; run the demo again to start over"

    # Settings errors as one line and a signal as a clean stop, as the mpae commands end.
    def demo() -> None:
        with quiet_lightning():  # no Lightning tips or library-internal warnings, as in the mpae commands
            metrics.update(run_demo(ns.config, ns.out, overrides))

    run_cleanly(demo, overrides, debug, stopped)
    row = lambda name: (f"  {name:<10} keypoint NMI {metrics[name]['keypoint']['nmi']:6.2f}  ARI "  # noqa: E731
                        f"{metrics[name]['keypoint']['ari']:6.2f} | mask NMI {metrics[name]['mask']['nmi']:6.2f}  "
                        f"ARI {metrics[name]['mask']['ari']:6.2f}")
    print("\n".join(["[demo] test-split scores (percent):", row("trained"), row("untrained"), row("kmeans")]))
    print(f"[demo] report written to {Path(ns.out).resolve()} (metrics.json, parts.png, TensorBoard: "
          f"tensorboard --logdir {Path(ns.out).resolve()})  [{metrics['seconds']} s]")


if __name__ == "__main__":
    main()
