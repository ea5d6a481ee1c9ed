"""ASHA with gdml's defaults vs the same 16-configuration grid run to the end: trial-epochs spent, and whether
ASHA's pick is within one standard error of the full grid's best.

Both sweeps run the same grid (4 adversarial weights x 4 tap sets: the same 16 trials of 8 epochs; ``--quick``:
2 x 2 of 2 epochs, a smoke run of about 8 minutes here), the same seed and budget, validation on held-out
training classes, and no final retrain; the ASHA sweep uses the defaults of
``search.asha`` (tuning/sweep.py). The pick is judged on the full grid's own scores: the score that ASHA's choice
reached when run to the end, against the best one, in units of the best one's standard error (the binomial
standard error of Recall@1 over the validation queries, sqrt(p (1 - p) / n)). The RESULT line is the ratio of
trial-epochs ASHA / full (lower is better).

    .venv/bin/python benchmarks/bench_sweep.py [--quick | --smoke]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = [0.01, 0.1, 1.0, 3.0]
TAPS = [["layer3"], ["layer2", "layer3"], ["layer1", "layer2", "layer3"], ["layer2"]]


def grid(quick: bool, smoke: bool = False) -> tuple[list[float], list[list[str]]]:
    if smoke:
        return WEIGHTS[1:2], TAPS[:1]
    return (WEIGHTS[::2], TAPS[:2]) if quick else (WEIGHTS, TAPS)


def sweep_file(tmp: Path, quick: bool, asha: bool, epochs: int, smoke: bool = False) -> Path:
    # A tiny model, 8 steps an epoch: what is measured is how many trial-epochs each sweep spends and whether
    # ASHA finds the grid's best, not the model. 400 emoji classes, half of the training ones held out for
    # validation: enough queries that close configurations rarely tie (a tie passes an ASHA rung).
    tiny = {"data.max_classes": 48 if smoke else 400, "data.image_size": 32, "data.root": str(tmp / "data"),
            "model.backbone": "timm/test_resnet", "model.pretrained": None, "model.embedding_size": 32,
            "model.attention.width": 32, "sampler.classes_per_batch": 8, "sampler.batch_size": 32,
            "train.max_steps_per_epoch": 2 if smoke else 8, "train.workers": 1, "eval.gap_images": 0}
    spec = {
        "name": "asha" if asha else "full",
        "base": str(ROOT / "configs" / "demo_scratch.yaml"),
        "set": {"train.val_fraction": 0.5, "train.epochs": epochs, "train.storage_path": str(tmp / "ray"),
                "tracking.uri": f"sqlite:///{tmp / 'mlflow.db'}", "tracking.experiment": "bench-sweep", **tiny},
        "search": {"algorithm": "grid", "num_samples": 1, "metric": "val/recall_at_1",
                   "space": {"model.adversary.weight": {"type": "grid", "values": grid(quick, smoke)[0]},
                             "model.attention.taps": {"type": "grid", "values": grid(quick, smoke)[1]}}},
        "final": False,
    }
    if not asha:
        spec["search"]["asha"] = None  # else: the defaults of search.asha
    path = tmp / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _key(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 4-configuration grid of 2 epochs (a smoke run: "
                        "ASHA cannot save much with so few trials and rungs)")
    parser.add_argument("--smoke", action="store_true", help="one configuration of 1 epoch on 48 classes, swept once "
                        "and taken as its own peer (the test suite runs it: it checks that the benchmark runs, not "
                        "what ASHA saves)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per trial (default 8; 2 with --quick)")
    args = parser.parse_args()
    from pipeline.data.shards import load_manifest
    from pipeline.data.stream import held_out_classes
    from tuning import sweep

    epochs = args.epochs or (1 if args.smoke else 2 if args.quick else 8)
    tmp = Path(tempfile.mkdtemp(prefix="gdml-bench-sweep-"))
    try:
        out, seconds, base = {}, {}, None
        for asha in (True, False):
            if args.smoke and not asha:  # one trial of one epoch: the full grid would be the same run again
                out[False], seconds[False] = out[True], seconds[True]
                break
            spec, base = sweep.load_spec(sweep_file(tmp, args.quick, asha, epochs, args.smoke))
            if asha:
                weights, taps = grid(args.quick, args.smoke)
                print(f"ASHA defaults: {spec.search.asha}, max_t={epochs} epochs, {len(weights) * len(taps)} trials")
            started = time.perf_counter()
            out[asha] = sweep.run(spec, base, progress=False)
            seconds[asha] = time.perf_counter() - started
        metric = "val/recall_at_1"
        for asha, s in out.items():
            print(f"{'ASHA' if asha else 'full'}: {s['trials']} trials, {s['trial_epochs']} trial-epochs in "
                  f"{seconds[asha]:.0f} s, best {metric}={s[f'best_{metric}']:.4f} with {s['best_params']}")
        full = {_key(t["params"]): t[metric] for t in out[False]["table"]}
        best = max(full.values())
        manifest = load_manifest(base.data.root)
        held = held_out_classes(manifest, base)
        queries = sum(n for sh in manifest.shards("train") for c, n in sh["groups"] if c in held)
        se = math.sqrt(best * (1 - best) / queries)
        picked = full[_key(out[True]["best_params"])]
        print(f"ASHA's pick, run to the end in the full grid: {metric}={picked:.4f}; the full grid's best {best:.4f} "
              f"(standard error {se:.4f} over {queries} validation queries); within one standard error: "
              f"{best - picked <= se}")
        ratio = out[True]["trial_epochs"] / out[False]["trial_epochs"]
        print(f"wall-clock ASHA / full: {seconds[True] / seconds[False]:.2f} (each trial also pays the start of its "
              "Ray Train run, which no scheduler saves)")
        print(f"RESULT sweep_asha_trial_epochs_vs_full={ratio:.2f} goal=<=0.4")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
