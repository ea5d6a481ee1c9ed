"""Figures of an evaluation (Recall@K curve, retrieval grid, 2-D projection of the embeddings) and of a run's
epochs, drawn from its MLflow history."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # no display on workers or CI

import numpy as np  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

if TYPE_CHECKING:
    from pipeline.tracking import Tracker


def recall_curve(runs: dict[str, dict[str, float]], title: str = "Recall@K on unseen classes") -> Figure:
    """Recall@K against K (log scale), one line per run."""
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=110)
    for name, metrics in runs.items():
        ks = sorted(int(k.rsplit("_", 1)[1]) for k in metrics if k.startswith("recall_at_"))
        ax.plot(ks, [metrics[f"recall_at_{k}"] for k in ks], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def retrieval_grid(query_images: dict[int, Image.Image], ref_images: dict[int, Image.Image], labels: np.ndarray,
                   ref_labels: np.ndarray, neighbors: dict[int, list[int]], queries: list[int], top: int = 5,
                   title: str = "queries and their nearest neighbours (red: another class)") -> Figure:
    """Each row: a query, then its ``top`` neighbours framed green (same class) or red (wrong)."""
    fig, axes = plt.subplots(len(queries), top + 1, figsize=(1.3 * (top + 1), 1.35 * len(queries)), dpi=110,
                             squeeze=False)
    for row, q in enumerate(queries):
        cells = [(query_images.get(q), "query", "black")]
        for j in neighbors[q][:top]:
            right = ref_labels[j] == labels[q]
            cells.append((ref_images.get(int(j)), "" if right else "wrong", "#2a9d3f" if right else "#d62828"))
        for col, (img, caption, color) in enumerate(cells):
            ax = axes[row, col]
            if img is not None:
                ax.imshow(ImageOps.expand(img.convert("RGB"), border=max(2, img.width // 16), fill=color))
            ax.axis("off")
            if caption:
                ax.set_title(caption, fontsize=7, color=color)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig


def projection(embeddings: np.ndarray, labels: np.ndarray, max_points: int = 1500, seed: int = 0) -> Figure:
    """t-SNE of (a seeded sample of) the embeddings, coloured by class."""
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(seed)
    idx = rng.choice(len(embeddings), size=min(max_points, len(embeddings)), replace=False)
    x, y = embeddings[idx], labels[idx]
    perplexity = float(min(30, max(2, len(x) // 4)))
    points = TSNE(2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(x)
    fig, ax = plt.subplots(figsize=(5, 5), dpi=110)
    ax.scatter(points[:, 0], points[:, 1], c=y % 20, cmap="tab20", s=6, linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"t-SNE of {len(x)} embeddings ({len(np.unique(y))} classes)")
    fig.tight_layout()
    return fig


def attention_maps(images: list[Image.Image], weights: dict[str, np.ndarray], image_size: int) -> Figure:
    """Each row: an image, then each tap's attention weights upsampled over it (brighter: more weight)."""
    taps = list(weights)
    fig, axes = plt.subplots(len(images), len(taps) + 1, figsize=(1.6 * (len(taps) + 1), 1.6 * len(images)),
                             dpi=110, squeeze=False)
    for row, img in enumerate(images):
        shown = ImageOps.fit(img.convert("RGB"), (image_size, image_size))
        axes[row, 0].imshow(shown)
        for col, tap in enumerate(taps, start=1):
            w = weights[tap][row]
            heat = Image.fromarray((255 * w / max(w.max(), 1e-12)).astype(np.uint8)).resize(
                (image_size, image_size), Image.Resampling.BILINEAR)
            axes[row, col].imshow(shown)
            axes[row, col].imshow(np.asarray(heat), cmap="inferno", alpha=0.6)
            if row == 0:
                axes[row, col].set_title(f"{tap} ({w.shape[0]}x{w.shape[1]})", fontsize=7)
        for ax in axes[row]:
            ax.axis("off")
    axes[0, 0].set_title("image", fontsize=7)
    fig.suptitle("attention over positions, per tap", fontsize=8)
    fig.tight_layout()
    return fig


def epoch_curves(history: dict[str, list[tuple[int, float]]], panels: list[tuple[str, list[str]]],
                 title: str, reference: dict[str, float] | None = None) -> Figure:
    """One panel per (title, metric keys): each key's value per epoch; ``reference``: dashed horizontal lines."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), dpi=110, squeeze=False)
    for ax, (name, keys) in zip(axes[0], panels):
        for key in keys:
            points = history.get(key, [])
            if points:
                ax.plot([s for s, _ in points], [v for _, v in points], marker="o", label=key)
        for key, value in (reference or {}).items():
            if key in keys or name in key:
                ax.axhline(value, ls="--", c="grey", lw=1, label=key)
        ax.set_xlabel("epoch")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def log_training_curves(tracker: Tracker) -> None:
    """Per-epoch figures from the run's MLflow history: the generalisation gap and the adversary's state."""
    if not tracker.enabled:
        return
    keys = ["gap/seen_recall_at_1", "gap/unseen_recall_at_1", "gap/seen_map_at_r", "gap/unseen_map_at_r",
            "adv_acc", "adv_chance", "adv_lambda", "adv_grad_ratio"]
    try:
        history = {k: [(m.step, m.value) for m in sorted(tracker.client.get_metric_history(tracker.run_id, k),
                                                          key=lambda m: m.step)] for k in keys}
    except Exception as err:  # noqa: BLE001 - the curves are drawn from MLflow's history; without it, none
        logging.getLogger(__name__).warning("per-epoch figures left out: MLflow's history is not readable (%s)",
                                            type(err).__name__)
        return
    figures = []
    if history["gap/seen_recall_at_1"]:
        figures.append(("generalisation_gap", epoch_curves(
            history, [("Recall@1", keys[0:2]), ("MAP@R", keys[2:4])],
            "seen classes vs held-out classes, per epoch (the gap is their difference)")))
    if history["adv_acc"]:
        figures.append(("adversary", epoch_curves(
            history, [("head accuracy on training classes", ["adv_acc", "adv_chance"]), ("lambda", ["adv_lambda"]),
                      ("|reversed gradient| / |metric-loss gradient|", ["adv_grad_ratio"])],
            "the class adversary, per epoch")))
    for name, fig in figures:
        tracker.log_figure(fig, f"plots/{name}.png")
        plt.close(fig)
