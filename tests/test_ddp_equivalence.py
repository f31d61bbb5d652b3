"""1 process or N processes train the same model: mini-groups span processes, random draws follow the image.

Two layers, both on the CPU with gloo:

* the objective itself, in float64, for the three layouts of the issue (2 x 8 against 16 with a
  mini-group of 16 spanning both processes; 4 x 4 against 16 with mini-groups of 8 spanning
  pairs; 2 x 8 against 16 with mini-groups of 4 inside each process), through the training
  loader (sampler slices, per-image augmentation and masking seeds, the smaller last batch of
  the epoch), the presence loss's gather, a gradient average, clipping and Adam: one spawn of 4
  processes runs every layout (the 2-process ones on a sub-group) and the 1-process references;
* the ``mpae fit`` path (LightningCLI, Lightning's DDP strategy) for 2 x 8 against 16.

Both in float64, where the runs differ only in the order of floating-point sums (a batch of 16
against two sums of 8 averaged; the all-gather changes no value): ~1e-16 relative per operation,
~1e-11 per weight tensor after 4 Adam steps (measured: at most 6e-12 here, 3e-12 through
``mpae fit``), asserted at 1e-9 per tensor (Frobenius norm). A wrong cut of the groups, a
gradient that does not flow back through the gather, a rank-dependent random draw or a wrong
normalisation each move the weights by more than 1e-4 (checked for the first).

Why not float32: there the runs differ by what any change of summation order does to this
objective, which is not small. The VGG penalty's gradient jumps where a max-pooling window's
two largest values swap or a restored feature crosses its target's (one swap among 131,072
windows moved it by ~1 %), float32 rounding decides near-ties, and Adam scales each weight's step by its own gradient, so after 4 steps one
process differs from itself with its forward cut into chunks by 1.5e-5 to 1.9e-5 of the weights'
norm (``benchmarks/float32_reorder.py``), and 2 or 4 processes from one by 7.0e-6 and 1.3e-5
(``docs/defaults.md``, "How close in float32").
"""
from __future__ import annotations

import copy
import glob
import json
import os
from functools import partial

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model_utils import TINY_MODULE, tiny_loss

#: (processes, batch per process, mini-group) against one process with batch 16 and that mini-group.
LAYOUTS = [(2, 8, 16), (4, 4, 8), (2, 8, 4)]
STEPS = 4  # 52 images = 3 global batches of 16 and a last one of 4 (drop_last=False, as the authors)
NUM_TRAIN = 52


