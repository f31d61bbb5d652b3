"""Time MPAE training steps (forward, backward, clipping, Adam) and their peak memory; prints JSON.

    python benchmarks/train_step.py --device cuda --precision bf16 --batch-size 64 --image-size 224
    python benchmarks/train_step.py --device cpu --batch-size 4 --steps 10 \\
        --authors-repo ~/src/MPAE --dinov2-repo ~/src/dinov2         # ours vs the authors' code
    python benchmarks/train_step.py --base-src .bench_base/src          # ours vs an earlier checkout
    python benchmarks/train_step.py --device cpu --batch-size 2 --steps 1 --warmup 0   # smoke run

The model is the paper's full-size configuration (DINOv2 ViT-B/14 with registers,
VGG-19, K=16, C=256) with random weights; nothing is downloaded. Every implementation
named runs in this one process, steps alternating between them, so that the ratios
hold on a shared or throttling machine; each reports the median step time.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

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
    uses_fused_adam,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--compile", action="store_true", help="time ours with MPAE.compile_regions() applied")
    parser.add_argument("--winograd", action="store_true",
                        help="time ours with VGGFeatures.winograd_cpu = True (the opt-in CPU float32 VGG path)")
    args = parser.parse_args()

    device, mini_group, images = prepare(args)
    steps, static, errors, losses = {}, {}, {}, {}

    def add_ours(name: str, src: str) -> None:
        torch.manual_seed(0)
        # Adam as the checkout's MPAEModule builds it: fused in full precision where it does so.
        fused = args.precision == "fp32" and uses_fused_adam(src)
        ours = build_ours(src, f"_bench_{name}", args.num_parts, args.image_size, mini_group, device, fused)
        ours.train()
        if args.compile and name == "ours":
            ours.compile_regions()
        if args.winograd and name == "ours":
            ours.vgg.winograd_cpu = True
        params, optimizer = ours.model.trainable_parameters(), ours.optimizer

        def step() -> None:
            with autocast(device, args.precision):
                loss = ours.total_loss(images)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 2.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses[name] = loss.detach()

        steps[name], static[name] = step, lambda: static_bytes(*ours.modules(), optimizer)

    if not args.no_ours:
        add_ours("ours", REPO_SRC)
    if args.base_src:
        add_ours("base", args.base_src)
    if args.authors_repo:
        torch.manual_seed(0)
        model, vgg, optimizer = build_authors(args.authors_repo, args.dinov2_repo, args.num_parts, args.image_size,
                                              mini_group, device)
        model.train()
        model.backbone1.eval()
        # Their data loader supplies the 8x-downsampled restoration target; made once here.
        restored = args.image_size // 14 * 8
        small = F.interpolate(images, size=(restored, restored), mode="bilinear", align_corners=False)

        def authors_step() -> None:
            with autocast(device, args.precision):
                presence, restoration, variation, entropy, semantic = model(images, small, vgg, True)
                loss = restoration + 0.5 * (variation + entropy) + 1.0 * presence + 0.25 * semantic
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
            optimizer.step()
            losses["authors"] = loss.detach()

        add_if_it_runs("authors", authors_step, lambda: static_bytes(model, vgg, optimizer), steps, static, errors)

    results = interleaved(steps, static, device, args.steps, args.warmup)
    for name, result in results.items():
        result["images_per_second"] = round(args.batch_size / result["seconds"], 1)
        result["loss_finite"] = bool(torch.isfinite(losses[name]).item())
    print_report("train_step", args, device, results, steps, errors)


if __name__ == "__main__":
    main()
