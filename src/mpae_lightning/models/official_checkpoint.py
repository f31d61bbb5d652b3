"""Load the authors' released MPAE checkpoints (``CelebA_K16.pth``, ``CUB_K16.pth`` …) into :class:`MPAE`."""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from .mpae import MPAE
from .weights import load_state_dict_file

_BLOCK_RENAMES = (
    ("ln_1.", "norm1."),
    ("ln_2.", "norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
)
_PLAIN_RENAMES = {
    "compress_layer.weight": "feature_proj.weight",
    "Transformer.conv1.weight": "descriptor_vit.patch_embed.weight",
    "Transformer.class_embedding": "descriptor_vit.part_queries",
    "Transformer.pos_embed": "descriptor_vit.pos_embed",
    "Transformer.proj.weight": "descriptor_vit.head.weight",
    "Decoder.pos_embed": "restorer.pos_embed",
    "Decoder.decoder_pos_embed": "restorer.decoder_pos_embed",
}
_PREFIX_RENAMES = (
    ("Transformer.ln_pre.", "descriptor_vit.norm_pre."),
    ("Transformer.ln_post.", "descriptor_vit.norm_post."),
    ("Decoder.patch_embed.proj.", "restorer.patch_embed."),
    ("Decoder.norm.", "restorer.encoder_norm."),
    ("Decoder.decoder_embed.", "restorer.encoder_proj."),
    ("Decoder.decoder_norm.", "restorer.decoder_norm."),
    ("Decoder.decoder_pred.", "restorer.decoder_pred."),
)
#: Keys of the authors' module that MPAE does not use.
_UNUSED = ("Decoder.cls_token", "Decoder.mask_token", "ArcMarginProduct.weight")
_BACKBONE_PREFIX = "backbone1."


def is_official_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """True for a state dict in the authors' key names (with or without ``module.``)."""
    return any(k.removeprefix("module.").startswith(("compress_layer.", "Transformer.", "Decoder.")) for k in state_dict)


def official_to_mpae_key(key: str) -> str | None:
    """Our parameter name for one key of the authors' module (``None`` if unknown or unused)."""
    key = key.removeprefix("module.")
    if key in _PLAIN_RENAMES:
        return _PLAIN_RENAMES[key]
    if m := re.match(r"Transformer\.transformer\.resblocks\.(\d+)\.(.*)", key):
        rest = m.group(2)
        for old, repl in _BLOCK_RENAMES:
            rest = rest.replace(old, repl)
        return f"descriptor_vit.blocks.{m.group(1)}.{rest}"
    if m := re.match(r"Decoder\.(decoder_)?blocks\.(\d+)\.(.*)", key):
        which = "decoder_blocks" if m.group(1) else "encoder_blocks"
        return f"restorer.{which}.{m.group(2)}.{m.group(3)}"
    for old, repl in _PREFIX_RENAMES:
        if key.startswith(old):
            return repl + key[len(old):]
    return None


def convert_official_state_dict(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Rename the authors' keys to :class:`MPAE`'s.

    Returns the MPAE state dict (without backbone) and the backbone's state
    dict in Meta's DINOv2 key names, or ``None`` if the checkpoint has no ``backbone1.*`` keys.
    """
    if not is_official_state_dict(state_dict):
        raise ValueError(
            "not an official MPAE checkpoint: expected keys starting with compress_layer., Transformer., Decoder. "
            f"(found e.g. {list(state_dict)[:5]})"
        )
    model: dict[str, torch.Tensor] = {}
    backbone: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.startswith(_BACKBONE_PREFIX):
            backbone[key[len(_BACKBONE_PREFIX):]] = value
            continue
        if key in _UNUSED:
            continue
        if key == "Transformer.proj":  # CLIP keeps proj as a (W, C) matrix used as x @ proj
            key, value = "Transformer.proj.weight", value.t()
        new = official_to_mpae_key(key)
        if new is None:
            unknown.append(key)
        else:
            model[new] = value
    if unknown:
        raise ValueError(f"official MPAE checkpoint has keys this loader does not know: {unknown[:10]}")
    if model["descriptor_vit.part_queries"].ndim == 2:
        model["descriptor_vit.part_queries"] = model["descriptor_vit.part_queries"][None]
    return model, (backbone or None)


def official_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """MPAE constructor arguments readable from an official state dict's shapes (heads are not)."""
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    queries = sd["Transformer.class_embedding"]
    num_parts_total = queries.shape[-2] if queries.ndim == 3 else queries.shape[0]
    conv1 = sd["Transformer.conv1.weight"]
    patch = int(conv1.shape[-1])
    grid_tokens = sd["Transformer.pos_embed"].shape[-2] - num_parts_total
    side = int(round(grid_tokens**0.5))
    pred = sd["Decoder.decoder_pred.weight"]
    return dict(
        num_parts=int(num_parts_total - 1),
        image_size=side * patch,
        feature_dim=int(sd["compress_layer.weight"].shape[0]),
        descriptor_width=int(conv1.shape[0]),
        descriptor_depth=len({k.split(".")[3] for k in sd if k.startswith("Transformer.transformer.resblocks.")}),
        encoder_width=int(sd["Decoder.patch_embed.proj.weight"].shape[0]),
        encoder_depth=len({k.split(".")[2] for k in sd if k.startswith("Decoder.blocks.")}),
        decoder_depth=len({k.split(".")[2] for k in sd if k.startswith("Decoder.decoder_blocks.")}),
        restore_patch=int(round((pred.shape[0] / 3) ** 0.5)),
    )


def load_official_state_dict(model: MPAE, state_dict: Mapping[str, torch.Tensor]) -> MPAE:
    """Copy an official checkpoint's weights into an existing :class:`MPAE` (checked strictly).

    Without ``backbone1.*`` keys the backbone keeps the weights it was built with.
    """
    converted, backbone = convert_official_state_dict(state_dict)
    for key in ("restorer.pos_embed", "restorer.decoder_pos_embed"):
        grid = model.num_patches
        if key in converted and converted[key].shape[1] == grid + 1:  # MAE-style table with a class slot
            converted[key] = converted[key][:, 1:]
    own = model.state_dict()
    expected = {k for k in own if not k.startswith("backbone.")}
    missing = sorted(expected - converted.keys())
    unexpected = sorted(converted.keys() - expected)
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in converted.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or mismatched:
        raise ValueError(
            "official checkpoint does not fit this MPAE configuration "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatches {mismatched[:5]}); "
            "check num_parts, image_size, feature_dim and the widths/depths"
        )
    model.load_state_dict(converted, strict=False)
    if backbone is not None:
        if model.backbone is None:
            raise ValueError("checkpoint carries backbone1.* weights but this MPAE was built without a backbone")
        model.backbone.load_meta_dinov2_state_dict(backbone)
    return model


def load_official_checkpoint(
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor], **mpae_kwargs: Any
) -> MPAE:
    """Build a ready :class:`MPAE` from an authors' ``.pth`` file or state dict.

    Sizes readable from the weights (K, image size, widths, depths, restore patch)
    are taken from the checkpoint; anything else (heads, backbone name and weights,
    mask ratio, evaluation map) comes from ``mpae_kwargs`` or the defaults. The training
    objective is not part of the model: build :class:`~mpae_lightning.losses.MPAELoss` for it.
    If the checkpoint has ``backbone1.*`` keys the backbone is built randomly and
    filled from them, so nothing is downloaded.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        state_dict = load_state_dict_file(checkpoint, "weights")
    else:
        state_dict = dict(checkpoint)
    if not is_official_state_dict(state_dict):
        raise ValueError(f"{checkpoint if isinstance(checkpoint, (str, os.PathLike)) else 'state dict'} "
                         "is not an official MPAE checkpoint (no compress_layer./Transformer./Decoder. keys)")
    kwargs = official_config(state_dict)
    kwargs.update(mpae_kwargs)
    if any(k.removeprefix("module.").startswith(_BACKBONE_PREFIX) for k in state_dict):
        kwargs.setdefault("backbone_weights", "random")
    return load_official_state_dict(MPAE(**kwargs), state_dict)
