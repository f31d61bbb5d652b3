"""``mpae check-data``: read every image and annotation of the chosen splits once, list every bad file.

A corrupt image otherwise stops training when an epoch reaches it, hours in; this pass costs
seconds to minutes and reports all problems at once::

    mpae check-data --config configs/cub.yaml --data.init_args.root /data/CUB_200_2011
    mpae check-data --config configs/partimagenet_seg.yaml --splits train test

It reads only the ``data`` section of the config (no model is built, nothing is downloaded).
With ``test`` among the splits it also reads CelebA's KPR fitting set (``fit_list``, or MAFL's
training list when its three files are in the dataset folder); when they are missing, a note
says which and what KPR fits on instead. Exit code 0 when everything reads (notes are not
problems), 2 when anything is bad.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import yaml
from jsonargparse import ArgumentParser
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .data.base import PartDataModule
from .errors import one_line

__all__ = ["check_datamodule", "check_data_main"]

SPLITS = ("train", "val", "test", "predict")


class _Probe(Dataset):
    """Loads item ``i`` and returns ``(i, None)`` or ``(i, error message)``: a bad file never stops the pass."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[int, str | None]:
        try:
            self.dataset[index]
        except Exception as err:  # noqa: BLE001 - every failure is reported, none is fatal here
            return index, one_line(err)
        return index, None


def _first(batch: list[Any]) -> Any:
    return batch[0]


def check_datamodule(
    datamodule: PartDataModule, splits: list[str], progress: bool = True, notes: list[str] | None = None
) -> tuple[int, list[str]]:
    """Read every item of ``splits`` (each distinct source once) and of the DataModule's
    :meth:`~mpae_lightning.data.base.PartDataModule.check_data_extras`; return (items read, problems).

    Annotation problems (a split that cannot be listed) count as one problem each; image and
    per-item annotation problems (unreadable file, size mismatch, bad mask) one per item.
    Informational lines (not problems) are appended to ``notes`` when it is given.
    """
    problems: list[str] = []
    where: dict[str, list[str]] = {}  # message -> items it concerns (splits may share files)
    total = 0
    seen: set[int] = set()
    extras, extra_notes = datamodule.check_data_extras(list(splits))
    if notes is not None:
        notes += extra_notes
    sources: list[tuple[str, Callable[[], Dataset], bool]] = [
        (split, partial(datamodule.dataset, split), False) for split in splits  # type: ignore[arg-type]
    ] + [(name, build, True) for name, build in extras]
    for name, build, extra in sources:
        try:
            dataset = build()
        except Exception as err:  # noqa: BLE001 - listed, and the other splits are still checked
            problems.append(f"{name}: {one_line(err)}")
            continue
        if id(dataset) in seen:
            continue
        seen.add(id(dataset))
        loader = DataLoader(_Probe(dataset), batch_size=1, num_workers=datamodule.num_workers, collate_fn=_first)
        for index, error in tqdm(loader, desc=f"check-data {name}", unit="img", disable=not progress, file=sys.stderr):
            total += 1
            if error is not None:
                where.setdefault(error, []).append(f"{name}[{index}]")
        if extra and notes is not None:
            count = len(dataset)  # type: ignore[arg-type]
            notes.append(f"{name}: {count} item(s) read as well (included in the count)")
    problems += [f"{message} ({', '.join(items)})" for message, items in where.items()]
    return total, problems


def _data_config_args(argv: list[str]) -> list[str]:
    """Replace each ``--config FILE`` by its ``data`` section (other sections are for training)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-c") or arg.startswith("--config="):
            path = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 1 if "=" in arg else 2
            try:
                with open(path, encoding="utf-8") as fh:
                    section = (yaml.safe_load(fh) or {}).get("data")
            except OSError as err:
                raise FileNotFoundError(f"--config {path}: cannot read the config file ({err.strerror})") from None
            if section is not None:
                out.append(f"--data={json.dumps(section)}")
            continue
        out.append(arg)
        i += 1
    return out


def check_data_main(argv: list[str]) -> int:
    """Entry point of ``mpae check-data``; returns the exit code."""
    from .cli import HelpFormatter  # descriptions as written: one example per line

    description = (__doc__ or "").replace("``", "`").replace("::\n", ":\n")
    parser = ArgumentParser(
        prog="mpae check-data", description=description, formatter_class=HelpFormatter, exit_on_error=False
    )
    parser.add_subclass_arguments(PartDataModule, "data", required=True, help="The DataModule to check.")
    parser.add_argument("--splits", nargs="+", choices=SPLITS, default=["train", "val", "test"],
                        help="Splits to read (val/test/predict that share a source are read once).")
    parser.add_argument("--no_progress", action="store_true", help="Hide the progress bar.")
    cfg = parser.parse_args(_data_config_args(argv))
    datamodule = parser.instantiate_classes(cfg).data
    notes: list[str] = []
    total, problems = check_datamodule(datamodule, list(cfg.splits), progress=not cfg.no_progress, notes=notes)
    for note in notes:
        print(f"mpae check-data: note: {note}")
    if problems:
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        print(
            f"mpae: error: check-data found {len(problems)} problem(s) in {total} items of splits "
            f"{', '.join(cfg.splits)} (listed above); fix or remove those files, then run check-data again",
            file=sys.stderr,
        )
        return 2
    print(f"mpae check-data: all {total} items of splits {', '.join(cfg.splits)} read fine")
    return 0
