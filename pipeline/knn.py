"""Exact k-nearest-neighbour search by inner product (cosine on L2-normalised embeddings).

Backends, chosen at run time by what is installed and present:

- ``faiss-gpu``: faiss-gpu installed, a CUDA device present, and k within FAISS's GPU limit (2048);
- ``torch-gpu``: a CUDA device but no usable faiss-gpu (faiss-gpu on PyPI links CUDA 12 while torch is a
  CUDA 13 build: if it cannot load or run beside torch, gdml says so in one line and uses this);
- ``faiss-cpu``: everything else.

All return the same neighbours: queries are chunked (bounded memory at 60,000 x 512 and beyond) and ties
are broken by the lower reference index, whatever the backend returns among equal scores.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import numpy as np
import torch

log = logging.getLogger(__name__)

FAISS_GPU_MAX_K = 2048
BACKENDS = ("auto", "faiss-cpu", "faiss-gpu", "torch-gpu", "torch-cpu")


@lru_cache(maxsize=1)
def faiss_gpu_problem() -> str | None:
    """None when faiss-gpu can run here, else why not (one line)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import faiss

        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
            return "faiss has no GPU support here (install the extra 'gpu': faiss-gpu)"
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, faiss.IndexFlatIP(4))
        index.add(np.eye(4, dtype=np.float32))
        index.search(np.eye(4, dtype=np.float32), 1)
    except Exception as err:  # noqa: BLE001 - any failure to load or run means: do not use it
        return f"faiss-gpu failed beside torch ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    return None


def select_backend(k: int, requested: str = "auto") -> str:
    """The backend for a search of ``k`` neighbours (see the module docstring)."""
    if requested != "auto":
        return requested
    if not torch.cuda.is_available():
        return "faiss-cpu"
    problem = faiss_gpu_problem()
    if problem is not None:
        log.warning("k-NN: %s; using exact torch k-NN on the GPU", problem)
        return "torch-gpu"
    if k > FAISS_GPU_MAX_K:
        log.warning("k-NN: k=%d exceeds FAISS's GPU limit of %d; searching on the CPU", k, FAISS_GPU_MAX_K)
        return "faiss-cpu"
    return "faiss-gpu"


def _sort_ties(scores: np.ndarray, idx: np.ndarray) -> np.ndarray:
    order = np.lexsort((idx, -scores), axis=-1)
    return np.take_along_axis(idx, order, axis=-1)


def _faiss_search(ref: np.ndarray, gpu: bool):
    import faiss

    index = faiss.IndexFlatIP(ref.shape[1])
    if gpu:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(ref)
    return index.search


def _torch_search(ref: np.ndarray, device: str):
    ref_t = torch.from_numpy(ref).to(device)

    def search(q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        sims = torch.from_numpy(q).to(device) @ ref_t.T
        scores, idx = sims.topk(k, dim=1)
        return scores.cpu().numpy(), idx.cpu().numpy()

    return search


def knn(query: np.ndarray, k: int, reference: np.ndarray | None = None, chunk: int = 8192,
        backend: str = "auto") -> np.ndarray:
    """Indices into ``reference`` of each query's ``k`` nearest neighbours by inner product.

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
    chosen = select_backend(k + extra, backend)
    if chosen.startswith("faiss"):
        search = _faiss_search(ref, gpu=chosen == "faiss-gpu")
    else:
        search = _torch_search(ref, "cuda" if chosen == "torch-gpu" else "cpu")
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
                  backend: str = "auto") -> dict[int, list[int]]:
    """The ``k`` nearest neighbours of some rows of ``embeddings``: in ``reference``, or among the other rows."""
    q = np.ascontiguousarray(np.asarray(embeddings)[rows], dtype=np.float32)
    if reference is not None:
        return {r: nn.tolist() for r, nn in zip(rows, knn(q, k, reference, backend=backend))}
    found = knn(q, min(k + 1, len(embeddings)), embeddings, backend=backend)
    return {r: [int(j) for j in nn if j != r][:k] for r, nn in zip(rows, found)}
