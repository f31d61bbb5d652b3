"""The ``mpae`` command: LightningCLI with MPAE's links and defaults (no model logic here)."""
from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from . import __version__
from .callbacks import PartPredictionWriter, PartVisualization
from .data.base import DatasetFormatError, ImageReadError, PartDataModule
from .lightning_module import FROZEN_PARTS, MPAEModule, frozen_parts_left_out
from .models import MPAE
from .models.weights import WeightsUnavailableError

#: Errors whose message already says what is wrong; shown without a stack trace.
USER_ERRORS = (WeightsUnavailableError, FileNotFoundError, DatasetFormatError, ImageReadError)

DESCRIPTION = (
    "MPAE (Masked Part AutoEncoder, ICCV 2025): unsupervised part discovery with PyTorch Lightning. "
    "Train, evaluate and predict part maps from a YAML config, e.g. "
    "`mpae fit --config configs/cub.yaml --data.init_args.root /data/CUB_200_2011`; "
    "`mpae fit --help` lists every setting."
)

#: Model settings the data section decides (model argument -> data argument).
LINKED_FROM_DATA = {"image_size": "image_size", "mini_group": "mini_group"}


class MPAECLI(LightningCLI):
    """``mpae fit|validate|test|predict --config configs/<dataset>.yaml``.

    Image size and mini-group are set once, in the ``data`` section, and copied into
    the model; a different value set for the model is refused. The optimiser (Adam)
    and schedule (MultiStepLR) are the model's own settings (``lr``, ``weight_decay``,
    ``milestones``, ``gamma``), so LightningCLI's ``--optimizer``/``--lr_scheduler``
    are not offered. Our samplers shard batches themselves, so Lightning's
    distributed sampler is off by default. With ``--ckpt_path`` the backbone and VGG
    are built randomly and filled from the checkpoint, so nothing is downloaded
    (unless the checkpoint was saved without them: then they come from their sources).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        trainer_defaults = {"use_distributed_sampler": False, **kwargs.pop("trainer_defaults", {})}
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        parser_kwargs = {"description": DESCRIPTION, "version": __version__, **kwargs.pop("parser_kwargs", {})}
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(
            MPAEModule,
            PartDataModule,
            *args,
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_defaults=trainer_defaults,
            parser_kwargs=parser_kwargs,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(PartPredictionWriter, "prediction_writer")
        parser.add_lightning_class_args(PartVisualization, "visualization")

    def _link_data_into_model(self, config: Any) -> None:
        """Copy image size and mini-group from ``data`` into ``model``; refuse a different model value.

        Not a jsonargparse link: a link silently overwrites what the user set for the model.
        A value equal to the model's default is taken as unset.
        """
        model_args, data_args = config["model"]["init_args"], config["data"]["init_args"]
        model_class = _import(config["model"]["class_path"])
        for model_key, data_key in LINKED_FROM_DATA.items():
            if data_args.get(data_key) is None:
                continue
            own, wanted = model_args.get(model_key), data_args[data_key]
            if own is not None and own != _default(model_class, model_key) and own != wanted:
                self.parser.error(
                    f"model.init_args.{model_key}={own} conflicts with data.init_args.{data_key}={wanted}: "
                    f"{model_key} is set in the data section only (--data.init_args.{data_key} {own}); "
                    "the model takes it from there"
                )
            model_args[model_key] = wanted

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        self._link_data_into_model(config)
        ckpt_path = config.get("ckpt_path")
        if ckpt_path:
            # Frozen weights the checkpoint holds are built randomly and then filled from it;
            # those it was saved without are rebuilt from their sources.
            left_out = frozen_parts_left_out(ckpt_path) if os.path.isfile(ckpt_path) else {}
            for part, (_, setting) in FROZEN_PARTS.items():
                if part not in left_out:
                    config["model"]["init_args"][setting] = "random"


def _import(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _default(cls: type, name: str) -> Any:
    """Default of ``cls(name=...)``, following ``**kwargs`` into MPAE (which MPAEModule forwards them to)."""
    for owner in (cls, MPAE):
        param = inspect.signature(owner).parameters.get(name)
        if param is not None:
            return param.default
    return inspect.Parameter.empty


def _user_error(err: BaseException) -> BaseException | None:
    """The first user error in ``err``'s cause chain (jsonargparse wraps errors raised in ``__init__``)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, USER_ERRORS):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def main(args: list[str] | None = None) -> None:
    """Console entry point; user errors are printed as one line unless MPAE_DEBUG=1."""
    try:
        MPAECLI(args=args)
    except Exception as err:  # noqa: BLE001 - only user errors are turned into a message
        user = _user_error(err)
        if user is None or os.environ.get("MPAE_DEBUG"):
            raise
        print(f"mpae: error: {user}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
