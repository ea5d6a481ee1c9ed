"""Query latency and throughput of the packaged retrieval model, exact vs IVF index, 10,000-item gallery.

The served code path (deploy/retrieval_model.py: decode base64 -> preprocess -> embed -> FAISS search) runs
in-process on one thread, over a gallery of 10,000 embeddings of augmented emoji drawings. Queries are emoji
test images (64 px); the model is the demo architecture (ResNet-18 + attention, untrained: weights do not
change the timing).
Prints p50/p99 latency of single-image requests, throughput with batches of 32, and the recall@10 of IVF
against exact search, then the IVF/exact p50 ratio.

    .venv/bin/python benchmarks/bench_serve.py [--quick]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
from torchvision.transforms.functional import pil_to_tensor

from deploy.retrieval_model import RetrievalModel
from pipeline import config as config_mod
from pipeline.checkpoint import TrainState, save_checkpoint
from pipeline.data import shards
from pipeline.data.samples import SplitImages
from pipeline.data.transforms import normalize, train_augment
from pipeline.evaluation.index import serving_index
from pipeline.model.embedder import Embedder
from pipeline.objectives import MetricLoss, TrainModule
from pipeline.preflight import resolve_paths
from pipeline.train import build_optimizer

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer queries")
    parser.add_argument("--smoke", action="store_true", help="a tiny model, 48 classes, a 500-item gallery, 10 queries "
                        "(the test suite runs it: it checks that the benchmark runs, not the speed)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gdml-bench-serve-"))
    try:
        run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


SMOKE = {"data.max_classes": 48, "data.image_size": 32, "model.backbone": "timm/test_resnet", "model.pretrained": None,
         "model.attention.taps": ["layer2", "layer3"], "model.embedding_size": 16, "model.attention.width": 16}


def run(args: argparse.Namespace, tmp: Path) -> None:
    torch.set_num_threads(1)
    n_queries, n_batches, n_gallery = (60, 5, 10_000) if args.quick else (300, 20, 10_000)
    values = {}
    if args.smoke:
        n_queries, n_batches, n_gallery = 10, 2, 500
        values = {**SMOKE, "data.root": str(tmp / "data")}
    cfg = resolve_paths(config_mod.load(ROOT / "configs" / "demo.yaml", values=values))
    manifest = shards.ensure(cfg.data)
    model = Embedder(cfg.model, len(manifest.class_ids("train")), cfg.data.image_size)
    module = TrainModule(model, MetricLoss(cfg.loss, len(manifest.class_ids("train")), cfg.model.embedding_size))
    state = TrainState(module, build_optimizer(module, cfg), torch.amp.GradScaler("cpu", enabled=False))
    save_checkpoint(tmp / "ckpt", state, cfg, len(manifest.class_ids("train")), {})

    images = []
    for img, _, _, _ in SplitImages(manifest.split("test"), raw=True):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        images.append(base64.b64encode(buf.getvalue()).decode())
        if len(images) == n_queries:
            break
    # A realistic gallery: 10,000 embeddings of augmented emoji drawings (both splits), by the same model.
    torch.set_num_threads(2)
    augment = train_augment(cfg.augment, cfg.data.image_size)
    raw = [img for split in ("train", "test") for img, _, _, _ in SplitImages(manifest.split(split), raw=True)]
    torch.manual_seed(0)
    model.eval()
    chunks = []
    with torch.no_grad():
        for start in range(0, n_gallery, 250):
            batch = torch.stack([augment(pil_to_tensor(raw[(start + i) % len(raw)].convert("RGB")))
                                 for i in range(250)])
            chunks.append(model(normalize(batch))[0].numpy())
    gallery = np.concatenate(chunks).astype(np.float32)
    torch.set_num_threads(1)

    rows, results = [], {}
    for kind, threshold in (("exact", 10**9), ("ivf", 1)):
        index, built = serving_index(gallery, ivf_threshold=threshold, nprobe=16)
        import faiss

        faiss.write_index(index, str(tmp / f"{kind}.index"))
        (tmp / "gallery.json").write_text(json.dumps({"labels": ["x"] * len(gallery), "paths": ["x"] * len(gallery),
                                                       "nprobe": 16 if built == "ivf" else None}))
        served = RetrievalModel()
        served.load_context(SimpleNamespace(artifacts={"checkpoint": str(tmp / "ckpt"),
                                                       "index": str(tmp / f"{kind}.index"),
                                                       "gallery": str(tmp / "gallery.json")}))
        served.predict(None, pd.DataFrame({"image": images[:2]}), {"k": 10})  # warm-up
        latencies = []
        for text in images:
            started = time.perf_counter()
            served.predict(None, pd.DataFrame({"image": [text]}), {"k": 10})
            latencies.append(time.perf_counter() - started)
        started = time.perf_counter()
        for b in range(n_batches):
            batch = [images[(b * 32 + i) % len(images)] for i in range(32)]
            out = served.predict(None, pd.DataFrame({"image": batch}), {"k": 10})
        throughput = n_batches * 32 / (time.perf_counter() - started)
        results[kind] = [r["ids"] for r in served.predict(None, pd.DataFrame({"image": images}), {"k": 10})]
        rows.append((kind, np.percentile(latencies, 50) * 1000, np.percentile(latencies, 99) * 1000, throughput))
        assert "error" not in out[0]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(results["exact"], results["ivf"])])
    print(f"gallery {len(gallery):,} x {cfg.model.embedding_size}, {len(images)} single-image queries, k=10, 1 thread")
    print(f"{'index':<8}{'p50 ms':>10}{'p99 ms':>10}{'images/s (batch 32)':>22}")
    for kind, p50, p99, tput in rows:
        print(f"{kind:<8}{p50:>10.2f}{p99:>10.2f}{tput:>22.1f}")
    print(f"IVF (nlist {int(4 * 100)}, nprobe 16) recall@10 vs exact: {recall:.3f}")
    print(f"RESULT serve_ivf_vs_exact_p50={rows[1][1] / rows[0][1]:.2f} goal=<=1.0")


if __name__ == "__main__":
    main()
