import numpy as np
import pytest
import torch

from pipeline.evaluate import knn, map_at_r, nmi, recall_at_k, retrieval_metrics


def _brute(emb, labels, ks):
    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    out = {}
    order = np.array([sorted(range(len(emb)), key=lambda j: (-sims[i, j], j)) for i in range(len(emb))])[:, :-1]
    for k in ks:
        out[f"recall_at_{k}"] = float(np.mean([(labels[order[i, :k]] == labels[i]).any() for i in range(len(emb))]))
    return order, out


def _random(n=120, d=8, classes=12, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centers = rng.normal(size=(classes, d))
    emb = centers[labels] + rng.normal(scale=0.8, size=(n, d))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb.astype(np.float32), labels


def test_knn_matches_brute_force_and_excludes_self():
    emb, labels = _random()
    order, expected = _brute(emb.astype(np.float64), labels, [1, 2, 4, 8])
    nn = knn(emb, 8)
    assert not (nn == np.arange(len(emb))[:, None]).any()
    assert recall_at_k(nn, labels, [1, 2, 4, 8]) == pytest.approx(expected)


def test_ties_are_broken_by_index():
    emb = np.array([[1, 0], [1, 0], [1, 0], [0, 1]], dtype=np.float32)
    assert knn(emb, 3).tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]


def test_map_at_r_by_hand():
    # Query 0 (class a, R=2): neighbours a, b, a -> AP@R = (1/1 + 0) / 2 = 0.5; R-precision = 1/2.
    # Query 1 (class a, R=2): neighbours b, a, a -> (0 + 1/2) / 2 = 0.25; R-precision = 1/2.
    # Query 2 (class a, R=2): neighbours a, a, b -> (1 + 1) / 2 = 1.0; R-precision = 1.
    # Query 3 (class b, R=0): no relevant item, left out.
    labels = np.array([0, 0, 0, 1])
    neighbors = np.array([[1, 3, 2], [3, 0, 2], [0, 1, 3], [0, 1, 2]])
    out = map_at_r(neighbors, labels)
    assert out["map_at_r"] == pytest.approx((0.5 + 0.25 + 1.0) / 3)
    assert out["r_precision"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)


def test_agrees_with_pytorch_metric_learning():
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    emb, labels = _random(n=300, classes=20, seed=1)
    ours = retrieval_metrics(emb, labels, recall_at=[1])
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
                              k="max_bin_count")
    theirs = calc.get_accuracy(torch.from_numpy(emb), torch.from_numpy(labels))
    assert ours["recall_at_1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)
    assert ours["map_at_r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-6)


def test_nmi_is_high_for_separated_clusters_and_low_for_noise():
    emb, labels = _random(n=200, classes=5, seed=2)
    sep = np.eye(8, dtype=np.float32)[labels] + 0.01 * np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
    assert nmi(sep, labels) > 0.95
    noise = np.random.default_rng(3).normal(size=(200, 8)).astype(np.float32)
    assert nmi(noise, labels) < 0.2
