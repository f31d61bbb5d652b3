"""Exact streaming part-discovery metrics (NMI, ARI) and the MPAE evaluation protocol."""

from mpae_lightning.metrics.clustering import ContingencyMetric, ForegroundIoU, PartARI, PartNMI
from mpae_lightning.metrics.evaluation import (
    KeypointPartMetrics,
    MaskPartMetrics,
    PartCount,
    count_foreground_parts,
    keypoint_part_labels,
    mask_part_labels,
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
    "KeypointPartMetrics",
    "MaskPartMetrics",
    "PartARI",
    "PartCount",
    "PartNMI",
    "ari_from_contingency",
    "contingency_table",
    "count_foreground_parts",
    "foreground_iou",
    "foreground_iou_from_contingency",
    "keypoint_part_labels",
    "mask_part_labels",
    "nmi_from_contingency",
    "part_ari",
    "part_nmi",
]
