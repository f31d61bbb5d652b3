"""L_p: background at the borders of every image, every foreground part in every mini-group."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..models.precision import at_least_float32


def pooled_part_peaks(similarity: torch.Tensor) -> torch.Tensor:
    """3x3 average pooling (stride 1, no padding) so a single-pixel spike cannot fake presence."""
    return F.avg_pool2d(similarity, kernel_size=3, stride=1)


class BackgroundPresenceLoss(nn.Module):
    """BCE(max_xy rho * pooled background, 1), rho = 0 at the centre and 1 in the corners."""

    def forward(self, similarity: torch.Tensor) -> torch.Tensor:
        pooled = pooled_part_peaks(similarity)[:, -1]
        ph, pw = pooled.shape[-2:]
        gy = torch.linspace(-1, 1, ph, device=pooled.device, dtype=pooled.dtype)
        gx = torch.linspace(-1, 1, pw, device=pooled.device, dtype=pooled.dtype)
        radius = gy[:, None] ** 2 + gx[None, :] ** 2
        radius = radius / radius.max()
        peaks = (pooled * radius).flatten(1).amax(dim=1)
        # BCE against 1 is -log(p) with PyTorch's clamp of the log at -100; written out because
        # F.binary_cross_entropy refuses to run under autocast (mixed precision).
        return -at_least_float32(peaks).log().clamp_min(-100).mean()


class MiniGroupPresenceLoss(nn.Module):
    """Every foreground part should appear in each mini-group; every image should show some part.

    The batch is split into consecutive chunks of ``mini_group`` images (the last may be
    smaller). Per chunk, ``a = 1 - mean_k max_images M`` and ``b = 1 - mean_images max_k M``
    with M the spatial peaks of the pooled foreground maps; the loss is
    ``mean(a) + mean(b)`` over chunks.

    Under DDP the batch is the global one. Given ``gather`` (the training step passes
    :func:`~mpae_lightning.losses.gather.gather_with_grad`), the peaks of all processes are
    gathered whenever this process's batch is not a whole number of groups (a group spans
    processes, or the epoch's smaller last batch), and the loss of the whole global batch is
    computed on each process; otherwise every group lies inside one process, each process holds
    the same number of groups, and the local loss is already the right share of the global one
    (DDP's average of the local losses is the global loss), with no communication.

    Args:
        mini_group: chunk size (8 for single-category data, 64 for multi-category).
    """

    def __init__(self, mini_group: int = 8) -> None:
        super().__init__()
        if mini_group < 1:
            raise ValueError(f"mini_group must be >= 1, got {mini_group}")
        self.mini_group = mini_group

    def forward(
        self, similarity: torch.Tensor, gather: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        peaks = pooled_part_peaks(similarity[:, :-1]).flatten(2).amax(dim=2)  # (B, K)
        if gather is not None and peaks.shape[0] % self.mini_group != 0:
            peaks = gather(peaks)  # the global batch's peaks, in its order
        return self.from_peaks(peaks)

    def from_peaks(self, peaks: torch.Tensor) -> torch.Tensor:
        """The loss from the (B, K) spatial peaks of the pooled foreground maps."""
        # The whole chunks as one (chunks, mini_group, K) tensor, the smaller last chunk apart:
        # a fixed handful of kernels whatever the batch (a loop over chunks launches ~6 per chunk).
        full = peaks.shape[0] // self.mini_group * self.mini_group
        groups = peaks[:full].unflatten(0, (-1, self.mini_group))
        per_part = [groups.amax(dim=1).mean(dim=1)]
        per_image = [groups.amax(dim=2).mean(dim=1)]
        if full < peaks.shape[0]:
            rest = peaks[full:]
            per_part.append(rest.amax(dim=0).mean()[None])
            per_image.append(rest.amax(dim=1).mean()[None])
        return (1 - torch.cat(per_part)).mean() + (1 - torch.cat(per_image)).mean()


class PresenceLoss(nn.Module):
    """L_p = background presence + mini-group foreground presence, reported with both parts.

    Args:
        mini_group: chunk size of the foreground term (see :class:`MiniGroupPresenceLoss`).
    """

    def __init__(self, mini_group: int = 8) -> None:
        super().__init__()
        self.background = BackgroundPresenceLoss()
        self.foreground = MiniGroupPresenceLoss(mini_group)

    def forward(
        self, similarity: torch.Tensor, gather: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        background = self.background(similarity)
        foreground = self.foreground(similarity, gather)
        return {"presence": background + foreground, "presence_background": background,
                "presence_foreground": foreground}
