"""The data path at the shape of real data: gdml's stream vs the usual DML loading recipe, and SOP scale.

1. **CUB-shaped** (generated here: 200 classes x 59 photo-like JPEGs of 500 x 375, ~45 KB each; ``--quick``:
   24 classes): builds shards with ``gdml shards build`` (images/s), then measures training batches per second
   at 224 px, P x m = 16 x 4, the same augmentation (RandomResizedCrop(224) with torchvision's default scale
   (0.08, 1), horizontal flip, ImageNet normalisation) and the same number of loader worker processes for:

   - gdml's stream (shards; decodes only the images a batch draws, uint8 augmentation, the batch normalised
     in the consuming process, as the training worker does on its device);
   - torchvision ``ImageFolder`` + ``DataLoader`` + pytorch-metric-learning's ``MPerClassSampler`` with the usual
     per-image ``transforms`` (v1) pipeline: the recipe of DML codebases.

   Each side runs in its own process; peak RSS of the process and of its loader workers is reported.
2. **SOP-scale** (generated: 120,053 small JPEGs in 22,634 classes, the SOP layout read by the ``sop`` reader;
   ``--quick``: a tenth): shard build time, manifest size, epoch planning time and memory per rank (16 ranks x
   4 loader workers), first-batch latency; and planning at a quarter of the size, to show it scales linearly.

    .venv/bin/python benchmarks/bench_stream.py [--quick | --smoke] [--workers 2] [--skip-sop]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

P, M, SIZE = 16, 4, 224


def peak_rss_mib() -> tuple[float, float]:
    """(this process, its largest child) peak resident memory in MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


def side_gdml(root: str, workers: int, batches: int) -> dict:
    import torch

    from pipeline import config as config_mod
    from pipeline.data import shards
    from pipeline.data.stream import BalancedStream, train_loader
    from pipeline.data.transforms import normalize, train_augment, train_min_area

    torch.set_num_threads(1)
    cfg = config_mod.load(None, [f"sampler.classes_per_batch={P}", f"sampler.images_per_class={M}",
                                 f"sampler.batch_size={P * M}", "sampler.epoch=images",
                                 f"sampler.loader_workers={workers}", "augment.crop_scale=[0.08,1.0]",
                                 "augment.color_jitter=0.0"])
    manifest = shards.load_manifest(root)
    stream = BalancedStream(manifest, cfg.sampler, train_augment(cfg.augment, SIZE), loader_workers=workers,
                            min_area=train_min_area(cfg.augment, SIZE))
    loader = train_loader(stream)
    return _consume(lambda epoch: (stream.set_epoch(epoch), loader)[1], normalize, batches)


