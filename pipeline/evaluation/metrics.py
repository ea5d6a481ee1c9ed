"""Zero-shot retrieval metrics on unseen classes: Recall@K, NMI, MAP@R, R-Precision, Precision@1.

An engine (``ranks``: exact ranks in one pass; ``knn``: FAISS k-NN lists turned into ranks) gives the ranks of each
query's relevant items; one function (``ranks.metrics_from_ranks``) turns them into every metric. Ties go to the
lower index; on exactly tied scores the k-NN engine can differ in the last digits (docs/evaluation.md).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import torch
from sklearn.metrics import normalized_mutual_info_score

from pipeline import names
from pipeline.evaluation.knn import knn
from pipeline.evaluation.ranks import metrics_from_ranks

log = logging.getLogger(__name__)


def relevant_counts(query_labels: np.ndarray, ref_labels: np.ndarray, self_search: bool) -> np.ndarray:
    """R per query: reference items of its class (itself excluded in a self-search)."""
    classes, counts = np.unique(ref_labels, return_counts=True)
    pos = np.searchsorted(classes, query_labels)
    found = (pos < len(classes)) & (classes[np.minimum(pos, len(classes) - 1)] == query_labels)
    r = np.where(found, counts[np.minimum(pos, len(classes) - 1)], 0)
    return r - 1 if self_search else r


def ranks_from_neighbours(neighbors: np.ndarray, query_labels: np.ndarray, ref_labels: np.ndarray,
                          r: np.ndarray) -> np.ndarray:
    """The k-NN engine's answer in the rank engines' form (``evaluation.ranks``): ``ranks[i, j]``, the 1-based rank
    of query i's j-th relevant item among its k neighbours, k + 1 for one beyond them (k covers every K and R, so
    that is beyond every threshold a metric asks about)."""
    hits = ref_labels[neighbors] == query_labels[:, None]
    n, k = hits.shape
    ranks = np.full((n, max(int(r.max(initial=0)), 1)), k + 1, dtype=np.int64)
    rows, cols = np.nonzero(hits)
    nth = (np.cumsum(hits, axis=1) - 1)[rows, cols]
    keep = nth < ranks.shape[1]
    ranks[rows[keep], nth[keep]] = cols[keep] + 1
    return ranks


def kmeans_seeds(n: int, k: int, seed: int = 0) -> np.ndarray:
    """The k distinct rows (sorted) that k-means starts from."""
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def spherical_kmeans(x: np.ndarray, k: int, niter: int = 20, seed: int = 0,
                     first: np.ndarray | None = None, device: str | torch.device = "cpu") -> np.ndarray:
    """Cluster of each row: Lloyd's k-means with centroids renormalised (the natural choice for L2-normalised
    embeddings), started from k distinct random rows, stopped after ``niter`` updates or when no row moves.

    The nearest-centroid search is exact inner product on ``device`` (``evaluation.index``: FAISS, or torch where
    FAISS cannot run there). ``faiss.Kmeans`` runs the same iterations
    but keeps no assignment, so it costs one more full search at the end (15% of SOP's evaluation time).
    An emptied cluster takes over half of the largest one, as in FAISS. ``first``: the first assignment (each
    row's nearest seed), when it is already known (``evaluation.ranks`` finds it in its pass).
    """
    from scipy import sparse

    from pipeline.evaluation.index import flat_index

    n = len(x)
    centroids = x[kmeans_seeds(n, k, seed)].copy()

    def assign() -> np.ndarray:
        return flat_index(centroids, device).search(x, 1)[1][:, 0]

    labels = assign() if first is None else np.asarray(first, dtype=np.int64).copy()
    for _ in range(niter):
        members = sparse.csr_matrix((np.ones(n, dtype=np.float32), (labels, np.arange(n))), shape=(k, n))
        sums = members @ x
        sizes = np.bincount(labels, minlength=k)
        for empty in np.flatnonzero(sizes == 0):
            big = int(np.argmax(sizes))
            rows = np.flatnonzero(labels == big)
            moved = rows[: len(rows) // 2]
            labels[moved] = empty
            sums[empty], sums[big] = x[moved].sum(axis=0), x[rows[len(rows) // 2:]].sum(axis=0)
            sizes[empty], sizes[big] = len(moved), len(rows) - len(moved)
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        centroids = np.ascontiguousarray(sums / np.maximum(norms, 1e-12), dtype=np.float32)
        moved_labels = assign()
        if np.array_equal(moved_labels, labels):
            break
        labels = moved_labels
    return labels


def nmi(embeddings: np.ndarray, labels: np.ndarray, seed: int = 0, niter: int = 20,
        first: np.ndarray | None = None, device: str | torch.device = "cpu") -> float:
    """NMI of k-means clusters (k = number of classes, at most 20 iterations as pytorch-metric-learning runs
    FAISS's) vs the labels; spherical k-means (``spherical_kmeans``)."""
    k = len(np.unique(labels))
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    return float(normalized_mutual_info_score(labels, spherical_kmeans(x, k, niter, seed, first, device)))


def neighbours_needed(query_labels: np.ndarray, ref_labels: np.ndarray | None, recall_at: Iterable[int]) -> int:
    self_search = ref_labels is None
    r = relevant_counts(query_labels, query_labels if self_search else ref_labels, self_search)
    return max(max(recall_at), int(r.max()))


ENGINES = names.ENGINES
"""How the metrics search (``eval.engine``); ``auto`` picks one (``select_engine``)."""


def select_engine(requested: str = "auto") -> str:
    """``ranks`` unless ``knn`` is asked for: exact on every device (numba on CPU, torch on a GPU)."""
    if requested not in ENGINES:
        raise ValueError(f"metrics engine {requested!r}: expected one of {', '.join(ENGINES)}")
    return "ranks" if requested == "auto" else requested


def retrieval_metrics(embeddings: np.ndarray, labels: np.ndarray, recall_at: Iterable[int] = (1, 2, 4, 8),
                      seed: int = 0, gallery: np.ndarray | None = None, gallery_labels: np.ndarray | None = None,
                      engine: str = "auto", knn_backend: str = "auto", progress: bool = False,
                      device: str | torch.device = "cpu", with_nmi: bool = True, per_query: bool = False):
    """The full metric set, as one flat dict, computed on ``device``.

    Without a gallery every row queries all *other* rows (the standard protocol); with one (In-Shop), every
    row queries the gallery. NMI clusters the query embeddings (``with_nmi``). Both engines, on every device, give
    the same numbers (``select_engine``; on exactly tied scores see the module's note). ``per_query``: (metrics,
    per-query values: ``first`` rank of a relevant item, ``ap_at_r``, ``r_precision``).
    """
    ks = sorted(set(recall_at))
    labels = np.asarray(labels)
    self_search = gallery is None
    ref_labels = labels if self_search else np.asarray(gallery_labels)
    gpu = torch.device(device).type != "cpu"
    first = None  # k-means' first assignment, where the CPU rank pass finds it
    if select_engine(engine) == "ranks" and gpu:
        from pipeline.evaluation.ranks_torch import relevant_ranks_torch

        ranks, r = relevant_ranks_torch(embeddings, labels, gallery, ref_labels if gallery is not None else None,
                                        device=device, progress=progress)
        out, queries = metrics_from_ranks(ranks, r, ks, per_query=True)
    elif select_engine(engine) == "ranks":
        from pipeline.evaluation.ranks import relevant_ranks

        if self_search and with_nmi:  # the pass also finds k-means' first assignment (nearest seed row)
            ranks, r, first = relevant_ranks(embeddings, labels, progress=progress, max_rank=ks[-1],
                                             seeds=kmeans_seeds(len(labels), len(np.unique(labels)), seed))
        else:
            ranks, r = relevant_ranks(embeddings, labels, gallery, ref_labels, progress=progress, max_rank=ks[-1])
        out, queries = metrics_from_ranks(ranks, r, ks, per_query=True)
    else:
        neighbors = knn(embeddings, neighbours_needed(labels, None if self_search else ref_labels, ks), gallery,
                        device=device, backend=knn_backend)
        r = relevant_counts(labels, ref_labels, self_search)
        out, queries = metrics_from_ranks(ranks_from_neighbours(neighbors, labels, ref_labels, r), r, ks,
                                          per_query=True)
    if with_nmi:
        out["nmi"] = nmi(embeddings, labels, seed, first=first, device=device)
    return (out, queries) if per_query else out


_ORDER = ("recall_at_", "map_at_r", "r_precision", "precision_at_1", "nmi")


def ordered(keys: Iterable[str]) -> list[str]:
    """Metric keys in the one order tables show them: Recall@K by K, MAP@R, R-Precision, P@1, NMI, then any
    other key (sorted), so that a new metric is never left out of a table."""

    def rank(key: str) -> tuple:
        if key.startswith("recall_at_") and key.removeprefix("recall_at_").isdigit():
            return (0, int(key.removeprefix("recall_at_")), key)
        return (_ORDER.index(key), 0, key) if key in _ORDER else (len(_ORDER), 0, key)

    return sorted(set(keys), key=rank)
