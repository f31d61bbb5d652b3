"""Exact streaming part-discovery metrics (NMI, ARI, foreground IoU, keypoint regression) and the MPAE evaluation protocol."""

from mpae_lightning.metrics.clustering import ContingencyMetric, ForegroundIoU, PartARI, PartNMI
from mpae_lightning.metrics.evaluation import (
    ForegroundMaskMetrics,
    KeypointPartMetrics,
    MaskPartMetrics,
    PartCount,
    count_foreground_parts,
    keypoint_part_labels,
    mask_part_labels,
    upsampled_foreground,
)
from mpae_lightning.metrics.keypoint_regression import (
    KeypointRegression,
    keypoint_frame,
    isotropic_scale,
    keypoint_regression_error,
    part_centroids,
)
from mpae_lightning.metrics.functional import (
    ari_from_contingency,
    contingency_table,
    foreground_iou,
    foreground_iou_from_contingency,
    nmi_from_contingency,
    part_ari,
    part_nmi,
)

__all__ = [
    "ContingencyMetric",
    "ForegroundIoU",
    "ForegroundMaskMetrics",
    "KeypointPartMetrics",
    "KeypointRegression",
    "MaskPartMetrics",
    "PartARI",
    "PartCount",
    "PartNMI",
    "ari_from_contingency",
    "contingency_table",
    "count_foreground_parts",
    "foreground_iou",
    "foreground_iou_from_contingency",
    "isotropic_scale",
    "keypoint_frame",
    "keypoint_part_labels",
    "keypoint_regression_error",
    "mask_part_labels",
    "nmi_from_contingency",
    "part_ari",
    "part_centroids",
    "part_nmi",
    "upsampled_foreground",
]
