"""What the training path costs on top of the model: gdml's Ray Train worker vs a plain PyTorch loop.

Same model (embedder + attention + adversary + multi-similarity loss), same batches from the same stream,
same thread count (1), measured in one run:
- per-step time of gdml's training function under Ray Train with 1 worker, over a plain PyTorch loop
  (goal: at most 1.05x), timed over the last epoch (after warm-up);
- throughput of 2 DDP workers (1 CPU each) against 1 worker.

With ``--system-metrics``: instead, the cost of MLflow's system metrics: the same 1-worker run logged to an MLflow
store, with system metrics sampled every second (ten times the default rate) against none (goal: at most 1.02x).

    .venv/bin/python benchmarks/bench_train_overhead.py [--quick | --smoke] [--system-metrics]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from pipeline import config as config_mod
from pipeline.config import Config
from pipeline.data import shards
from pipeline.data.stream import BalancedStream, train_loader
from pipeline.data.transforms import normalize, train_augment
from pipeline.launch import fit
from pipeline.model.embedder import Embedder
from pipeline.preflight import resolve_paths
from pipeline.tracking import Tracker

SMOKE_MODEL = ["model.backbone=timm/test_resnet", "model.pretrained=null", "model.attention.taps=[layer2,layer3]",
               "model.embedding_size=16", "model.attention.width=16", "model.adversary.hidden=32",
               "sampler.classes_per_batch=4", "sampler.images_per_class=3", "sampler.batch_size=12",
               "eval.gap_images=0"]


def plain_loop(cfg: Config, manifest: dict, epochs: int) -> float:
    """Seconds per step of the last epoch of a textbook PyTorch loop on the same model and data."""
    from pytorch_metric_learning import losses

    torch.set_num_threads(1)
    torch.manual_seed(cfg.train.seed)
    n_classes = len(manifest.class_ids("train"))
    model = Embedder(cfg.model, n_classes, cfg.data.image_size).train()
    loss_fn = losses.MultiSimilarityLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    stream = BalancedStream(manifest, cfg.sampler, train_augment(cfg.augment, cfg.data.image_size),
                            seed=cfg.train.seed)
    per_step = 0.0
    for epoch in range(epochs):
        stream.set_epoch(epoch)
        started, n = time.perf_counter(), 0
        for images, labels in train_loader(stream):
            emb, adversarial = model(normalize(images), 0.1)
            loss = loss_fn(emb, labels) + torch.nn.functional.cross_entropy(adversarial.logits, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += 1
            if n == cfg.train.max_steps_per_epoch:
                break
        per_step = (time.perf_counter() - started) / n
    return per_step


def gdml_run(cfg: Config, workers: int, name: str, tracker: Tracker | None = None) -> tuple[float, int]:
    """(seconds per step of the last epoch, steps) of gdml's worker function under Ray Train."""
    run_cfg = config_mod.with_values(cfg, {"train.workers": workers})
    _, history = fit(run_cfg, tracker or Tracker(None, None), name, local=False, progress=False)
    last = history[-1]
    return last["epoch_seconds"] / last["steps"], int(last["steps"])


def system_metrics_cost(cfg: Config, tmp: Path) -> tuple[float, float]:
    """(seconds per step without system metrics, with them every second) of a tracked 1-worker run."""
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    per_step = {}
    for system in (False, True):
        run_cfg = config_mod.with_values(cfg, {"tracking.system_metrics": system,
                                               "tracking.system_metrics_interval": 1.0})
        name = f"bench-system-{system}"
        with Tracker.start(uri, "bench", name) as tracker:
            per_step[system] = gdml_run(run_cfg, 1, name, tracker)[0]
    return per_step[False], per_step[True]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small images and few steps (under two minutes)")
    parser.add_argument("--smoke", action="store_true", help="the same code path on a tiny model and data (the "
                        "test suite runs it: it checks that the benchmark runs, not the speed)")
    parser.add_argument("--system-metrics", action="store_true", help="measure the cost of MLflow's system metrics")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gdml-bench-"))
    size, classes, steps, epochs = (32, 256, 12, 2) if args.quick else (64, None, 22, 3)
    if args.smoke:
        size, classes, steps, epochs = 32, 48, 2, 2
    overrides = [f"data.image_size={size}", f"data.root={tmp / 'data'}", f"train.storage_path={tmp / 'ray'}",
                 f"train.max_steps_per_epoch={steps}", f"train.epochs={epochs}", "train.cpus_per_worker=1",
                 "model.adversary.schedule=constant"]
    if classes:
        overrides.append(f"data.max_classes={classes}")
    else:
        overrides.append("data.root=data/emoji-64")
    if args.smoke:
        overrides += SMOKE_MODEL
    cfg = resolve_paths(config_mod.load(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml", overrides))
    manifest = shards.ensure(cfg.data)

    if args.system_metrics:
        try:
            off, on = system_metrics_cost(cfg, tmp)
        finally:
            import ray

            ray.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"model {cfg.model.backbone} {size}px, 1 Ray Train worker, tracked in MLflow, last of {epochs} epochs")
        print(f"no system metrics           {off * 1000:8.1f} ms/step")
        print(f"system metrics every second {on * 1000:8.1f} ms/step")
        print(f"RESULT system_metrics_overhead={on / off:.3f} goal=<=1.02")
        return
    try:
        one, n_one = gdml_run(cfg, 1, "bench-1w")
        plain = plain_loop(cfg, manifest, epochs)
        # (smoke: the 1-worker run stands in for the 2-worker one, which the suite's demo test covers)
        two, n_two = (one, n_one) if args.smoke else gdml_run(cfg, 2, "bench-2w")
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    batch = cfg.sampler.batch_size
    print(f"model {cfg.model.backbone} {size}px, batch {batch}, 1 thread per process, last of {epochs} epochs")
    print(f"plain PyTorch loop       {plain * 1000:8.1f} ms/step")
    print(f"gdml, Ray Train 1 worker {one * 1000:8.1f} ms/step   ({n_one} steps)")
    print(f"gdml, Ray Train 2 workers{two * 1000:8.1f} ms/step   ({n_two} steps per rank)")
    print(f"2-worker DDP throughput vs 1 worker: {(2 * batch / two) / (batch / one):.2f}x "
          f"({2 * batch / two:.0f} vs {batch / one:.0f} images/s)")
    print(f"RESULT train_overhead_vs_plain={one / plain:.3f} goal=<=1.05")


if __name__ == "__main__":
    main()
