import numpy as np
import pytest
import torch

from pipeline import knn as knn_mod
from pipeline.knn import FAISS_GPU_MAX_K, knn, select_backend
from tests.evaluation.test_metrics import random_embeddings


def test_self_search_excludes_self_and_matches_torch():
    emb, _ = random_embeddings(n=500, d=16)
    faiss_nn = knn(emb, 10, chunk=128)
    assert not (faiss_nn == np.arange(500)[:, None]).any()
    assert np.array_equal(faiss_nn, knn(emb, 10, backend="torch-cpu", chunk=100))


def test_gallery_search_matches_numpy():
    q, _ = random_embeddings(n=50, d=16, seed=1)
    g, _ = random_embeddings(n=80, d=16, seed=2)
    expected = np.argsort(-(q.astype(np.float64) @ g.T.astype(np.float64)), axis=1, kind="stable")[:, :7]
    assert np.array_equal(knn(q, 7, g), expected)


def test_ties_are_broken_by_index():
    emb = np.array([[1, 0], [1, 0], [1, 0], [0, 1]], dtype=np.float32)
    assert knn(emb, 3).tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]
    assert knn(emb, 3, backend="torch-cpu").tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]


def test_backend_selection(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_backend(10) == "faiss-cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(knn_mod, "faiss_gpu_problem", lambda: None)
    assert select_backend(10) == "faiss-gpu"
    assert select_backend(FAISS_GPU_MAX_K + 1) == "faiss-cpu"
    assert "exceeds FAISS's GPU limit" in caplog.text
    monkeypatch.setattr(knn_mod, "faiss_gpu_problem", lambda: "faiss-gpu failed beside torch (ImportError: x)")
    assert select_backend(10) == "torch-gpu"
    assert "using exact torch k-NN on the GPU" in caplog.text
    assert select_backend(10, "faiss-cpu") == "faiss-cpu"


def test_faiss_gpu_problem_explains_itself_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")  # the GPU path is checked on the device machine
    knn_mod.faiss_gpu_problem.cache_clear()
    assert knn_mod.faiss_gpu_problem() == "no CUDA device"
