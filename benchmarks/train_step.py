"""Time MPAE training steps (forward, backward, Adam) and measure peak memory; prints JSON.

    python benchmarks/train_step.py --device cuda --precision bf16 --batch-size 64 --image-size 224
    python benchmarks/train_step.py --device cpu --batch-size 2 --steps 2     # smoke run

The model is the paper's full-size configuration (DINOv2 ViT-B/14 with registers,
VGG-19, K=16, C=256) with random weights: speed and memory do not depend on the
weights' values, and nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from mpae_lightning import MPAE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-parts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = MPAE(num_parts=args.num_parts, image_size=args.image_size, backbone_weights="random",
                 vgg_weights="random", mini_group=min(8, args.batch_size)).to(device).train()
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=5e-4)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step() -> float:
        with autocast:
            loss = model.compute_losses(images).total
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), 2.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "precision": args.precision,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "num_parts": args.num_parts,
        "seconds_per_step": round(seconds, 4),
        "images_per_second": round(args.batch_size / seconds, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "loss_finite": all(torch.isfinite(torch.tensor(losses)).tolist()),
        "torch": torch.__version__,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
