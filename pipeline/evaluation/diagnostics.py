"""Seeing generalisation: the seen/unseen gap per epoch (``gap/*``), per-class Recall@1 and MAP@R, the worst
queries, and attention maps. Details: docs/internals.md.
"""

from __future__ import annotations

import csv
import io
import random

import numpy as np
import torch

from pipeline.config import EvalConfig
from pipeline.data.manifest import Manifest, Split
from pipeline.evaluation.embed import embed_split, model_device
from pipeline.evaluation.metrics import retrieval_metrics
from pipeline.runtime import Runtime

GAP_METRICS = ("recall_at_1", "map_at_r")


def sample_classes(manifest: Manifest, split: str, exclude: set[int], max_images: int, seed: int) -> set[int]:
    """A seeded sample of a split's classes (each with all its images, at least 2), up to ``max_images`` images."""
    classes = [c for c in manifest.classes(split) if c["id"] not in exclude and c["count"] >= 2]
    chosen, total = set(), 0
    for c in random.Random(f"{seed}/gap/{split}").sample(classes, len(classes)):
        if total + c["count"] <= max_images:
            chosen.add(c["id"])
            total += c["count"]
    return chosen


def unseen_split(manifest: Manifest) -> str:
    return "test" if "test" in manifest.splits else "gallery"


def unseen_source(manifest: Manifest, validating: bool, max_images: int) -> str:
    """What the gap's held-out side is, in words (logged with the run)."""
    if validating:
        return "validation classes (held out from the training classes)"
    return (f"a fixed sample of up to {max_images} images of {unseen_split(manifest)} classes, for this curve only "
            "(never used to choose anything)")


def _subset_metrics(model: torch.nn.Module, split: Split, ev: EvalConfig, image_size: int, seed: int,
                    runtime: Runtime | None = None) -> dict[str, float]:
    emb, labels, _ = embed_split(model, split, ev, image_size, progress=False, runtime=runtime)
    out = retrieval_metrics(emb, labels, (1,), seed, engine=ev.engine, device=model_device(model), with_nmi=False)
    return {k: out[k] for k in GAP_METRICS}


def gap_metrics(model: torch.nn.Module, manifest: Manifest, ev: EvalConfig, image_size: int, seed: int,
                val_classes: set[int], val_metrics: dict[str, float], runtime: Runtime | None = None
                ) -> dict[str, float]:
    """``gap/seen_*``, ``gap/unseen_*`` and ``gap/*`` (seen minus unseen) for Recall@1 and MAP@R."""
    seen = manifest.split("train", sample_classes(manifest, "train", val_classes, ev.gap_images, seed))
    out = {f"gap/seen_{k}": v for k, v in _subset_metrics(model, seen, ev, image_size, seed, runtime).items()}
    if val_classes:
        unseen = {k: val_metrics[f"val/{k}"] for k in GAP_METRICS}
    else:
        split = unseen_split(manifest)
        classes = sample_classes(manifest, split, set(), ev.gap_images, seed)
        unseen = _subset_metrics(model, manifest.split(split, classes), ev, image_size, seed, runtime)
    for key in GAP_METRICS:
        out[f"gap/unseen_{key}"] = unseen[key]
        out[f"gap/{key}"] = out[f"gap/seen_{key}"] - unseen[key]
    return out


def per_class_csv(labels: np.ndarray, per_query: dict[str, np.ndarray], manifest: Manifest) -> str:
    """CSV: per query class, its images, Recall@1 and MAP@R over its queries; worst Recall@1 first."""
    names = {c["id"]: (c["key"], c["name"]) for c in manifest.data["classes"]}
    rows = []
    for cls in np.unique(labels):
        mask = labels == cls
        ap = per_query["ap_at_r"][mask]
        rows.append((int(cls), *names.get(int(cls), (str(cls), str(cls))), int(mask.sum()),
                     float((per_query["first"][mask] <= 1).mean()),
                     float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")))
    rows.sort(key=lambda r: (r[4], r[5], r[0]))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["class_id", "class_key", "class_name", "images", "recall_at_1", "map_at_r"])
    for row in rows:
        writer.writerow([*row[:4], f"{row[4]:.4f}", f"{row[5]:.4f}"])
    return out.getvalue()


def worst_queries(per_query: dict[str, np.ndarray], count: int = 16) -> list[int]:
    """The queries with the lowest AP@R (ties: lower index), among those that have a relevant item."""
    ap = per_query["ap_at_r"]
    valid = np.flatnonzero(np.isfinite(ap))
    return sorted(valid[np.lexsort((valid, ap[valid]))][:count].tolist())


@torch.no_grad()
def attention_weights(model: torch.nn.Module, images: list, image_size: int) -> dict[str, np.ndarray]:
    """Each tap's attention weights over positions (N, h, w) for some images (PIL), or {} for a model whose
    pooling has no weights (no taps, or plain averaging)."""
    from pipeline.data.transforms import eval_transform

    pool = getattr(model, "pool", None)
    if pool is None or pool.kind == "avg" or not images:
        return {}
    transform = eval_transform(image_size)
    batch = torch.stack([transform(im.convert("RGB")) for im in images]).to(model_device(model))
    model.eval()
    model(batch)
    return {tap: w.float().cpu().numpy() for tap, w in pool.last_weights.items()}
