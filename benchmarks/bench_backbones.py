"""Training speed of a Vision Transformer beside ResNet-50, through gdml's own training path.

ViT-S/16 (timm) and ResNet-50 (torchvision), both at 224 px with two taps (blocks.5 + blocks.9; layer2 + layer3),
attention, the class adversary and the multi-similarity loss, batch 16 (P x m = 8 x 2), random initialisation, on
batches held in memory (so that decoding plays no part): images/s of gdml's worker function in local mode (one
process) and with 2 Ray Train workers (1 CPU each), timed over the second epoch.

    .venv/bin/python benchmarks/bench_backbones.py [--quick | --smoke]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BACKBONES = {"timm/vit_small_patch16_224": ["blocks.5", "blocks.9"], "resnet50": ["layer2", "layer3"]}
SMOKE = {"timm/test_vit": ["blocks.2", "blocks.4"], "timm/test_resnet": ["layer2", "layer3"]}
"""--smoke: timm's tiny test models of the same two kinds at 32 px (the same code path, seconds instead of
minutes)."""


def images_per_second(backbone: str, taps: list[str], local: bool, steps: int, tmp: Path, size: int = 224) -> float:
    from pipeline import config as config_mod
    from pipeline.data import shards
    from pipeline.launch import fit
    from pipeline.preflight import resolve_paths
    from pipeline.tracking import Tracker
    from pipeline.train import Hooks

    cfg = resolve_paths(config_mod.load(ROOT / "configs" / "demo_scratch.yaml", values={
        "model.backbone": backbone, "model.attention.taps": taps, "data.image_size": size, "data.max_classes": 64,
        "data.root": str(tmp / "data"), "sampler.classes_per_batch": 8, "sampler.images_per_class": 2,
        "sampler.batch_size": 16, "train.epochs": 2, "train.max_steps_per_epoch": steps, "train.workers": 2,
        "train.storage_path": str(tmp / "ray"), "eval.gap_images": 0}))
    shards.ensure(cfg.data)
    name = f"{backbone.replace('/', '-')}-{'local' if local else 'ray'}"
    _, history = fit(cfg, Tracker(None, None), name, local=local, progress=False, hooks=Hooks(synthetic_batches=2))
    last = history[-1]
    workers = 1 if local else cfg.train.workers
    return workers * last["steps"] * cfg.sampler.batch_size / last["epoch_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="local mode only, 2 steps (under two minutes)")
    parser.add_argument("--smoke", action="store_true", help="timm's tiny test ViT and ResNet at 32 px, local mode "
                        "only (the test suite runs it: it checks that the benchmark runs, not the speed)")
    args = parser.parse_args()
    import ray
    import torch

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="gdml-bench-backbones-"))
    modes = [True] if args.quick or args.smoke else [True, False]
    models, size = (SMOKE, 32) if args.smoke else (BACKBONES, 224)
    speeds: dict[tuple[str, bool], float] = {}
    try:
        for local in modes:
            for backbone, taps in models.items():
                speeds[(backbone, local)] = images_per_second(backbone, taps, local, 4 if modes == [True, False] else 2,
                                                              tmp, size)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{size} px, batch 16 (8 x 2), two taps + attention + adversary, multi-similarity; batches in memory")
    print(f"{'backbone':<30}{'local (1 thread)':>18}{'2 Ray workers':>16}   images/s")
    for backbone in models:
        ray_speed = speeds.get((backbone, False))
        print(f"{backbone:<30}{speeds[(backbone, True)]:>18.2f}{'' if ray_speed is None else f'{ray_speed:.2f}':>16}")
    vit, resnet = list(models)
    ratio = speeds[(vit, True)] / speeds[(resnet, True)]
    print(f"RESULT vit_s16_vs_resnet50_images_per_second={ratio:.2f} goal=>=0.5")


if __name__ == "__main__":
    main()
