"""Clustering and foreground scores computed from a (truth x prediction) contingency table.

NMI and ARI depend only on the contingency table of the two labelings, so a
table accumulated batch by batch (and summed across processes) gives exactly
the score scikit-learn computes on all labels at once. Every score here is
computed in float64 from the table; in particular ARI never forms int64 pair
products, which overflow once there are more than ~10^5 samples.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "ari_from_contingency",
    "contingency_table",
    "foreground_iou",
    "foreground_iou_from_contingency",
    "nmi_from_contingency",
    "part_ari",
    "part_nmi",
]

_EPS = torch.finfo(torch.float64).eps


def _check_labels(preds: Tensor, target: Tensor) -> None:
    if preds.shape != target.shape:
        raise ValueError(
            f"`preds` and `target` must have the same shape, got {tuple(preds.shape)} "
            f"and {tuple(target.shape)}"
        )
    for name, labels in (("preds", preds), ("target", target)):
        if labels.is_floating_point() or labels.is_complex():
            raise TypeError(f"`{name}` must be an integer label tensor, got dtype {labels.dtype}")


def _check_range(preds: Tensor, target: Tensor, num_pred_labels: int, num_true_labels: int) -> None:
    if preds.numel() == 0:
        return
    # One device sync for the four bounds.
    p_min, p_max, t_min, t_max = torch.stack([*torch.aminmax(preds), *torch.aminmax(target)]).tolist()
    for name, lo, hi, num in (
        ("target", t_min, t_max, num_true_labels),
        ("preds", p_min, p_max, num_pred_labels),
    ):
        bad = lo if lo < 0 else hi if hi >= num else None
        if bad is not None:
            raise ValueError(f"`{name}` contains the label {bad}, outside the allowed range [0, {num})")


def contingency_table(
    preds: Tensor,
    target: Tensor,
    num_true_labels: int,
    num_pred_labels: int,
    ignore_index: int | None = None,
) -> Tensor:
    """Count how often each (true label, predicted label) pair occurs.

    Args:
        preds: predicted labels in ``[0, num_pred_labels)``, integer tensor of any shape.
        target: true labels in ``[0, num_true_labels)``, same shape as ``preds``.
        num_true_labels: number of rows of the table.
        num_pred_labels: number of columns of the table.
        ignore_index: entries whose ``target`` equals this value are dropped.

    Returns:
        int64 tensor of shape ``(num_true_labels, num_pred_labels)``.

    Raises:
        ValueError: if the shapes differ or a label lies outside its range.
        TypeError: if a label tensor is not of an integer type.
    """
    _check_labels(preds, target)
    preds = preds.reshape(-1).long()
    target = target.reshape(-1).long()
    if ignore_index is not None:
        keep = target != ignore_index
        preds, target = preds[keep], target[keep]
    _check_range(preds, target, num_pred_labels, num_true_labels)
    # bincount without weights is deterministic on CUDA as well.
    index = target * num_pred_labels + preds
    counts = torch.bincount(index, minlength=num_true_labels * num_pred_labels)
    return counts.reshape(num_true_labels, num_pred_labels)


def _scalar(value: float, like: Tensor) -> Tensor:
    return torch.tensor(value, dtype=torch.float64, device=like.device)


def _entropy(counts: Tensor) -> Tensor:
    """Entropy (nats) of a labeling given its class sizes, as sklearn's ``entropy``."""
    counts = counts[counts > 0]
    if counts.numel() == 1:
        return _scalar(0.0, counts)
    total = counts.sum()
    return -((counts / total) * (torch.log(counts) - torch.log(total))).sum()


def _mutual_info(table: Tensor, rows: Tensor, cols: Tensor, n_rows: int, n_cols: int) -> Tensor:
    """Mutual information (nats) as sklearn's ``mutual_info_score(contingency=...)``."""
    if n_rows == 1 or n_cols == 1:
        return _scalar(0.0, table)
    nzx, nzy = table.nonzero(as_tuple=True)
    nz_val = table[nzx, nzy]
    total = table.sum()
    log_total = torch.log(total)
    outer = rows[nzx] * cols[nzy]
    log_outer = -torch.log(outer) + 2 * log_total  # sum of rows == sum of cols == total
    p = nz_val / total
    mi = p * (torch.log(nz_val) - log_total) + p * log_outer
    # sklearn zeroes each term below float64 eps before summing, then clips at 0.
    mi = torch.where(mi.abs() < _EPS, torch.zeros_like(mi), mi)
    return mi.sum().clamp(min=0.0)


