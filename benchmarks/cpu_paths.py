"""Time the frozen networks' CPU paths, each against the plain layers, in one process; prints JSON.

    python benchmarks/cpu_paths.py --threads 2 --batch-size 4 --steps 12 --warmup 2
    python benchmarks/cpu_paths.py --threads 2 --batch-size 4 --steps 12 --compile   # + torch.compile variants

Parts, each timed with its variants alternating (as in ``train_step.py``), paired ratios against
``plain``:

* ``restoration``: the restoration loss of a training step (VGG-19 forward on the 4 targets without
  grad, forward on the 4 restored images and backward to them; 128-px restorations at 224 px input).
  Variants: ``plain`` (the default: channels-last ``nn.Conv2d``), ``winograd``
  (``VGGFeatures.winograd_cpu = True``) and, with ``--compile``, ``compiled`` (``torch.compile`` of
  the VGG module);
* ``backbone``: the frozen DINOv2 ViT-B/14 forward without grad. Variants: ``plain`` and, with
  ``--compile``, ``compiled_blocks`` (each block compiled, as ``MPAE.compile_regions`` does) and
  ``compiled`` (the whole ``forward_features``).

Compilation time (the first call of a compiled variant, forward and backward) is reported as
``compile_seconds``. Random weights, public PyTorch only.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
import torch.nn.functional as F

from _common import REPO_SRC, add_common_arguments, device_name, interleaved, load_models_package, prepare, speedups


def _first_call_seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return round(time.perf_counter() - start, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--compile", action="store_true", help="add the torch.compile variants")
    parser.add_argument("--parts", default="restoration,backbone", help="comma-separated parts to time")
    args = parser.parse_args()
    device, _, images = prepare(args)
    load_models_package(REPO_SRC, "_bench_ours")
    import importlib

    models = importlib.import_module("_bench_ours.models")
    losses = importlib.import_module("_bench_ours.losses")
    generator = torch.Generator().manual_seed(0)
    side = args.image_size // 14 * 8
    restored = torch.randn(args.batch_size, 3, side, side, generator=generator).to(device).requires_grad_()
    target = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)
    parts: dict[str, dict[str, object]] = {}
    compile_seconds: dict[str, float] = {}

    if "restoration" in args.parts:
        torch.manual_seed(0)
        vgg = losses.VGGFeatures("random").to(device)
        variants = {"plain": losses.RestorationLoss(vgg)}
        winograd = copy.deepcopy(vgg)
        winograd.winograd_cpu = True
        variants["winograd"] = losses.RestorationLoss(winograd)
        if args.compile:
            variants["compiled"] = losses.RestorationLoss(torch.compile(copy.deepcopy(vgg)))

        def restoration(loss=None) -> None:
            torch.autograd.grad(loss(restored, target)["restoration"], restored)

        parts["restoration"] = {name: (lambda loss=loss: restoration(loss)) for name, loss in variants.items()}
        if args.compile:
            compile_seconds["restoration"] = _first_call_seconds(parts["restoration"]["compiled"])

    if "backbone" in args.parts:
        torch.manual_seed(0)
        backbone = models.FrozenBackbone(weights="random").to(device)
        variants = {"plain": backbone}
        if args.compile:
            blocks = copy.deepcopy(backbone)
            for block in blocks.vit.blocks:
                block.compile(dynamic=False)
            variants["compiled_blocks"] = blocks
            whole = copy.deepcopy(backbone)
            whole.vit.forward_features = torch.compile(whole.vit.forward_features, dynamic=False)
            variants["compiled"] = whole
        parts["backbone"] = {name: (lambda m=m: m(images)) for name, m in variants.items()}
        for name in ("compiled_blocks", "compiled"):
            if name in parts["backbone"]:
                compile_seconds[f"backbone_{name}"] = _first_call_seconds(parts["backbone"][name])

    results = {}
    for part, calls in parts.items():
        timed = interleaved(calls, {n: (lambda: 0) for n in calls}, device, args.steps, args.warmup)
        results[part] = {name: {key: r[key] for key in ("seconds", "min_seconds", "cpu_seconds", "all_seconds")}
                         for name, r in timed.items()}
        for name in calls:
            if name != "plain":
                pairs = {"ours": timed[name], "base": timed["plain"]}
                ratios = speedups(pairs, pairs)
                results[part][name]["paired_vs_plain"] = ratios["paired_ours_vs_base"]
                results[part][name]["paired_cpu_vs_plain"] = ratios["paired_cpu_ours_vs_base"]
    print(json.dumps({
        "benchmark": "cpu_paths",
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "device": device_name(device),
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "steps": args.steps,
        "torch": torch.__version__,
        "compile_seconds": compile_seconds,
        "results": results,
    }))


if __name__ == "__main__":
    main()
