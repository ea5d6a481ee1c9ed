"""Evaluating a model or a checkpoint on a split, and logging the result (metrics and plots) to a tracker."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.config import Config, EvalConfig
from pipeline.evaluation.embed import embed_split, load_images, model_device
from pipeline.evaluation.knn import neighbours_of
from pipeline.evaluation.metrics import retrieval_metrics


@dataclass
class Evaluation:
    """What one evaluation produced: the metrics, and what the plots need."""

    metrics: dict[str, float]
    embeddings: np.ndarray
    labels: np.ndarray
    query_split: str
    ref_split: str | None = None
    ref_labels: np.ndarray | None = None
    ref_embeddings: np.ndarray | None = None
    device: str = "cpu"
    """Where the model embedded and the metrics searched."""

    def neighbours(self, rows: list[int], k: int) -> dict[int, list[int]]:
        """The k nearest references of some queries (for the retrieval grid)."""
        return neighbours_of(rows, self.embeddings, k, self.ref_embeddings, device=self.device)


def protocol_splits(manifest: dict, split: str) -> tuple[str, str | None]:
    """(query split, gallery split or None): In-Shop style manifests evaluate 'test' as query vs gallery."""
    splits = manifest["splits"]
    if split == "test" and "test" not in splits and {"query", "gallery"} <= set(splits):
        return "query", "gallery"
    if split not in splits:
        raise ValueError(f"split {split!r} is not in the manifest; it has: {', '.join(splits)}")
    return split, None


def evaluate_model(model: torch.nn.Module, manifest: dict, root: str, split: str, ev: EvalConfig,
                   image_size: int, seed: int = 0, progress: bool = True) -> Evaluation:
    """Embed a split (and its gallery, if any) on the model's device and compute the metrics once."""
    query_split, gallery_split = protocol_splits(manifest, split)
    emb, labels, _ = embed_split(model, manifest, root, query_split, ev.batch_size, image_size, progress=progress)
    gallery = gallery_labels = None
    if gallery_split:
        gallery, gallery_labels, _ = embed_split(model, manifest, root, gallery_split, ev.batch_size, image_size,
                                                 progress=progress)
    device = model_device(model)
    metrics = retrieval_metrics(emb, labels, ev.recall_at, seed, gallery, gallery_labels, engine=ev.engine,
                                progress=progress, device=device)
    return Evaluation(metrics, emb, labels, query_split, gallery_split, gallery_labels, gallery, str(device))


def validation_metrics(model: torch.nn.Module, manifest: dict, root: str, classes: set[int], ev: EvalConfig,
                       image_size: int, seed: int = 0) -> dict[str, float]:
    """Retrieval metrics on held-out *training* classes (the sweep's objective), keyed ``val/<metric>``."""
    emb, labels, _ = embed_split(model, manifest, root, "train", ev.batch_size, image_size, classes=classes,
                                 progress=False)
    metrics = retrieval_metrics(emb, labels, ev.recall_at, seed, engine=ev.engine, device=model_device(model))
    return {f"val/{k}": v for k, v in metrics.items()}


def evaluate_checkpoint(checkpoint: str, cfg: Config, manifest: dict[str, Any], split: str = "test",
                        progress: bool = True) -> Evaluation:
    """Load a checkpoint's model and evaluate it on a split, in this process, on the device the one decision
    gives (``train.device``: CUDA where present, unless forced)."""
    from pipeline.checkpoint import load_model
    from pipeline.runtime import inference_device

    model, _, _ = load_model(checkpoint, inference_device(cfg.train.device))
    return evaluate_model(model, manifest, cfg.data.root, split, cfg.eval, cfg.data.image_size, seed=cfg.train.seed,
                          progress=progress)


def log_evaluation(tracker, ev: Evaluation, manifest: dict[str, Any], root: str, prefix: str, plots: bool = True,
                   seed: int = 0) -> None:
    """Metrics as ``<prefix>/<key>``; plots (Recall@K curve, retrieval grid, t-SNE) under ``plots/``."""
    from matplotlib import pyplot as plt

    from pipeline.evaluation import plots as figures

    tracker.log_metrics({f"{prefix}/{k}": v for k, v in ev.metrics.items()})
    if not plots or not tracker.enabled:
        return
    rng = np.random.default_rng(seed)
    queries = sorted(rng.choice(len(ev.labels), size=min(8, len(ev.labels)), replace=False).tolist())
    neighbours = ev.neighbours(queries, 5)
    top = min(len(nn) for nn in neighbours.values())
    wanted_refs = {j for q in queries for j in neighbours[q][:top]}
    if ev.ref_split is None:
        query_images = ref_images = load_images(manifest, root, ev.query_split, set(queries) | wanted_refs)
    else:
        query_images = load_images(manifest, root, ev.query_split, set(queries))
        ref_images = load_images(manifest, root, ev.ref_split, wanted_refs)
    ref_labels = ev.labels if ev.ref_labels is None else ev.ref_labels
    for name, fig in (
        ("recall_at_k", figures.recall_curve({prefix: ev.metrics})),
        ("retrieval", figures.retrieval_grid(query_images, ref_images, ev.labels, ref_labels, neighbours,
                                             queries, top)),
        ("tsne", figures.projection(ev.embeddings, ev.labels, seed=seed)),
    ):
        tracker.log_figure(fig, f"plots/{prefix}_{name}.png")
        plt.close(fig)
