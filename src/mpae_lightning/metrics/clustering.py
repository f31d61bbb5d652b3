"""Streaming NMI / ARI as torchmetrics ``Metric``s.

The only state is the (truth x prediction) contingency table, summed across
processes, so the score is exact under DDP and memory does not grow with the
number of labels (unlike torchmetrics' own clustering metrics, which keep every
label).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from mpae_lightning.metrics.functional import (
    ari_from_contingency,
    contingency_table,
    foreground_iou_from_contingency,
    nmi_from_contingency,
)

__all__ = ["ContingencyMetric", "ForegroundIoU", "PartARI", "PartNMI"]


def _check_num_labels(**num_labels: int) -> None:
    for name, value in num_labels.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}")


class ContingencyMetric(Metric):
    """Base class: accumulates the (truth x prediction) contingency table.

    Args:
        num_true_labels: number of ground-truth labels; targets lie in ``[0, num_true_labels)``.
        num_pred_labels: number of predicted labels; predictions lie in ``[0, num_pred_labels)``.
        ignore_index: entries whose target equals this value are dropped.
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    contingency: Tensor

    def __init__(
        self,
        num_true_labels: int,
        num_pred_labels: int,
        ignore_index: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _check_num_labels(num_true_labels=num_true_labels, num_pred_labels=num_pred_labels)
        self.num_true_labels = num_true_labels
        self.num_pred_labels = num_pred_labels
        self.ignore_index = ignore_index
        self.add_state(
            "contingency",
            default=torch.zeros(num_true_labels, num_pred_labels, dtype=torch.long),
            dist_reduce_fx="sum",
        )

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Count the (target, preds) pairs of one batch.

        Args:
            preds: integer predicted labels, any shape.
            target: integer true labels, same shape as ``preds``.
        """
        self.contingency += contingency_table(
            preds, target, self.num_true_labels, self.num_pred_labels, self.ignore_index
        )


class PartNMI(ContingencyMetric):
    """Normalized mutual information (arithmetic mean), as scikit-learn's default.

    Equal to ``sklearn.metrics.normalized_mutual_info_score`` on all labels seen
    since the last ``reset()``; ``compute()`` returns a 0-d float64 tensor in [0, 1].
    """

    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    def compute(self) -> Tensor:
        return nmi_from_contingency(self.contingency)


class PartARI(ContingencyMetric):
    """Adjusted Rand index, computed in float64 from the contingency table.

    Equal to ``sklearn.metrics.adjusted_rand_score`` on all labels seen since the
    last ``reset()``; ``compute()`` returns a 0-d float64 tensor in [-0.5, 1].
    """

    plot_lower_bound = -0.5
    plot_upper_bound = 1.0

    def compute(self) -> Tensor:
        return ari_from_contingency(self.contingency)


class ForegroundIoU(ContingencyMetric):
    """Foreground IoU: any non-background prediction against any non-background truth.

    The background is the last label on both sides. Intersection and union are pooled
    over everything seen since the last ``reset()`` (PDiscoFormer's protocol, via
    ``BinaryJaccardIndex``); ``compute()`` returns a 0-d float64 tensor in [0, 1].
    :class:`~mpae_lightning.metrics.MaskPartMetrics` reports it as ``fg_iou`` (x100).
    """

    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    def compute(self) -> Tensor:
        return foreground_iou_from_contingency(self.contingency)["fg_iou"]
