"""Evaluating a model or a checkpoint on a split, and logging the result (metrics, plots, per-class table)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.config import Config, EvalConfig
from pipeline.data.manifest import Manifest, Split
from pipeline.errors import GdmlError
from pipeline.evaluation.embed import embed_split, load_images, model_device
from pipeline.evaluation.knn import neighbours_of
from pipeline.evaluation.metrics import retrieval_metrics
from pipeline.runtime import Runtime


class TooManyUnreadable(GdmlError):
    """More of a split's images could not be read than ``data.max_bad_fraction`` allows."""


@dataclass
class Evaluation:
    """What one evaluation produced: the metrics, and what the plots and tables need."""

    metrics: dict[str, float]
    embeddings: np.ndarray
    labels: np.ndarray
    query_split: str
    ref_split: str | None = None
    ref_labels: np.ndarray | None = None
    ref_embeddings: np.ndarray | None = None
    device: str = "cpu"
    """Where the model embedded and the metrics searched."""
    per_query: dict[str, np.ndarray] = field(default_factory=dict)
    """Per query: ``first`` (rank of its first relevant item), ``ap_at_r``, ``r_precision``."""
    skipped: int = 0
    """Images that could not be read (left out of the metrics)."""
    model: torch.nn.Module | None = field(default=None, repr=False)

    def neighbours(self, rows: list[int], k: int) -> dict[int, list[int]]:
        """The k nearest references of some queries (for the retrieval grids)."""
        return neighbours_of(rows, self.embeddings, k, self.ref_embeddings, device=self.device)


def evaluate_model(model: torch.nn.Module, manifest: Manifest, split: str, ev: EvalConfig, image_size: int,
                   seed: int = 0, progress: bool = True, verify: bool = True,
                   max_bad_fraction: float = 1.0) -> Evaluation:
    """Embed a split (and its gallery, if any) on the model's device and compute the metrics once. More
    unreadable images than ``max_bad_fraction`` of the split raise ``TooManyUnreadable``."""
    query_split, gallery_split = manifest.protocol(split)
    stats: dict[str, int] = {}
    emb, labels, _ = embed_split(model, manifest.split(query_split, verify=verify), ev, image_size,
                                 progress=progress, stats=stats)
    gallery = gallery_labels = None
    if gallery_split:
        gallery, gallery_labels, _ = embed_split(model, manifest.split(gallery_split, verify=verify), ev, image_size,
                                                 progress=progress, stats=stats)
    expected = sum(manifest.images(s) for s in (query_split, gallery_split) if s)
    skipped = stats.get("skipped", 0)
    if skipped and expected and skipped / expected > max_bad_fraction:
        raise TooManyUnreadable(f"{skipped} of {expected} images of the {split} split could not be read (over "
                                f"data.max_bad_fraction={max_bad_fraction}); the metrics would not be comparable")
    device = model_device(model)
    metrics, per_query = retrieval_metrics(emb, labels, ev.recall_at, seed, gallery, gallery_labels,
                                           engine=ev.engine, progress=progress, device=device, per_query=True)
    return Evaluation(metrics, emb, labels, query_split, gallery_split, gallery_labels, gallery, str(device),
                      per_query, skipped, model)


def validation_metrics(model: torch.nn.Module, split: Split, ev: EvalConfig, image_size: int, seed: int = 0,
                       runtime: Runtime | None = None) -> dict[str, float]:
    """Retrieval metrics on held-out *training* classes (the sweep's objective), keyed ``val/<metric>``."""
    emb, labels, _ = embed_split(model, split, ev, image_size, progress=False, runtime=runtime)
    metrics = retrieval_metrics(emb, labels, ev.recall_at, seed, engine=ev.engine, device=model_device(model))
    return {f"val/{k}": v for k, v in metrics.items()}


def evaluate_checkpoint(checkpoint: str, cfg: Config, manifest: Manifest, split: str = "test",
                        progress: bool = True) -> Evaluation:
    """Load a checkpoint's model and evaluate it on a split, in this process, on the device the one decision
    gives (``train.device``: CUDA where present, unless forced)."""
    from pipeline.checkpoint import load_model
    from pipeline.runtime import inference_device

    model, _, _ = load_model(checkpoint, inference_device(cfg.train.device))
    return evaluate_model(model, manifest, split, cfg.eval, cfg.data.image_size, seed=cfg.train.seed,
                          progress=progress, verify=cfg.data.verify, max_bad_fraction=cfg.data.max_bad_fraction)


def log_evaluation(tracker, ev: Evaluation, manifest: Manifest, prefix: str, plots: bool = True,
                   seed: int = 0, image_size: int = 64) -> None:
    """Metrics as ``<prefix>/<key>`` (with ``<prefix>/skipped_images``); the per-class table; plots under
    ``plots/``: Recall@K curve, retrieval grid, the worst queries, attention maps, t-SNE."""
    from matplotlib import pyplot as plt

    from pipeline.evaluation import diagnostics
    from pipeline.evaluation import plots as figures

    tracker.log_metrics({**{f"{prefix}/{k}": v for k, v in ev.metrics.items()}, f"{prefix}/skipped_images": ev.skipped})
    started = time.perf_counter()  # the diagnostics' own cost: per-class table, worst queries, attention maps
    if ev.per_query:
        tracker.log_text(diagnostics.per_class_csv(ev.labels, ev.per_query, manifest), f"{prefix}_per_class.csv")
    spent = time.perf_counter() - started
    if not plots or not tracker.enabled:
        tracker.log_metrics({f"{prefix}/diagnostics_seconds": spent})
        return
    rng = np.random.default_rng(seed)
    queries = sorted(rng.choice(len(ev.labels), size=min(8, len(ev.labels)), replace=False).tolist())
    worst = diagnostics.worst_queries(ev.per_query) if ev.per_query else []
    neighbours = ev.neighbours(sorted(set(queries) | set(worst)), 5)
    top = min(len(nn) for nn in neighbours.values())
    wanted_refs = {j for q in neighbours for j in neighbours[q][:top]}
    if ev.ref_split is None:
        query_images = ref_images = load_images(manifest.split(ev.query_split), set(queries) | set(worst) | wanted_refs)
    else:
        query_images = load_images(manifest.split(ev.query_split), set(queries) | set(worst))
        ref_images = load_images(manifest.split(ev.ref_split), wanted_refs)
    ref_labels = ev.labels if ev.ref_labels is None else ev.ref_labels
    figs = [
        ("recall_at_k", figures.recall_curve({prefix: ev.metrics})),
        ("retrieval", figures.retrieval_grid(query_images, ref_images, ev.labels, ref_labels, neighbours, queries,
                                             top)),
        ("tsne", figures.projection(ev.embeddings, ev.labels, seed=seed)),
    ]
    started = time.perf_counter()
    if worst:
        figs.append(("worst_queries", figures.retrieval_grid(
            query_images, ref_images, ev.labels, ref_labels, neighbours, worst, top,
            title=f"the {len(worst)} queries with the lowest AP@R and their nearest neighbours (red: another class)")))
    if ev.model is not None:
        images = [query_images[q] for q in queries if q in query_images]
        weights = diagnostics.attention_weights(ev.model, images, image_size)
        if weights:
            figs.append(("attention", figures.attention_maps(images, weights, image_size)))
    spent += time.perf_counter() - started
    for name, fig in figs:
        started = time.perf_counter()
        tracker.log_figure(fig, f"plots/{prefix}_{name}.png")
        plt.close(fig)
        if name in ("worst_queries", "attention"):
            spent += time.perf_counter() - started
    tracker.log_metrics({f"{prefix}/diagnostics_seconds": spent})
