"""The full zero-shot metric set on SOP-sized random embeddings: gdml vs pytorch-metric-learning.

Both sides get the same embeddings (60,000 x 512, L2-normalised, ~12,000 classes of 2-8 images, as in
Stanford Online Products' test split) and compute Recall@1 / Precision@1, MAP@R, R-Precision and NMI. Each
side runs in its own process, so peak memory (max RSS) is its own; imports, data generation and (gdml) the
numba kernels' first call on 200 rows stay outside the timed region. Prints the time ratio gdml / PML (goal:
at most 0.5) and checks that the deterministic metrics are identical. gdml runs its default engine here
(``ranks`` on a CPU machine); ``--engine knn`` times the FAISS k-NN engine instead.

With ``--rank-engine``: instead, the torch rank engine (the GPU's, run on the CPU here) with its candidate filter
and symmetric blocks against the same code comparing every score with every relevant item's thresholds over the
whole matrix (the engine before both), on 100,000 x 128 embeddings of the same kind (``--quick``: 30,000 x 128);
the ranks must be identical.

    .venv/bin/python benchmarks/bench_metrics.py [--quick | --smoke] [--rank-engine]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np


def make_data(n: int, dim: int, seed: int = 0, noise: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = []
    while sum(sizes) < n:
        sizes.append(int(rng.integers(2, 9)))
    sizes[-1] = n - sum(sizes[:-1])  # 1 to 8: the last class takes what is left
    if sizes[-1] < 2:
        last = sizes.pop()  # (not `sizes[-2] += sizes.pop()`: its index is taken before the pop)
        sizes[-1] += last
    labels = np.repeat(np.arange(len(sizes)), sizes)
    centers = rng.normal(size=(len(sizes), dim)).astype(np.float32)
    emb = centers[labels] + rng.normal(scale=noise, size=(n, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb, labels


def run_side(side: str, n: int, dim: int, engine: str = "auto") -> dict:
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    from pipeline.evaluation.metrics import retrieval_metrics

    emb, labels = make_data(n, dim)
    if side != "pml":
        retrieval_metrics(emb[:200], labels[:200], engine=engine)  # JIT warm-up (cached on disk after one run)
    started = time.perf_counter()
    if side in ("gdml", "gdml-same"):
        # gdml: the full SOP set (Recall@1/10/100/1000); gdml-same: PML's set (Recall@1 only).
        m = retrieval_metrics(emb, labels, recall_at=(1, 10, 100, 1000) if side == "gdml" else (1,), engine=engine)
        out = {k: m[k] for k in ("precision_at_1", "map_at_r", "r_precision", "nmi")}
    else:
        calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r", "r_precision", "NMI"),
                                  k="max_bin_count")
        m = calc.get_accuracy(torch.from_numpy(emb), torch.from_numpy(labels))
        out = {"precision_at_1": m["precision_at_1"], "map_at_r": m["mean_average_precision_at_r"],
               "r_precision": m["r_precision"], "nmi": m["NMI"]}
    out["seconds"] = time.perf_counter() - started
    out["classes"] = int(labels.max() + 1)
    out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def measure(side: str, n: int, dim: int, engine: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--side", side, "--n", str(n), "--dim", str(dim),
                           "--engine", engine],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rank_engine(n: int, dim: int) -> None:
    """The torch rank engine with and without its candidate filter, on the CPU, on two kinds of embeddings: noisy
    ones as in the main benchmark (a class's images far apart: relevant items rank anywhere) and separated ones
    (noise 1: relevant items rank near the top, as with a trained model)."""
    from pipeline.evaluation.ranks_torch import relevant_ranks_torch

    speedups = {}
    for kind, noise in (("noisy (noise 3)", 3.0), ("separated (noise 1)", 1.0)):
        emb, labels = make_data(n, dim, noise=noise)
        relevant_ranks_torch(emb[:500], labels[:500], device="cpu")  # warm-up
        seconds, ranks = {}, {}
        for candidates_first in (False, True):
            started = time.perf_counter()
            ranks[candidates_first] = relevant_ranks_torch(emb, labels, device="cpu",
                                                           candidates_first=candidates_first)
            seconds[candidates_first] = time.perf_counter() - started
        if not all(np.array_equal(a, b) for a, b in zip(ranks[False], ranks[True])):
            raise SystemExit(f"{kind}: the two scans disagree")
        speedups[kind] = seconds[False] / seconds[True]
        print(f"{n} x {dim}, {int(labels.max() + 1)} classes, {kind}: every score against every slot "
              f"{seconds[False]:.1f} s, candidates first {seconds[True]:.1f} s (x{speedups[kind]:.2f}); "
              "identical ranks")
    print(f"RESULT rank_engine_speedup_separated={speedups['separated (noise 1)']:.2f} goal=>=2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="15,000 x 512 instead of 60,000 x 512")
    parser.add_argument("--smoke", action="store_true", help="2,000 x 64 (the test suite runs it: it checks that the "
                        "benchmark runs, not the speed)")
    parser.add_argument("--side", choices=("gdml", "gdml-same", "pml"))
    parser.add_argument("--n", type=int)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--engine", choices=("auto", "ranks", "knn"), default="auto", help="gdml's metrics engine")
    parser.add_argument("--rank-engine", action="store_true", help="time the torch rank engine's candidate filter")
    args = parser.parse_args()
    if args.rank_engine:
        rank_engine(2000 if args.smoke else 30000 if args.quick else 100000, 16 if args.smoke else 128)
        return
    if args.side:
        print(json.dumps(run_side(args.side, args.n, args.dim, args.engine)))
        return
    n = 15000 if args.quick else 60000
    if args.smoke:
        n, args.dim = 2000, 64
    pml = measure("pml", n, args.dim, args.engine)
    same_set = measure("gdml-same", n, args.dim, args.engine)
    gdml = measure("gdml", n, args.dim, args.engine)
    from pipeline.evaluation.metrics import select_engine

    print(f"{n} x {args.dim} embeddings, {gdml['classes']} classes (each side in its own process); "
          f"gdml engine: {select_engine(args.engine)}")
    print(f"{'':<16}{'gdml full set':>15}{'gdml PML set':>15}{'PML':>12}")
    for key in ("precision_at_1", "map_at_r", "r_precision", "nmi"):
        print(f"{key:<16}{gdml[key]:>15.6f}{same_set[key]:>15.6f}{pml[key]:>12.6f}")
    print(f"{'seconds':<16}{gdml['seconds']:>15.1f}{same_set['seconds']:>15.1f}{pml['seconds']:>12.1f}")
    print(f"{'peak MiB (RSS)':<16}{gdml['peak_mib']:>15.0f}{same_set['peak_mib']:>15.0f}{pml['peak_mib']:>12.0f}")
    same = all(abs(gdml[k] - pml[k]) < 1e-6 for k in ("precision_at_1", "map_at_r", "r_precision"))
    print(f"deterministic metrics identical: {same}; NMI differs only by k-means (spherical here, plain in PML)")
    print("full set = Recall@1/10/100/1000 + P@1 + MAP@R + R-Precision + NMI; PML set = P@1 + MAP@R + RP + NMI")
    print(f"same metric set: gdml / PML time = {same_set['seconds'] / pml['seconds']:.2f}")
    ratio = gdml["seconds"] / pml["seconds"]
    print(f"RESULT metrics_time_vs_pml={ratio:.2f} goal=<=0.5")


if __name__ == "__main__":
    main()
