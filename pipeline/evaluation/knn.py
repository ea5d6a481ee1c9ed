"""Exact k-nearest-neighbour search by inner product, chunked, ties broken by the lower reference index on every
backend (``evaluation.index``).
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.evaluation.index import flat_index


def _sort_ties(scores: np.ndarray, idx: np.ndarray) -> np.ndarray:
    order = np.lexsort((idx, -scores), axis=-1)
    return np.take_along_axis(idx, order, axis=-1)


def knn(query: np.ndarray, k: int, reference: np.ndarray | None = None, chunk: int = 8192,
        device: str | torch.device = "cpu", backend: str = "auto") -> np.ndarray:
    """Indices into ``reference`` of each query's ``k`` nearest neighbours by inner product, searched on ``device``.

    With ``reference=None`` the query set searches itself and each query's own row is left out (the standard
    protocol: every image queries all *other* images).
    """
    q = np.ascontiguousarray(query, dtype=np.float32)
    self_search = reference is None
    ref = q if self_search else np.ascontiguousarray(reference, dtype=np.float32)
    k = min(k, len(ref) - (1 if self_search else 0))
    if k < 1:
        raise ValueError(f"k-NN needs at least {2 if self_search else 1} reference items, got {len(ref)}")
    extra = 1 if self_search else 0
    search = flat_index(ref, device, k + extra, backend).search
    out = np.empty((len(q), k), dtype=np.int64)
    for start in range(0, len(q), chunk):
        block = q[start:start + chunk]
        scores, idx = search(block, k + extra)
        idx = _sort_ties(scores, idx)
        if self_search:
            rows = np.arange(start, start + len(block))[:, None]
            is_self = idx == rows
            keep = ~is_self
            keep[~is_self.any(axis=1), -1] = False  # self not among the k+1 (a tie): drop the last instead
            idx = idx[keep].reshape(len(block), k)
        out[start:start + len(block)] = idx
    return out


def neighbours_of(rows: list[int], embeddings: np.ndarray, k: int, reference: np.ndarray | None = None,
                  device: str | torch.device = "cpu") -> dict[int, list[int]]:
    """The ``k`` nearest neighbours of some rows of ``embeddings``: in ``reference``, or among the other rows."""
    q = np.ascontiguousarray(np.asarray(embeddings)[rows], dtype=np.float32)
    if reference is not None:
        return {r: nn.tolist() for r, nn in zip(rows, knn(q, k, reference, device=device))}
    found = knn(q, min(k + 1, len(embeddings)), embeddings, device=device)
    return {r: [int(j) for j in nn if j != r][:k] for r, nn in zip(rows, found)}
