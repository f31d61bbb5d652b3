"""Time the parts of a training step, ours against an earlier checkout; prints JSON.

    python benchmarks/components.py --device cpu --threads 2 --batch-size 4 --base-src .bench_prev/src

Each part runs alone, ours and base alternating in one process (as in ``train_step.py``),
so that a change's effect can be seen where it happens instead of in the ±5 % jitter of a
whole step on a shared machine:

* ``backbone``: the frozen DINOv2 ViT-B forward (no grad);
* ``restoration``: the restoration loss (VGG-19 on target and restored images) forward and
  backward to the restored image;
* ``descriptor``: the descriptor ViT forward and backward;
* ``restorer``: the masked encoder/decoder forward and backward;
* ``optimizer``: gradient clipping and Adam (built as each checkout's ``MPAEModule`` builds it
  in the given precision).

Full-size model, random weights, same inputs for both.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from _common import (
    REPO_SRC,
    add_common_arguments,
    autocast,
    build_ours,
    device_name,
    interleaved,
    prepare,
    speedups,
    uses_fused_adam,
)

PARTS = ("backbone", "restoration", "descriptor", "restorer", "optimizer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    args = parser.parse_args()
    if not args.base_src:
        parser.error("--base-src is required: the parts are compared against another checkout")

    device, mini_group, images = prepare(args)
    generator = torch.Generator(device="cpu").manual_seed(0)
    calls: dict[str, dict[str, object]] = {part: {} for part in PARTS}

    for name, src in (("ours", REPO_SRC), ("base", args.base_src)):
        torch.manual_seed(0)
        fused = args.precision == "fp32" and uses_fused_adam(src)
        ours = build_ours(src, f"_bench_{name}", args.num_parts, args.image_size, mini_group, device, fused)
        models, model, optimizer = ours.models, ours.model, ours.optimizer
        ours.train()
        ours.resolve_vgg()
        h, w = model.grid_size
        side = h * model.restorer.restore_patch
        restored = torch.randn(args.batch_size, 3, side, side, generator=generator).to(device).requires_grad_()
        target = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)
        filled = torch.randn(args.batch_size, model.restorer.decoder_pos_embed.shape[-1], h, w,
                             generator=generator).to(device).requires_grad_()
        noise = torch.rand(args.batch_size, h * w, generator=generator).to(device)
        ids_keep, _ = models.restorer.random_masking_ids(noise, model.mask_ratio)
        params = model.trainable_parameters()
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).to(device) * 1e-3

        def backbone(model=model) -> None:
            with torch.no_grad(), autocast(device, args.precision):
                model.backbone(images)

        def restoration(ours=ours, restored=restored, target=target) -> None:
            with autocast(device, args.precision):
                loss = ours.restoration_loss(restored, target)
            torch.autograd.grad(loss, restored)

        def descriptor(model=model) -> None:
            with autocast(device, args.precision):
                loss = model.descriptor_vit(images).float().square().mean()
            loss.backward()

        def restorer(model=model, filled=filled, ids_keep=ids_keep) -> None:
            with autocast(device, args.precision):
                loss = model.restorer(images, filled, ids_keep).float().square().mean()
            loss.backward()

        def optimizer_step(params=params, optimizer=optimizer) -> None:
            torch.nn.utils.clip_grad_norm_(params, 2.0)
            optimizer.step()

        for part, fn in zip(PARTS, (backbone, restoration, descriptor, restorer, optimizer_step)):
            calls[part][name] = fn

    results = {}
    for part in PARTS:
        timed = interleaved(calls[part], {n: (lambda: 0) for n in calls[part]}, device, args.steps, args.warmup)
        results[part] = {
            "ours_seconds": timed["ours"]["seconds"],
            "base_seconds": timed["base"]["seconds"],
            "paired_ours_vs_base": speedups(timed, timed)["paired_ours_vs_base"],
        }
    print(json.dumps({
        "benchmark": "components",
        "device": device_name(device),
        "precision": args.precision,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "steps": args.steps,
        "torch": torch.__version__,
        "results": results,
    }))


if __name__ == "__main__":
    main()