class _Runner:
    """One process's tiny float64 module, trained from the same start for each layout.

    The restoration term runs on a VGG-19 of the same layers with 1/16 of the channels: it is a
    per-image term like the full one (what matters here is how the batch is cut) and 20x cheaper.
    """

    def __init__(self) -> None:
        from torchvision.models.vgg import cfgs, make_layers

        from mpae_lightning import MPAEModule

        torch.manual_seed(0)
        self.module = MPAEModule(**TINY_MODULE, lr=1e-3).double()
        self.vgg = make_layers([c if c == "M" else c // 16 for c in cfgs["E"]]).double()

    def train(self, world: int, rank: int, batch_size: int, mini_group: int, group=None, gather: bool = True) -> dict:
        """STEPS training steps on this rank's share; the trainable weights after them."""
        from mpae_lightning.data import SyntheticPartsDataModule
        from mpae_lightning.data.resumable import ResumableDataLoader
        from mpae_lightning.data.samplers import MiniGroupBatchSampler
        from mpae_lightning.losses.gather import gather_with_grad

        module = copy.deepcopy(self.module)
        module.loss = tiny_loss(mini_group=mini_group, vgg_features=copy.deepcopy(self.vgg))
        module.model.train()
        data = SyntheticPartsDataModule(num_train=NUM_TRAIN, image_size=56, batch_size=batch_size,
                                        mini_group=mini_group, num_workers=0)
        sampler = MiniGroupBatchSampler(NUM_TRAIN, batch_size, mini_group, seed=0, drop_last=False,
                                        num_replicas=world, rank=rank)
        loader = ResumableDataLoader(data.dataset("train"), batch_sampler=sampler)
        params = module.model.trainable_parameters()
        optimizer = torch.optim.Adam(params, lr=1e-3)
        gather_fn = partial(gather_with_grad, group=group) if world > 1 and gather else None
        steps = 0
        for batch in loader:
            noise = module._fixed_noise(batch["mask_seed"])
            losses = module.loss(module.model(batch["image"].double(), noise=noise), gather=gather_fn)
            optimizer.zero_grad()
            losses["total"].backward()
            if world > 1:  # what DDP does: the average of the processes' gradients
                for p in params:
                    dist.all_reduce(p.grad, group=group)
                    p.grad /= world
            torch.nn.utils.clip_grad_norm_(params, 2.0)
            optimizer.step()
            steps += 1
        assert steps == STEPS
        return {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}


def _relative(ours: dict, ref: dict) -> float:
    return max(float((ours[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-30)) for k in ref)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    pair = dist.new_group([0, 1])
    runner = _Runner()
    ref = lambda g: os.path.join(os.path.dirname(out), f"ref{g}.pt")  # noqa: E731
    runs = {}
    # Ranks 0 and 1 run the 2-process layouts while ranks 2 and 3 compute the 1-process references.
    if rank < 2:
        runs["2x8/g16"] = runner.train(2, rank, 8, 16, pair)
        runs["2x8/g16 without gather"] = runner.train(2, rank, 8, 16, pair, gather=False)
        runs["2x8/g4"] = runner.train(2, rank, 8, 4, pair)
    else:
        for g in (16, 4) if rank == 2 else (8,):
            torch.save(runner.train(1, 0, 16, g), ref(g))
    dist.barrier()
    runs["4x4/g8"] = runner.train(4, rank, 4, 8)
    if rank == 0:
        refs = {g: torch.load(ref(g), weights_only=True) for g in (16, 8, 4)}
        results = {key: _relative(weights, refs[int(key.split("/g")[1].split()[0])]) for key, weights in runs.items()}
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_processes_train_the_same_weights_as_one_float64(tmp_path):
    out = str(tmp_path / "relative.json")
    mp.spawn(_worker, args=(4, _free_port(), out), nprocs=4, join=True)
    with open(out) as f:
        rel = json.load(f)
    for processes, batch_size, mini_group in LAYOUTS:
        key = f"{processes}x{batch_size}/g{mini_group}"
        assert rel[key] < 1e-9, (key, rel)
    # the test can tell: the same run with each process cutting its own group ends elsewhere
    assert rel["2x8/g16 without gather"] > 1e-4, rel


def test_mpae_fit_on_two_processes_equals_one(tmp_path, tiny_demo_args, monkeypatch):
    """`mpae fit --trainer.strategy ddp... --data.init_args.batch_size 8 --data.init_args.mini_group 16`."""
    from mpae_lightning.cli import MPAECLI
    from mpae_lightning.runs import read_checkpoint

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    common = ["--data.init_args.num_train=64", "--data.init_args.mini_group=16", "--trainer.limit_val_batches=0",
              "--trainer.num_sanity_val_steps=0", "--trainer.precision=64-true"]  # 4 steps of 16 images
    weights = {}
    for name, flags in {
        "one": ["--data.init_args.batch_size=16"],
        "two": ["--data.init_args.batch_size=8", "--trainer.accelerator=cpu", "--trainer.devices=2",
                "--trainer.strategy=ddp_spawn"],
    }.items():
        root = tmp_path / name
        args = [a.replace(str(tmp_path), str(root)) for a in tiny_demo_args]
        MPAECLI(args=["fit", *args, *common, *flags])
        (ckpt,) = glob.glob(str(root / "**" / "last.ckpt"), recursive=True)
        checkpoint = read_checkpoint(ckpt)
        assert checkpoint["global_step"] == 4
        weights[name] = {k: v.double() for k, v in checkpoint["state_dict"].items()
                         if k.startswith("model.") and not k.startswith("model.backbone.") and v.is_floating_point()}
    assert weights["one"].keys() == weights["two"].keys() and weights["one"]
    assert _relative(weights["two"], weights["one"]) < 1e-9
