"""Streaming PartNMI/PartARI against scikit-learn on a PartImageNet-Seg-sized test set.

2,405 images x 128 x 128 = 39,403,520 labels (51 true labels, 41 predicted
labels, random but structured). Each approach runs in its own subprocess so
that their memory peaks do not mix:

* ``streaming``: ``PartNMI`` and ``PartARI`` updated batch by batch;
* ``sklearn``: what part-discovery codebases do, i.e. keep every batch's labels,
  concatenate them and call ``normalized_mutual_info_score`` and
  ``adjusted_rand_score``.

Times cover the metric work only (generating the synthetic labels is timed
separately). Memory: ``peak_rss_mb`` is the process's maximum resident set
(``resource.getrusage``) and ``baseline_rss_mb`` the same before the metric
work (after imports and one batch), so their difference is what the approach
itself costs; ``tracemalloc_peak_mb`` traces Python/numpy allocations only (it
cannot see torch's allocator).

Usage::

    python benchmarks/metrics.py [--images 2405] [--batch-images 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import tracemalloc

NUM_TRUE, NUM_PRED, SIZE, SEED = 51, 41, 128, 0


def _batch(first: int, count: int):
    """Labels of images ``first .. first+count-1``, identical in every process.

    Truth: background plus 5 parts of one of 10 object classes, laid out on a
    16x16 grid upsampled to 128x128. Prediction: a fixed many-to-one relabeling
    of the truth for 75% of the pixels, random elsewhere.
    """
    import torch

    g = torch.Generator().manual_seed(SEED * 1_000_003 + first)
    cls = torch.randint(0, 10, (count, 1, 1), generator=g)
    coarse = torch.randint(0, 6, (count, 16, 16), generator=g)
    truth = torch.where(coarse == 0, 0, 1 + 5 * cls + coarse - 1)
    truth = truth.repeat_interleave(SIZE // 16, 1).repeat_interleave(SIZE // 16, 2)
    mapping = torch.randint(0, NUM_PRED, (NUM_TRUE,), generator=torch.Generator().manual_seed(SEED))
    noise = torch.randint(0, NUM_PRED, truth.shape, generator=g)
    pred = torch.where(torch.rand(truth.shape, generator=g) < 0.75, mapping[truth], noise)
    return pred, truth


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _worker(mode: str, images: int, batch_images: int) -> dict:
    import torch

    torch.set_num_threads(1)
    if mode == "streaming":
        from mpae_lightning.metrics import PartARI, PartNMI
    else:
        import numpy as np
        from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
    _batch(0, 1)
    baseline = _rss_mb()
    tracemalloc.start()
    gen_s = metric_s = 0.0
    out: dict = {}

    if mode == "streaming":
        nmi, ari = PartNMI(NUM_TRUE, NUM_PRED), PartARI(NUM_TRUE, NUM_PRED)
        for first in range(0, images, batch_images):
            t0 = time.perf_counter()
            pred, truth = _batch(first, min(batch_images, images - first))
            t1 = time.perf_counter()
            nmi.update(pred, truth)
            ari.update(pred, truth)
            metric_s += time.perf_counter() - t1
            gen_s += t1 - t0
            del pred, truth
        t0 = time.perf_counter()
        out["nmi"], out["ari"] = nmi.compute().item(), ari.compute().item()
        metric_s += time.perf_counter() - t0
        out["num_labels"] = int(nmi.contingency.sum())
        out["state_bytes"] = nmi.contingency.numel() * nmi.contingency.element_size() * 2
    else:
        preds, truths = [], []
        for first in range(0, images, batch_images):
            t0 = time.perf_counter()
            pred, truth = _batch(first, min(batch_images, images - first))
            t1 = time.perf_counter()
            preds.append(pred.reshape(-1).numpy())
            truths.append(truth.reshape(-1).numpy())
            metric_s += time.perf_counter() - t1
            gen_s += t1 - t0
        t0 = time.perf_counter()
        all_pred, all_truth = np.concatenate(preds), np.concatenate(truths)
        del preds, truths
        out["num_labels"] = int(all_truth.size)
        t1 = time.perf_counter()
        out["nmi"] = float(normalized_mutual_info_score(all_truth, all_pred))
        t2 = time.perf_counter()
        try:
            out["ari"] = float(adjusted_rand_score(all_truth, all_pred))
        except Exception as err:  # old sklearn versions overflow on tens of millions of labels
            out["ari"] = None
            out["ari_error"] = f"{type(err).__name__}: {err}"
        t3 = time.perf_counter()
        metric_s += t3 - t0
        out["time_s_nmi_call"], out["time_s_ari_call"] = round(t2 - t1, 3), round(t3 - t2, 3)

    out["time_s"] = round(metric_s, 3)
    out["time_s_generate_labels"] = round(gen_s, 3)
    out["tracemalloc_peak_mb"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
    tracemalloc.stop()
    out["baseline_rss_mb"] = round(baseline, 1)
    out["peak_rss_mb"] = round(_rss_mb(), 1)
    out["peak_rss_over_baseline_mb"] = round(out["peak_rss_mb"] - baseline, 1)
    return out


def _run(mode: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode]
    cmd += ["--images", str(args.images), "--batch-images", str(args.batch_images)]
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2405)
    parser.add_argument("--batch-images", type=int, default=64)
    parser.add_argument("--worker", choices=["streaming", "sklearn"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.images, args.batch_images)))
        return

    import sklearn
    import torch
    import torchmetrics

    streaming, reference = _run("streaming", args), _run("sklearn", args)
    result = {
        "setup": {
            "images": args.images,
            "map_size": [SIZE, SIZE],
            "num_labels": args.images * SIZE * SIZE,
            "num_true_labels": NUM_TRUE,
            "num_pred_labels": NUM_PRED,
            "batch_images": args.batch_images,
            "threads_per_process": 1,
        },
        "streaming": streaming,
        "sklearn": reference,
    }
    if "nmi" in streaming and "nmi" in reference:
        result["abs_diff"] = {
            key: None if reference.get(key) is None else abs(streaming[key] - reference[key]) for key in ("nmi", "ari")
        }
        result["speedup"] = round(reference["time_s"] / streaming["time_s"], 1)
    result["versions"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchmetrics": torchmetrics.__version__,
        "sklearn": sklearn.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
