import numpy as np
import pytest
import torch

from pipeline.evaluation import index as index_mod
from pipeline.evaluation.index import FAISS_GPU_MAX_K, select_backend
from pipeline.evaluation.knn import knn
from tests.evaluation.test_metrics import random_embeddings


def test_self_search_excludes_self_and_matches_torch():
    emb, _ = random_embeddings(n=500, d=16)
    faiss_nn = knn(emb, 10, chunk=128)
    assert not (faiss_nn == np.arange(500)[:, None]).any()
    assert np.array_equal(faiss_nn, knn(emb, 10, backend="torch", chunk=100))


def test_gallery_search_matches_numpy():
    q, _ = random_embeddings(n=50, d=16, seed=1)
    g, _ = random_embeddings(n=80, d=16, seed=2)
    expected = np.argsort(-(q.astype(np.float64) @ g.T.astype(np.float64)), axis=1, kind="stable")[:, :7]
    assert np.array_equal(knn(q, 7, g), expected)


def test_ties_are_broken_by_index():
    emb = np.array([[1, 0], [1, 0], [1, 0], [0, 1]], dtype=np.float32)
    assert knn(emb, 3).tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]
    assert knn(emb, 3, backend="torch").tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]


def test_backend_follows_the_device_and_what_is_installed(monkeypatch, caplog):
    assert select_backend("cpu", 10) == "faiss-cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(index_mod, "faiss_gpu_problem", lambda: None)
    assert select_backend("cuda", 10) == "faiss-gpu"
    assert select_backend("cuda", FAISS_GPU_MAX_K + 1) == "torch"
    assert "exceeds FAISS's GPU limit" in caplog.text
    monkeypatch.setattr(index_mod, "faiss_gpu_problem", lambda: "faiss-gpu failed beside torch (ImportError: x)")
    assert select_backend("cuda", 10) == "torch"
    assert "using exact torch search on the GPU" in caplog.text
    assert select_backend("cpu", 10) == "faiss-cpu"  # the device decides, not what the machine has
    assert select_backend("cuda", 10, "faiss-cpu") == "faiss-cpu"


def test_faiss_gpu_problem_explains_itself_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")  # the GPU path is checked on the device machine
    index_mod.faiss_gpu_problem.cache_clear()
    assert index_mod.faiss_gpu_problem() == "no CUDA device"


def test_without_any_faiss_build_search_and_metrics_fall_back_to_torch(monkeypatch):
    from pipeline.evaluation.metrics import retrieval_metrics

    emb, labels = random_embeddings(n=300, d=16, classes=20, seed=3)
    with_faiss = {engine: retrieval_metrics(emb, labels, engine=engine) for engine in ("ranks", "knn")}
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)  # import faiss -> ImportError
    index_mod.faiss_problem.cache_clear()
    try:
        assert "FAISS is not installed" in index_mod.faiss_problem()
        assert select_backend("cpu", 5) == "torch"
        for engine, expected in with_faiss.items():
            got = retrieval_metrics(emb, labels, engine=engine)
            assert {k: v for k, v in got.items() if k != "nmi"} == {k: v for k, v in expected.items() if k != "nmi"}
            assert got["nmi"] == pytest.approx(expected["nmi"], abs=1e-6)
    finally:
        index_mod.faiss_problem.cache_clear()
