"""How far float32 training drifts when only the order of its sums changes; prints JSON.

    python benchmarks/float32_reorder.py --threads 2

Why: 1 and N DDP processes compute the same objective (``tests/test_ddp_equivalence.py``
checks it in float64), but in float32 they sum gradients in another order. This script
measures, in one process, what that alone does to the weights: the demo config's model trains
``--steps`` Adam steps (fused, as ``mpae fit`` runs it; gradients clipped at the config's norm) on the demo
data's first global batches of 16

* ``batch``: with the whole batch in one forward, as one process does;
* ``chunks_8`` / ``chunks_4``: with the model's forward cut into chunks of 8 or 4 images, the
  summation order of 2 or 4 processes (each chunk's weight gradients are summed by autograd,
  as DDP's all-reduce sums each process's); the loss sees the concatenated outputs, so every
  value is the same and only the order of the float32 sums differs;
* ``perturbed``: with the whole batch, from weights multiplied by ``1 + 1e-7 * N(0, 1)``, one
  float32 rounding's worth of difference.

and reports ``||w_a - w_batch|| / ||w_batch||`` over the trainable tensors after each step,
with the per-step growth. In float64 (``--dtype float64``) the same comparison shows the
arithmetic is the same (differences ~1e-16 that grow alike).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from pathlib import Path

import torch
import yaml

from mpae_lightning import MPAEModule
from mpae_lightning.data import SyntheticPartsDataModule
from mpae_lightning.models.mpae import MPAEOutput

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def build(config: Path, dtype: torch.dtype) -> tuple[MPAEModule, list[dict], float]:
    """The demo module (seeded as ``seed_everything: 0``) and its first training batches."""
    settings = yaml.safe_load(config.read_text())
    data_args = settings["data"]["init_args"]
    torch.manual_seed(settings.get("seed_everything", 0))
    module = MPAEModule(**settings["model"]["init_args"], image_size=data_args["image_size"]).to(dtype)
    data = SyntheticPartsDataModule(**data_args)
    data.setup("fit")
    return module, list(data.train_dataloader()), float(settings["trainer"]["gradient_clip_val"])


def total_loss(module: MPAEModule, batch: dict, chunk: int | None) -> torch.Tensor:
    """The training objective, with the model's forward on the whole batch or on chunks of it."""
    images = batch["image"].to(module.dtype)
    noise = module._fixed_noise(batch["mask_seed"])
    if chunk is None:
        return module.loss(module.model(images, noise=noise))["total"]
    outputs = [module.model(images[i:i + chunk], noise=noise[i:i + chunk]) for i in range(0, len(images), chunk)]
    joined = MPAEOutput(**{f.name: torch.cat([getattr(o, f.name) for o in outputs]) for f in dataclasses.fields(MPAEOutput)})
    return module.loss(joined)["total"]


def train(module: MPAEModule, batches: list[dict], clip: float, chunk: int | None, perturb: float) -> list[dict]:
    """Trainable weights after each step."""
    module = copy.deepcopy(module)
    params = module.model.trainable_parameters()
    if perturb:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in params:
                p.mul_(1 + perturb * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    # As ``mpae fit`` builds it (fused Adam under a full-precision Trainer; no Trainer here).
    optimizer = torch.optim.Adam(params, lr=module.hparams.lr, weight_decay=module.hparams.weight_decay, fused=True)
    weights = []
    for batch in batches:
        optimizer.zero_grad()
        total_loss(module, batch, chunk).backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        weights.append([p.detach().double().clone() for p in params])
    return weights


def relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float((x - y).pow(2).sum()) for x, y in zip(a, b))
    return (num / sum(float(x.pow(2).sum()) for x in a)) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=DEMO_CONFIG)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    module, batches, clip = build(args.config, dtype)
    batches = batches[: args.steps]
    size = len(batches[0]["image"])
    reference = train(module, batches, clip, None, 0.0)
    runs = {f"chunks_{c}": (c, 0.0) for c in (size // 2, size // 4)}
    runs["perturbed"] = (None, 1e-7)
    result: dict = {"dtype": args.dtype, "batch": size, "steps": len(batches), "threads": args.threads}
    for name, (chunk, perturb) in runs.items():
        drift = [relative(r, o) for r, o in zip(reference, train(module, batches, clip, chunk, perturb))]
        growth = [b / a for a, b in zip(drift, drift[1:]) if a > 0]
        result[name] = {"relative_per_step": drift, "growth_per_step": growth}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
