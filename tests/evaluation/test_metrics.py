import numpy as np
import pytest
import torch

from pipeline.evaluation.metrics import (
    nmi,
    ranks_from_neighbours,
    relevant_counts,
    retrieval_metrics,
    select_engine,
    spherical_kmeans,
)
from pipeline.evaluation.ranks import metrics_from_ranks, relevant_ranks

ENGINES = ["ranks", "knn"]


def random_embeddings(n=120, d=8, classes=12, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centers = rng.normal(size=(classes, d))
    emb = centers[labels] + rng.normal(scale=0.8, size=(n, d))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb.astype(np.float32), labels


def brute_force(query, q_labels, ref=None, r_labels=None, ks=(1, 2, 4, 8)):
    """Plain numpy: full similarity matrix, stable sort by (-score, index)."""
    self_search = ref is None
    ref, r_labels = (query, q_labels) if self_search else (ref, r_labels)
    sims = query.astype(np.float64) @ ref.astype(np.float64).T
    out = {f"recall_at_{k}": [] for k in ks}
    aps, rps, p1s = [], [], []
    for i in range(len(query)):
        order = sorted(range(len(ref)), key=lambda j: (-sims[i, j], j))
        if self_search:
            order = [j for j in order if j != i]
        rel = [r_labels[j] == q_labels[i] for j in order]
        for k in ks:
            out[f"recall_at_{k}"].append(any(rel[:k]))
        r = sum(rel)
        if r:
            precisions = [sum(rel[: j + 1]) / (j + 1) for j in range(r)]
            aps.append(sum(p for p, hit in zip(precisions, rel[:r]) if hit) / r)
            rps.append(sum(rel[:r]) / r)
            p1s.append(rel[0])
    res = {k: float(np.mean(v)) for k, v in out.items()}
    res.update(map_at_r=float(np.mean(aps)), r_precision=float(np.mean(rps)), precision_at_1=float(np.mean(p1s)))
    return res


@pytest.mark.parametrize("engine", ENGINES)
def test_standard_protocol_matches_brute_force(engine):
    emb, labels = random_embeddings()
    ks = (1, 2, 4, 8, 50, 119)  # 119: every other item
    ours = retrieval_metrics(emb, labels, recall_at=ks, engine=engine)
    expected = brute_force(emb, labels, ks=ks)
    assert {k: ours[k] for k in expected} == pytest.approx(expected)


@pytest.mark.parametrize("engine", ENGINES)
def test_gallery_protocol_matches_brute_force(engine):
    q, ql = random_embeddings(60, seed=1)
    g, gl = random_embeddings(90, seed=2)
    ours = retrieval_metrics(q, ql, gallery=g, gallery_labels=gl, recall_at=(1, 2, 4, 8, 40), engine=engine)
    expected = brute_force(q, ql, g, gl, ks=(1, 2, 4, 8, 40))
    assert {k: ours[k] for k in expected} == pytest.approx(expected)


@pytest.mark.parametrize("gallery", [False, True])
def test_rank_engine_over_many_blocks_equals_knn_engine(gallery):
    """Blocks of 64 rows: diagonal and off-diagonal blocks, both sides of the symmetric scan, ragged edges;
    duplicated rows make exact ties; unnormalised rows widen the error bound."""
    emb, labels = random_embeddings(n=700, d=16, classes=90, seed=5)
    emb[::7] = emb[1::7][: len(emb[::7])]  # exact duplicates, some across classes
    emb[::11] *= 3.0
    kwargs = {}
    if gallery:
        g, gl = random_embeddings(n=500, d=16, classes=90, seed=6)
        kwargs = {"gallery": g, "gallery_labels": gl}
    ks = (1, 5, 10, 100, 300)
    ranks, r = relevant_ranks(emb, labels, kwargs.get("gallery"), kwargs.get("gallery_labels"), block=64)
    ours = metrics_from_ranks(ranks, r, ks)
    theirs = retrieval_metrics(emb, labels, recall_at=ks, engine="knn", **kwargs)
    assert ours == {k: theirs[k] for k in ours}
    assert (np.diff(ranks, axis=1)[np.arange(ranks.shape[1] - 1)[None, :] < r[:, None] - 1] > 0).all()


def test_scores_closer_than_float32_are_ranked_in_exact_arithmetic():
    # The negative n differs from the relevant p by far less than float32 GEMM can resolve in q.n vs q.p;
    # exact arithmetic puts n ahead (q.n > q.p by 2^-30-ish), and the brute force (float64) agrees.
    rng = np.random.default_rng(0)
    q = rng.normal(size=64).astype(np.float32)
    p = rng.normal(size=64).astype(np.float32)
    n = p.copy()
    i = int(np.argmax(q))
    n[i] = np.nextafter(p[i], np.float32(np.inf))  # q[i] > 0: q.n > q.p, by one ulp of p[i] times q[i]
    emb = np.stack([q, p, n, -q]).astype(np.float32)
    labels = np.array([0, 0, 1, 2])
    ours = retrieval_metrics(emb, labels, recall_at=(1, 2), engine="ranks")
    assert ours["recall_at_1"] == brute_force(emb, labels, ks=(1, 2))["recall_at_1"]
    ranks, r = relevant_ranks(emb, labels)
    assert ranks[0, 0] == 2  # n first, then p


def test_engine_selection():
    assert select_engine("ranks") == "ranks" and select_engine("knn") == "knn"
    assert select_engine() == "ranks"  # exact on every device: numba on the CPU, torch on a GPU
    with pytest.raises(ValueError, match="metrics engine 'faiss'"):
        select_engine("faiss")


def test_map_at_r_by_hand():
    # Query 0 (class a, R=2): neighbours a, b, a -> AP@R = (1/1 + 0) / 2 = 0.5; R-precision = 1/2.
    # Query 1 (class a, R=2): neighbours b, a, a -> (0 + 1/2) / 2 = 0.25; R-precision = 1/2.
    # Query 2 (class a, R=2): neighbours a, a, b -> (1 + 1) / 2 = 1.0; R-precision = 1.
    # Query 3 (class b, R=0): no relevant item, left out.
    labels = np.array([0, 0, 0, 1])
    neighbors = np.array([[1, 3, 2], [3, 0, 2], [0, 1, 3], [0, 1, 2]])
    r = relevant_counts(labels, labels, self_search=True)
    out = metrics_from_ranks(ranks_from_neighbours(neighbors, labels, labels, r), r, (1, 2))
    assert out["map_at_r"] == pytest.approx((0.5 + 0.25 + 1.0) / 3)
    assert out["r_precision"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert out["precision_at_1"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("engine", ENGINES)
def test_tied_embeddings_give_deterministic_metrics(engine):
    emb = np.repeat(np.eye(4, dtype=np.float32), 3, axis=0)  # 4 classes x 3 identical points
    labels = np.repeat(np.arange(4), 3)
    labels_shuffled = labels.copy()
    labels_shuffled[[0, 3]] = labels_shuffled[[3, 0]]  # one swap: that point sits among another class's copies
    first = retrieval_metrics(emb, labels_shuffled, engine=engine)
    assert first == retrieval_metrics(emb, labels_shuffled, engine=engine)
    assert retrieval_metrics(emb, labels, engine=engine)["map_at_r"] == 1.0
    expected = brute_force(emb, labels_shuffled)
    assert {k: first[k] for k in expected} == pytest.approx(expected)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("gallery", [False, True])
def test_agrees_with_pytorch_metric_learning(gallery, engine):
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    emb, labels = random_embeddings(n=300, classes=20, seed=1)
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
                              k="max_bin_count")
    if gallery:
        g, gl = random_embeddings(n=200, classes=20, seed=4)
        ours = retrieval_metrics(emb, labels, recall_at=[1], gallery=g, gallery_labels=gl, engine=engine)
        theirs = calc.get_accuracy(torch.from_numpy(emb), torch.from_numpy(labels), torch.from_numpy(g),
                                   torch.from_numpy(gl), ref_includes_query=False)
    else:
        ours = retrieval_metrics(emb, labels, recall_at=[1], engine=engine)
        theirs = calc.get_accuracy(torch.from_numpy(emb), torch.from_numpy(labels))
    assert ours["precision_at_1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)
    assert ours["map_at_r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-6)


def test_nmi_is_high_for_separated_clusters_and_low_for_noise():
    _, labels = random_embeddings(n=200, classes=5, seed=2)
    sep = np.eye(8, dtype=np.float32)[labels] + 0.01 * np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
    scores = [nmi(sep, labels, seed=s) for s in range(4)]
    assert min(scores) > 0.8 and max(scores) == pytest.approx(1.0)  # k-means may merge two clusters from a bad start
    noise = np.random.default_rng(3).normal(size=(200, 8)).astype(np.float32)
    assert nmi(noise, labels) < 0.2


def test_spherical_kmeans_refills_emptied_clusters_and_matches_faiss_quality():
    import faiss
    from sklearn.metrics import normalized_mutual_info_score

    # 3 distinct points, 6 clusters: duplicate centroids leave clusters empty and are refilled; clusters stay pure
    x = np.repeat(np.eye(3, dtype=np.float32), 10, axis=0)
    assign = spherical_kmeans(x, 6, niter=5, seed=0)
    assert assign.min() >= 0 and assign.max() < 6
    assert all(len({int(np.argmax(x[i])) for i in np.flatnonzero(assign == c)}) == 1 for c in set(assign.tolist()))
    # on clustered data it is as good as faiss.Kmeans (spherical, same k and iterations)
    emb, labels = random_embeddings(n=2000, d=32, classes=100, seed=3)
    ours = np.mean([normalized_mutual_info_score(labels, spherical_kmeans(emb, 100, seed=s)) for s in range(3)])
    theirs = []
    for s in range(3):
        km = faiss.Kmeans(32, 100, niter=20, seed=s, spherical=True, min_points_per_centroid=1)
        km.train(emb)
        theirs.append(normalized_mutual_info_score(labels, km.index.search(emb, 1)[1][:, 0]))
    assert ours == pytest.approx(np.mean(theirs), abs=0.02)


def test_the_rank_pass_finds_the_same_first_kmeans_assignment_as_a_search():
    import faiss

    from pipeline.evaluation.metrics import kmeans_seeds

    emb, labels = random_embeddings(n=700, d=16, classes=90, seed=7)
    seeds = kmeans_seeds(len(emb), 90, seed=3)
    _, _, nearest = relevant_ranks(emb, labels, block=64, seeds=seeds)
    index = faiss.IndexFlatIP(16)
    index.add(emb[seeds])
    scores, found = index.search(emb, 2)
    clear = scores[:, 0] - scores[:, 1] > 1e-5  # no near-tie that float32 rounding could flip
    assert clear.mean() > 0.9
    assert np.array_equal(nearest[clear], found[clear, 0])
    assert np.array_equal(nearest[seeds], np.arange(len(seeds)))
    engine = retrieval_metrics(emb, labels, seed=3, engine="ranks")["nmi"]
    assert engine == nmi(emb, labels, seed=3)  # same k-means whether the pass or a search gives its start


@pytest.mark.parametrize("gallery", [False, True])
def test_ranks_beyond_their_cap_are_dropped_without_changing_a_metric(gallery):
    emb, labels = random_embeddings(n=900, d=16, classes=60, seed=8)
    g, gl = random_embeddings(n=600, d=16, classes=60, seed=9) if gallery else (None, None)
    exact, r = relevant_ranks(emb, labels, g, gl, block=64)
    capped, _ = relevant_ranks(emb, labels, g, gl, block=64, max_rank=20)
    cap = np.where(np.arange(exact.shape[1])[None, :] == 0, np.maximum(r, 20)[:, None], r[:, None])
    keep = cap >= exact
    assert np.array_equal(capped[keep], exact[keep]) and (capped[~keep] > cap[~keep]).all()
    assert (~keep).sum() > 100  # the cap did drop items
    ks = (1, 5, 20)
    assert metrics_from_ranks(capped, r, ks) == metrics_from_ranks(exact, r, ks)


def _tie_cases():
    """Embeddings whose scores tie exactly (duplicates, also across classes) or nearly (unnormalised copies)."""
    emb, labels = random_embeddings(n=700, d=16, classes=90, seed=5)
    emb[::7] = emb[1::7][: len(emb[::7])]
    emb[::11] *= 3.0
    g, gl = random_embeddings(n=500, d=16, classes=90, seed=6)
    g[::5] = emb[: len(g[::5])]  # gallery items identical to queries
    eye = np.repeat(np.eye(4, dtype=np.float32), 3, axis=0)
    eye_labels = np.repeat(np.arange(4), 3)
    eye_labels[[0, 3]] = eye_labels[[3, 0]]
    return [(emb, labels, None, None), (emb, labels, g, gl), (eye, eye_labels, None, None)]


@pytest.mark.parametrize("candidates_first", [True, False])
@pytest.mark.parametrize("case", range(3))
def test_torch_rank_engine_equals_the_cpu_engine_on_ties(case, candidates_first):
    """The GPU engine's code, run on the CPU here (and on CUDA by the gpu tests): the same ranks, bit for bit, with
    the candidate filter and without it (every score against every slot: the engine before the filter)."""
    from pipeline.evaluation.ranks_torch import relevant_ranks_torch

    emb, labels, g, gl = _tie_cases()[case]
    cpu, r = relevant_ranks(emb, labels, g, gl, block=64)
    torch_ranks, r_torch = relevant_ranks_torch(emb, labels, g, gl, device="cpu", block_rows=64, block_cols=96,
                                                candidates_first=candidates_first)
    valid = np.arange(cpu.shape[1])[None, :] < r[:, None]
    assert np.array_equal(r, r_torch) and np.array_equal(cpu[valid], torch_ranks[valid])
    ks = (1, 2, 5, 50)
    assert metrics_from_ranks(cpu, r, ks) == metrics_from_ranks(torch_ranks, r_torch, ks)


def test_torch_rank_engine_resolves_a_pair_float32_cannot_separate():
    from pipeline.evaluation.ranks_torch import relevant_ranks_torch

    rng = np.random.default_rng(0)
    q, p = rng.normal(size=64).astype(np.float32), rng.normal(size=64).astype(np.float32)
    n = p.copy()
    i = int(np.argmax(q))
    n[i] = np.nextafter(p[i], np.float32(np.inf))
    emb = np.stack([q, p, n, -q]).astype(np.float32)
    ranks, _ = relevant_ranks_torch(emb, np.array([0, 0, 1, 2]), device="cpu")
    assert ranks[0, 0] == 2


class _RecordsItsInputDevice(torch.nn.Module):
    """A stand-in model whose parameters live on the 'meta' device: it records where its inputs are."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(2, device="meta"))
        self.seen: set[str] = set()

    def forward(self, x: torch.Tensor):
        self.seen.add(str(x.device))
        return torch.nn.functional.normalize(torch.ones(len(x), 4), dim=1), None


def test_evaluation_embeds_on_the_models_own_device(tiny_shards):
    from pipeline.config import EvalConfig
    from pipeline.data.shards import load_manifest
    from pipeline.evaluation.embed import embed_split

    model = _RecordsItsInputDevice()
    emb, labels, _ = embed_split(model, load_manifest(tiny_shards).split("test"),
                                 EvalConfig(batch_size=16), 32, progress=False)
    assert model.seen == {"meta"} and emb.shape == (len(labels), 4)
