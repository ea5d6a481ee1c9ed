"""Exact inner-product search indexes for k-NN search, k-means and serving: faiss-cpu, faiss-gpu, or exact
chunked torch search where FAISS cannot run. Details: docs/internals.md.
"""

from __future__ import annotations

import logging
import math
from functools import lru_cache

import numpy as np
import torch

log = logging.getLogger(__name__)

FAISS_GPU_MAX_K = 2048


@lru_cache(maxsize=1)
def faiss_problem() -> str | None:
    """None when FAISS imports here, else why not."""
    try:
        import faiss  # noqa: F401
    except ImportError as err:
        return f"FAISS is not installed ({err}); install gdml's extra 'cpu' (faiss-cpu) or 'gpu' (faiss-gpu)"
    return None


@lru_cache(maxsize=1)
def faiss_gpu_problem() -> str | None:
    """None when faiss-gpu can run here, else why not (one line)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if faiss_problem():
        return faiss_problem()
    try:
        import faiss

        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
            return "faiss has no GPU support here (install the extra 'gpu': faiss-gpu)"
        index = faiss.index_cpu_to_gpu(gpu_resources(), torch.cuda.current_device(), faiss.IndexFlatIP(4))
        index.add(np.eye(4, dtype=np.float32))
        index.search(np.eye(4, dtype=np.float32), 1)
    except Exception as err:  # noqa: BLE001 - any failure to load or run means: do not use it
        return f"faiss-gpu failed beside torch ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    return None


@lru_cache(maxsize=1)
def gpu_resources():
    """FAISS's GPU scratch memory and streams, made once per process (each ``StandardGpuResources`` reserves its
    own)."""
    import faiss

    return faiss.StandardGpuResources()


def select_backend(device: str | torch.device = "cpu", k: int = 1, requested: str = "auto") -> str:
    """The backend for a search of ``k`` neighbours on ``device`` (see the module docstring)."""
    if requested != "auto":
        return requested
    if torch.device(device).type != "cuda":
        if faiss_problem():
            log.info("k-NN: %s; using exact torch search", faiss_problem())
            return "torch"
        return "faiss-cpu"
    problem = faiss_gpu_problem()
    if problem is not None:
        log.warning("k-NN: %s; using exact torch search on the GPU", problem)
        return "torch"
    if k > FAISS_GPU_MAX_K:
        log.warning("k-NN: k=%d exceeds FAISS's GPU limit of %d; using exact torch search on the GPU", k,
                    FAISS_GPU_MAX_K)
        return "torch"
    return "faiss-gpu"


class TorchFlatIndex:
    """Exact inner-product search with torch on a device (FAISS's ``search`` contract: scores, ids)."""

    def __init__(self, x: np.ndarray, device: str | torch.device = "cpu", chunk: int = 4096) -> None:
        self.device = torch.device(device)
        self.ref = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
        self.chunk = chunk
        self.ntotal = len(x)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = [], []
        for start in range(0, len(q), self.chunk):
            block = torch.from_numpy(np.ascontiguousarray(q[start:start + self.chunk], dtype=np.float32))
            s, i = (block.to(self.device) @ self.ref.T).topk(k, dim=1)
            scores.append(s.cpu().numpy())
            ids.append(i.cpu().numpy())
        return np.concatenate(scores), np.concatenate(ids)


def flat_index(x: np.ndarray, device: str | torch.device = "cpu", k: int = 1, backend: str = "auto"):
    """An exact inner-product index holding the rows of ``x``, searched on ``device`` for up to ``k`` neighbours.
    Anything with ``search(queries, k) -> (scores, ids)``."""
    chosen = select_backend(device, k, backend)
    if chosen == "torch":
        return TorchFlatIndex(x, device)
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])
    if chosen == "faiss-gpu":
        device = torch.device(device)  # the evaluating rank's own GPU, its resources made once
        index = faiss.index_cpu_to_gpu(gpu_resources(), device.index if device.index is not None else
                                       torch.cuda.current_device(), index)
    index.add(np.ascontiguousarray(x, dtype=np.float32))
    return index


def serving_index(x: np.ndarray, ivf_threshold: int = 50_000, nlist: int | None = None, nprobe: int = 16,
                  seed: int = 0):
    """(FAISS index, kind): exact (``flat``) below ``ivf_threshold`` rows, ``ivf`` (about 4 sqrt(n) lists) above."""
    if faiss_problem():
        raise RuntimeError(f"packaging a model needs FAISS: {faiss_problem()}")
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    d = x.shape[1]
    if len(x) < ivf_threshold:
        index = faiss.IndexFlatIP(d)
        index.add(x)
        return index, "flat"
    nlist = nlist or max(1, int(4 * math.sqrt(len(x))))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.train(x)
    index.add(x)
    index.nprobe = nprobe
    return index, "ivf"


def faiss_distribution() -> tuple[str, str] | None:
    """(distribution name, version) of the installed FAISS build, for a served model's requirements."""
    from importlib.metadata import PackageNotFoundError, version

    for name in ("faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu13", "faiss-cpu"):
        try:
            return name, version(name)
        except PackageNotFoundError:
            continue
    return None
