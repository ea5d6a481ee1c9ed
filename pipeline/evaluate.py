"""Zero-shot retrieval metrics on unseen classes: Recall@K, NMI, MAP@R, R-Precision.

Protocol: every test image queries all *other* test images (exact inner-product search on L2-normalised
embeddings). Metrics are computed once, in one process, and returned as one flat dict with stable keys
(``recall_at_1``, ``nmi``, ``map_at_r`` ...; MLflow allows no '@' in names) that the CLI, MLflow, Tune and the tests share.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import torch
from sklearn.metrics import normalized_mutual_info_score
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pipeline.data.stream import SplitImages

log = logging.getLogger(__name__)


def faiss_backend() -> str:
    """'gpu' when faiss-gpu is installed and a CUDA device is present, else 'cpu'."""
    import faiss

    try:
        if torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            return "gpu"
    except Exception as err:  # noqa: BLE001 - a broken GPU build falls back to the CPU
        log.warning("faiss GPU unusable (%s); using the CPU index", err)
    return "cpu"


def knn(embeddings: np.ndarray, k: int, chunk: int = 8192) -> np.ndarray:
    """Indices of each row's ``k`` nearest *other* rows by inner product, ties broken by lower index."""
    import faiss

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, d = x.shape
    k = min(k, n - 1)
    index = faiss.IndexFlatIP(d)
    if faiss_backend() == "gpu" and k + 1 <= 2048:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(x)
    out = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, chunk):
        q = x[start:start + chunk]
        scores, idx = index.search(q, k + 1)
        # Deterministic ties: order by (-score, index); then drop the query itself (or the last if absent).
        order = np.lexsort((idx, -scores), axis=1)
        idx = np.take_along_axis(idx, order, axis=1)
        rows = np.arange(start, start + len(q))[:, None]
        is_self = idx == rows
        keep = ~is_self
        keep[~is_self.any(axis=1), -1] = False
        out[start:start + len(q)] = idx[keep].reshape(len(q), k)
    return out


def recall_at_k(neighbors: np.ndarray, labels: np.ndarray, ks: Iterable[int]) -> dict[str, float]:
    hits = labels[neighbors] == labels[:, None]
    return {f"recall_at_{k}": float(hits[:, :k].any(axis=1).mean()) for k in ks}


def map_at_r(neighbors: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """MAP@R and R-Precision ("A Metric Learning Reality Check"), R = number of other same-class items."""
    classes, counts = np.unique(labels, return_counts=True)
    r = counts[np.searchsorted(classes, labels)] - 1
    valid = r > 0
    if not valid.any():
        return {"map_at_r": float("nan"), "r_precision": float("nan")}
    max_r = int(r.max())
    if neighbors.shape[1] < max_r:
        raise ValueError(f"MAP@R needs {max_r} neighbours per query, got {neighbors.shape[1]}")
    hits = (labels[neighbors[:, :max_r]] == labels[:, None]).astype(np.float64)
    within_r = np.arange(max_r)[None, :] < r[:, None]
    hits *= within_r
    precision_at_i = np.cumsum(hits, axis=1) / np.arange(1, max_r + 1)[None, :]
    rr = np.maximum(r, 1)
    ap = (precision_at_i * hits).sum(axis=1) / rr
    rp = hits.sum(axis=1) / rr
    return {"map_at_r": float(ap[valid].mean()), "r_precision": float(rp[valid].mean())}


def nmi(embeddings: np.ndarray, labels: np.ndarray, seed: int = 0) -> float:
    """NMI of k-means clusters (k = number of classes) against the labels."""
    import faiss

    k = len(np.unique(labels))
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    km = faiss.Kmeans(x.shape[1], k, niter=50, seed=seed, verbose=False, spherical=True,
                      min_points_per_centroid=1, max_points_per_centroid=1 << 20)
    km.train(x)
    _, assign = km.index.search(x, 1)
    return float(normalized_mutual_info_score(labels, assign[:, 0]))


def retrieval_metrics(embeddings: np.ndarray, labels: np.ndarray, recall_at: Iterable[int] = (1, 2, 4, 8),
                      seed: int = 0) -> dict[str, float]:
    ks = sorted(set(recall_at))
    labels = np.asarray(labels)
    max_r = int(np.unique(labels, return_counts=True)[1].max()) - 1
    neighbors = knn(embeddings, max(ks[-1], max_r))
    out = recall_at_k(neighbors, labels, ks)
    out.update(map_at_r(neighbors, labels))
    out["nmi"] = nmi(embeddings, labels, seed)
    return out


@torch.no_grad()
def embed_split(model: torch.nn.Module, manifest: dict, root: str, split: str = "test", batch_size: int = 256,
                device: str | torch.device = "cpu", progress: bool = True) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Embeddings, labels and keys of every image of a split (one process)."""
    model.eval()
    data = DataLoader(SplitImages(manifest, root, split), batch_size=batch_size)
    total = manifest["splits"][split]["samples"]
    embs, labels, keys = [], [], []
    with tqdm(total=total, desc=f"embed {split}", unit="img", disable=not progress) as bar:
        for images, cls, key in data:
            emb, _ = model(images.to(device))
            embs.append(emb.float().cpu().numpy())
            labels.append(cls.numpy())
            keys += list(key)
            bar.update(len(cls))
    return np.concatenate(embs), np.concatenate(labels), keys
