"""The ``mpae`` command: LightningCLI with MPAE's links and defaults (no model logic here)."""
from __future__ import annotations

import os
import sys
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from .callbacks import PartPredictionWriter, PartVisualization
from .data.base import DatasetFormatError, ImageReadError, PartDataModule
from .lightning_module import MPAEModule
from .models.weights import WeightsUnavailableError

#: Errors whose message already says what is wrong; shown without a stack trace.
USER_ERRORS = (WeightsUnavailableError, FileNotFoundError, DatasetFormatError, ImageReadError)


class MPAECLI(LightningCLI):
    """``mpae fit|validate|test|predict --config configs/<dataset>.yaml``.

    Image size and mini-group are set once, in the ``data`` section, and linked into
    the model. Our samplers shard batches themselves, so Lightning's distributed
    sampler is off by default. With ``--ckpt_path`` the backbone and VGG are built
    randomly and filled from the checkpoint, so nothing is downloaded.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        trainer_defaults = {"use_distributed_sampler": False, **kwargs.pop("trainer_defaults", {})}
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(
            MPAEModule,
            PartDataModule,
            *args,
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_defaults=trainer_defaults,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.init_args.image_size", "model.init_args.image_size", apply_on="parse")
        parser.link_arguments("data.init_args.mini_group", "model.init_args.mini_group", apply_on="parse")
        parser.add_lightning_class_args(PartPredictionWriter, "prediction_writer")
        parser.add_lightning_class_args(PartVisualization, "visualization")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("ckpt_path"):
            init_args = config["model"]["init_args"]
            init_args["backbone_weights"] = "random"
            init_args["vgg_weights"] = "random"


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
