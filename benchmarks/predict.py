"""Time the inference map (images -> (B, K+1, 128, 128) part probabilities) and its peak memory; prints JSON.

    python benchmarks/predict.py --device cuda --precision bf16 --batch-size 64 --image-size 224
    python benchmarks/predict.py --device cpu --batch-size 4 --authors-repo ~/src/MPAE --dinov2-repo ~/src/dinov2
    python benchmarks/predict.py --base-src .bench_base/src       # ours vs an earlier checkout

What ``MPAEModule.predict_step``/``test_step`` compute, under ``torch.inference_mode`` as
Lightning runs them (bf16: under autocast, as ``precision="bf16-mixed"``). The authors'
map is their model's evaluation forward (``trainable=False``: F upsampled, then the dot
product and softmax). Random weights, full-size model, implementations interleaved in
one process as in ``train_step.py``.
"""
from __future__ import annotations

import argparse

import torch

from _common import (
    REPO_SRC,
    add_common_arguments,
    add_if_it_runs,
    autocast,
    build_authors,
    build_ours,
    interleaved,
    prepare,
    print_report,
    static_bytes,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--compile", action="store_true", help="time ours with MPAE.compile_regions() applied")
    args = parser.parse_args()

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


if __name__ == "__main__":
    main()