def nmi_from_contingency(table: Tensor) -> Tensor:
    """Normalized mutual information with arithmetic-mean normalisation.

    Equals ``sklearn.metrics.normalized_mutual_info_score(labels_true, labels_pred)``
    for the labels the table counts, including its special cases: both labelings
    a single cluster (or no samples at all) give 1.0; a zero mutual information
    gives 0.0. Empty rows and columns (labels never seen) do not change the result.

    Args:
        table: ``(T, P)`` contingency table of non-negative counts, truth along rows.

    Returns:
        0-d float64 tensor.
    """
    table = table.to(torch.float64)
    rows, cols = table.sum(dim=1), table.sum(dim=0)
    n_rows, n_cols = int((rows > 0).sum()), int((cols > 0).sum())
    if n_rows == n_cols == 1 or n_rows == n_cols == 0:
        return _scalar(1.0, table)
    mi = _mutual_info(table, rows, cols, n_rows, n_cols)
    if mi.item() == 0.0:
        return _scalar(0.0, table)
    normalizer = (_entropy(rows) + _entropy(cols)) / 2
    return mi / normalizer


def ari_from_contingency(table: Tensor) -> Tensor:
    """Adjusted Rand index, computed in float64.

    Equals ``sklearn.metrics.adjusted_rand_score(labels_true, labels_pred)`` for the
    labels the table counts, including its special case: no disagreeing pairs
    (perfect match up to relabeling, all samples distinct, one cluster, a single
    sample or no samples) gives exactly 1.0.

    Args:
        table: ``(T, P)`` contingency table of non-negative counts, truth along rows.

    Returns:
        0-d float64 tensor.
    """
    # The pair counts are zero exactly when every row / column has at most one
    # non-empty cell; test that on the integer pattern rather than on floats.
    nonzero = table != 0
    if int(nonzero.sum(dim=1).max()) <= 1 and int(nonzero.sum(dim=0).max()) <= 1:
        return _scalar(1.0, table)
    table = table.to(torch.float64)
    n = table.sum()
    sum_squares = (table * table).sum()
    rows, cols = table.sum(dim=1), table.sum(dim=0)
    # The pair confusion matrix of sklearn's pair_confusion_matrix (counts of ordered pairs).
    tp = sum_squares - n
    fp = (cols * cols).sum() - sum_squares
    fn = (rows * rows).sum() - sum_squares
    tn = n * n - fp - fn - sum_squares
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def foreground_iou_from_contingency(table: Tensor) -> dict[str, Tensor]:
    """Foreground and background IoU from a (truth x prediction) table whose last row and
    column are the background.

    Foreground is every label but the last, on both sides (any part against any part
    label), as PDiscoFormer's foreground IoU; counts are pooled over all pixels, like
    ``torchmetrics``' ``BinaryJaccardIndex``, and an empty union gives 0.

    Args:
        table: ``(T, P)`` contingency table, truth along rows, background last on both axes.

    Returns:
        dict with 0-d float64 tensors ``fg_iou`` and ``bg_iou`` in [0, 1].
    """
    table = table.to(torch.float64)
    tp, fn = table[:-1, :-1].sum(), table[:-1, -1].sum()
    fp, tn = table[-1, :-1].sum(), table[-1, -1]

    def iou(hit: Tensor, miss_a: Tensor, miss_b: Tensor) -> Tensor:
        union = hit + miss_a + miss_b
        return torch.where(union > 0, hit / union.clamp(min=1), torch.zeros_like(union))

    return {"fg_iou": iou(tp, fp, fn), "bg_iou": iou(tn, fp, fn)}


def foreground_iou(
    preds: Tensor,
    target: Tensor,
    num_true_labels: int,
    num_pred_labels: int,
    ignore_index: int | None = None,
) -> Tensor:
    """Foreground IoU (any non-background prediction vs any non-background truth; background
    is the last label of each); see :func:`foreground_iou_from_contingency`."""
    table = contingency_table(preds, target, num_true_labels, num_pred_labels, ignore_index)
    return foreground_iou_from_contingency(table)["fg_iou"]


def part_nmi(
    preds: Tensor,
    target: Tensor,
    num_true_labels: int,
    num_pred_labels: int,
    ignore_index: int | None = None,
) -> Tensor:
    """NMI (arithmetic normalisation) between two labelings; see :func:`contingency_table`."""
    return nmi_from_contingency(contingency_table(preds, target, num_true_labels, num_pred_labels, ignore_index))


def part_ari(
    preds: Tensor,
    target: Tensor,
    num_true_labels: int,
    num_pred_labels: int,
    ignore_index: int | None = None,
) -> Tensor:
    """Adjusted Rand index between two labelings; see :func:`contingency_table`."""
    return ari_from_contingency(contingency_table(preds, target, num_true_labels, num_pred_labels, ignore_index))