def side_imagefolder(folder: str, workers: int, batches: int) -> dict:
    import torch
    from pytorch_metric_learning.samplers import MPerClassSampler
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision import transforms as T

    torch.set_num_threads(1)
    transform = T.Compose([T.RandomResizedCrop(SIZE), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    data = datasets.ImageFolder(folder, transform=transform)
    sampler = MPerClassSampler(data.targets, m=M, batch_size=P * M, length_before_new_iter=len(data))
    loader = DataLoader(data, batch_size=P * M, sampler=sampler, num_workers=workers,
                        persistent_workers=workers > 0, drop_last=True)
    return _consume(lambda epoch: loader, lambda images: images, batches)


def _consume(epoch_loader, finish, batches: int, warmup: int = 3) -> dict:
    """Batches per second over ``batches`` batches after ``warmup`` (epochs repeat as needed)."""
    done, started, epoch = 0, None, 0
    while done < warmup + batches:
        for images, labels in epoch_loader(epoch):
            images = finish(images)
            assert images.shape == (P * M, 3, SIZE, SIZE) and images.dtype.is_floating_point, images.shape
            done += 1
            if done == warmup:
                started = time.perf_counter()
            if done == warmup + batches:
                break
        epoch += 1
    seconds = time.perf_counter() - started
    own, child = peak_rss_mib()
    return {"images_per_second": batches * P * M / seconds, "rss_mib": own, "worker_rss_mib": child}


def measure(side: str, path: str, workers: int, batches: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--side", side, "--path", path, "--workers", str(workers),
                           "--batches", str(batches)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def build_shards(source: str, path: Path, out: Path, *extra: str) -> float:
    """``gdml shards build`` through the CLI; its seconds."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline.cli", "shards", "build", "--source", source, "--path", str(path),
                    "--out", str(out), "--workers", "2", *extra], check=True, capture_output=True, text=True,
                   cwd=ROOT)
    return time.perf_counter() - started


def cub_shaped(tmp: Path, quick: bool, workers: int, smoke: bool = False) -> float:
    from synthetic import photo_folder

    classes, per_class = (24, 59) if quick else (200, 59)
    if smoke:
        classes, per_class = P, 6
    started = time.perf_counter()
    photo_folder(tmp / "cub", classes, per_class)
    files = list((tmp / "cub").rglob("*.jpg"))
    kb = sum(f.stat().st_size for f in files) / len(files) / 1024
    print(f"generated {len(files)} JPEGs of 500x375 in {classes} classes (mean {kb:.0f} KB) in "
          f"{time.perf_counter() - started:.0f} s")
    seconds = build_shards("folder", tmp / "cub", tmp / "cub-shards", "--set", f"data.train_classes={classes}")
    print(f"gdml shards build: {len(files) / seconds:.0f} images/s ({seconds:.1f} s, 2 processes, bytes copied)")
    batches, rounds = (25, 2) if quick else (80, 3)
    if smoke:
        batches, rounds = 2, 1
    runs: dict[str, list[dict]] = {"gdml": [], "imagefolder": []}
    for _ in range(rounds):  # interleaved, so that both sides see the same machine
        runs["gdml"].append(measure("gdml", str(tmp / "cub-shards"), workers, batches))
        runs["imagefolder"].append(measure("imagefolder", str(tmp / "cub"), workers, batches))
    print(f"training batches at {SIZE} px, P x m = {P} x {M}, {workers} loader workers, {batches} batches a round, "
          f"{rounds} rounds each (median):")
    print(f"{'':<38}{'images/s':>10}{'rounds':>18}{'peak RSS MiB':>14}{'workers MiB':>13}")
    median = {}
    for side, name in (("gdml", "gdml stream (shards)"), ("imagefolder", "ImageFolder + MPerClassSampler (v1)")):
        speeds = sorted(r["images_per_second"] for r in runs[side])
        median[side] = speeds[len(speeds) // 2] if len(speeds) % 2 else sum(speeds[len(speeds) // 2 - 1:][:2]) / 2
        rss = max(r["rss_mib"] for r in runs[side])
        workers_rss = max(r["worker_rss_mib"] for r in runs[side])
        listed = ", ".join(f"{s:.0f}" for s in speeds)
        print(f"{name:<38}{median[side]:>10.1f}{listed:>18}{rss:>14.0f}{workers_rss:>13.0f}")
    held = buffer_peak(str(tmp / "cub-shards"))
    print(f"gdml stream memory: the shuffle buffer (256 units of {M} encoded images) peaked at {held / 2**20:.1f} MiB "
          "per loader worker")
    return median["gdml"] / median["imagefolder"]


def buffer_peak(root: str) -> int:
    """Peak encoded bytes in one stream's shuffle buffer over an epoch (in this process)."""
    from pipeline import config as config_mod
    from pipeline.data import shards
    from pipeline.data.stream import BalancedStream
    from pipeline.data.transforms import train_augment

    cfg = config_mod.load(None, [f"sampler.classes_per_batch={P}", f"sampler.images_per_class={M}",
                                 f"sampler.batch_size={P * M}", "sampler.epoch=images", "sampler.loader_workers=0"])
    stream = BalancedStream(shards.load_manifest(root), cfg.sampler, train_augment(cfg.augment, 32))
    for _ in stream:
        pass
    return stream.stats.peak_bytes


def sop_scale(tmp: Path, quick: bool, smoke: bool = False) -> None:
    import psutil
    from synthetic import sop_tree

    from pipeline import config as config_mod
    from pipeline.data import shards
    from pipeline.data.stream import BalancedStream, Slot, plan_epoch, train_loader
    from pipeline.data.transforms import train_augment

    images, classes, train_classes = (12_005, 2_263, 1_131) if quick else (120_053, 22_634, 11_318)
    if smoke:
        images, classes, train_classes = 1_200, 300, 150
    started = time.perf_counter()
    sop_tree(tmp / "sop", images, classes, train_classes)
    print(f"\nSOP-shaped: generated {images:,} JPEGs in {classes:,} classes in {time.perf_counter() - started:.0f} s")
    seconds = build_shards("sop", tmp / "sop", tmp / "sop-shards", "--shard-size", "1000")
    manifest_bytes = (tmp / "sop-shards" / "manifest.json").stat().st_size
    print(f"gdml shards build: {seconds:.1f} s ({images / seconds:.0f} images/s); manifest.json "
          f"{manifest_bytes / 2**20:.1f} MiB")
    cfg = config_mod.load(None, ["sampler.classes_per_batch=16", "sampler.images_per_class=4", "sampler.batch_size=64"])
    process = psutil.Process()
    rss_before = process.memory_info().rss
    started = time.perf_counter()
    manifest = shards.load_manifest(tmp / "sop-shards")
    load_seconds = time.perf_counter() - started
    train = manifest.shards("train")
    quarter = train[: max(1, len(train) // 4)]

    def best_of_three(shard_list: list[dict], mode: str) -> float:
        times = []
        for epoch in range(3):
            started = time.perf_counter()
            plan_epoch(shard_list, Slot(3, 16, 1, 4), 16, seed=0, epoch=epoch, epoch_mode=mode, m=4)
            times.append(time.perf_counter() - started)
        return min(times)

    for mode in ("classes", "images"):
        tracemalloc.start()
        plan = plan_epoch(train, Slot(3, 16, 1, 4), 16, seed=0, epoch=0, epoch_mode=mode, m=4)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        plan_seconds, quarter_seconds = best_of_three(train, mode), best_of_three(quarter, mode)
        print(f"epoch plan ({mode}), one of 16 ranks x 4 loader workers: {plan_seconds * 1000:.1f} ms, peak "
              f"{peak / 2**20:.1f} MiB, {plan.n_batches} batches per slot; a quarter of the shards: "
              f"{quarter_seconds * 1000:.1f} ms (linear: about a quarter)")
    started = time.perf_counter()
    stream = BalancedStream(manifest, cfg.sampler, train_augment(cfg.augment, 224),
                            rank=3, world_size=16)
    next(iter(train_loader(stream)))
    first = time.perf_counter() - started
    rss = (process.memory_info().rss - rss_before) / 2**20
    print(f"manifest load {load_seconds * 1000:.0f} ms; first batch of one rank (of 16) {first:.2f} s after the "
          f"stream is made; memory for manifest + plan + first batch: {rss:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller generated data (under two minutes)")
    parser.add_argument("--smoke", action="store_true", help="the smallest generated data (the test suite runs it: "
                        "it checks that the benchmark runs, not the speed)")
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes on both sides")
    parser.add_argument("--skip-sop", action="store_true", help="leave out the SOP-scale part")
    parser.add_argument("--side", choices=("gdml", "imagefolder"))
    parser.add_argument("--path")
    parser.add_argument("--batches", type=int, default=60)
    args = parser.parse_args()
    if args.side:
        run = side_gdml if args.side == "gdml" else side_imagefolder
        print(json.dumps(run(args.path, args.workers, args.batches)))
        return
    with tempfile.TemporaryDirectory(prefix="gdml-bench-stream-") as tmp:
        ratio = cub_shaped(Path(tmp), args.quick, args.workers, args.smoke)
        if not args.skip_sop:
            sop_scale(Path(tmp), args.quick, args.smoke)
    os.sync()
    print(f"RESULT stream_vs_imagefolder={ratio:.2f} goal=>=1.2")


if __name__ == "__main__":
    main()
