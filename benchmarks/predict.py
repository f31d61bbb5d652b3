"""Time the inference map (images -> (B, K+1, 128, 128) part probabilities) and its peak memory; prints JSON.

    python benchmarks/predict.py --device cuda --precision bf16 --batch-size 64 --image-size 224
    python benchmarks/predict.py --device cpu --batch-size 4 --authors-repo ~/src/MPAE --dinov2-repo ~/src/dinov2
    python benchmarks/predict.py --base-src .bench_base/src       # ours vs an earlier checkout
    python benchmarks/predict.py --compare-dtypes --device cpu --threads 2 --batch-size 2   # float32 vs bf16

What ``MPAEModule.predict_step``/``test_step`` compute, under ``torch.inference_mode`` as
Lightning runs them (bf16: under autocast, as ``precision="bf16-mixed"``). The authors'
map is their model's evaluation forward (``trainable=False``: F upsampled, then the dot
product and softmax). Random weights, full-size model, implementations interleaved in
one process as in ``train_step.py``.

``--compare-dtypes`` times this checkout's map in float32 (``fp32``: the default, as ``mpae
test`` scores), under bf16 autocast (``bf16_mixed``: what ``--trainer.precision bf16-mixed``
runs: only the backbone in bf16) and with the opt-in ``predict_parts(dtype=torch.bfloat16)``
(``bf16``: ``predict_precision: bf16``), alternating them in one process. It reports paired
speed ratios (median over rounds of the other's time / bf16's time), the label agreement with
``fp32`` (percent of map pixels whose argmax equals float32's) and the largest probability
difference. ``--precision`` is ignored then.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from _common import (
    REPO_SRC,
    add_common_arguments,
    add_if_it_runs,
    autocast,
    build_authors,
    build_ours,
    device_name,
    interleaved,
    prepare,
    print_report,
    static_bytes,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--compile", action="store_true", help="time ours with MPAE.compile_regions() applied")
    parser.add_argument("--compare-dtypes", action="store_true",
                        help="time ours in float32 against predict_parts(dtype=torch.bfloat16), with label agreement")
    args = parser.parse_args()
    if args.compare_dtypes:
        compare_dtypes(args)
        return

    device, mini_group, images = prepare(args)
    steps, static, errors, shapes = {}, {}, {}, {}

    def add_ours(name: str, src: str) -> None:
        torch.manual_seed(0)
        model = build_ours(src, f"_bench_{name}", args.num_parts, args.image_size, mini_group, device).model
        model.eval()
        if args.compile and name == "ours":
            model.compile_regions()

        def step() -> None:
            with torch.inference_mode(), autocast(device, args.precision):
                shapes[name] = tuple(model.predict_parts(images).shape)

        steps[name], static[name] = step, lambda: static_bytes(model)

    if not args.no_ours:
        add_ours("ours", REPO_SRC)
    if args.base_src:
        add_ours("base", args.base_src)
    if args.authors_repo:
        torch.manual_seed(0)
        model, _, _ = build_authors(args.authors_repo, args.dinov2_repo, args.num_parts, args.image_size,
                                    mini_group, device)
        model.eval()

        def authors_step() -> None:
            with torch.inference_mode(), autocast(device, args.precision):
                shapes["authors"] = tuple(model(images).shape)

        add_if_it_runs("authors", authors_step, lambda: static_bytes(model), steps, static, errors)

    results = interleaved(steps, static, device, args.steps, args.warmup)
    for name, result in results.items():
        result["images_per_second"] = round(args.batch_size / result["seconds"], 1)
        result["output_shape"] = list(shapes[name])
    print_report("predict", args, device, results, steps, errors)


def compare_dtypes(args: argparse.Namespace) -> None:
    """float32 vs opt-in bf16 inference of one model on one batch: speed (interleaved) and agreement."""
    device, mini_group, images = prepare(args)
    torch.manual_seed(0)
    model = build_ours(REPO_SRC, "_bench_ours", args.num_parts, args.image_size, mini_group, device).model.eval()
    if args.compile:
        model.compile_regions()
    maps: dict[str, torch.Tensor] = {}

    def step(name: str, dtype: torch.dtype | None):
        def run() -> None:
            with torch.inference_mode():
                maps[name] = model.predict_parts(images, dtype=dtype)
        return run

    def mixed() -> None:
        with torch.inference_mode(), autocast(device, "bf16"):
            maps["bf16_mixed"] = model.predict_parts(images)

    steps = {"fp32": step("fp32", None), "bf16_mixed": mixed, "bf16": step("bf16", torch.bfloat16)}
    static = {name: (lambda: static_bytes(model)) for name in steps}
    results = interleaved(steps, static, device, args.steps, args.warmup)
    for result in results.values():
        result["images_per_second"] = round(args.batch_size / result["seconds"], 1)
    exact = maps["fp32"].float()

    def agreement(name: str) -> float:
        return round(100 * (exact.argmax(dim=1) == maps[name].argmax(dim=1)).double().mean().item(), 3)

    def paired(other: str, key: str = "all_seconds") -> float:
        return round(statistics.median(a / b for a, b in zip(results[other][key], results["bf16"][key])), 3)

    print(json.dumps({
        "benchmark": "predict_dtypes",
        "device": device_name(device),
        "precision": "fp32 vs bf16",
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "num_parts": args.num_parts,
        "steps": args.steps,
        "compile": args.compile,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "output_shape": list(exact.shape),
        "model": "random weights (full size): agreement on a trained model may differ",
        "results": results,
        # the other's time over bf16's time: > 1 means the opt-in bf16 is faster.
        "speedup": {
            "bf16_vs_fp32": round(results["fp32"]["seconds"] / results["bf16"]["seconds"], 3),
            "paired_bf16_vs_fp32": paired("fp32"),
            "paired_cpu_bf16_vs_fp32": paired("fp32", "all_cpu_seconds"),
            "paired_bf16_vs_bf16_mixed": paired("bf16_mixed"),
        },
        "label_agreement_percent": agreement("bf16"),
        "max_prob_diff": round((exact - maps["bf16"].float()).abs().max().item(), 5),
        "mean_prob_diff": round((exact - maps["bf16"].float()).abs().mean().item(), 6),
        "bf16_mixed_label_agreement_percent": agreement("bf16_mixed"),
    }))


if __name__ == "__main__":
    main()
