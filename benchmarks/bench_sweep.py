"""ASHA early stopping vs the same sweep run to the end: trial-epochs spent, and whether the best agrees.

Both sweeps use the same grid (so the same trials), the same seed and budget, validation on held-out
training classes, and no final retrain. Prints each sweep's trial-epochs and best configuration, then the
ratio of trial-epochs ASHA / full (lower is better).

    .venv/bin/python benchmarks/bench_sweep.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def sweep_file(tmp: Path, quick: bool, asha: bool) -> Path:
    small = {"data.max_classes": 128, "data.image_size": 32, "data.root": str(tmp / "data"),
             "sampler.classes_per_batch": 8, "sampler.batch_size": 32, "train.max_steps_per_epoch": 4,
             "train.workers": 1} if quick else {}
    spec = {
        "name": "asha" if asha else "full",
        "base": str(ROOT / "configs" / "demo.yaml"),
        "set": {"train.val_fraction": 0.2, "train.epochs": 4, "train.storage_path": str(tmp / "ray"),
                "tracking.uri": f"sqlite:///{tmp / 'mlflow.db'}", "tracking.experiment": "bench-sweep", **small},
        "search": {"algorithm": "grid", "num_samples": 1, "metric": "val/recall_at_1",
                   "asha": {"grace_period": 1, "reduction_factor": 2} if asha else None,
                   "space": {"model.adversary.weight": {"type": "grid", "values": [0.03, 0.3]},
                             "model.attention.taps": {"type": "grid", "values": [["layer3"], ["layer2", "layer3"]]}}},
        "final": False,
    }
    path = tmp / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny data, 1 worker per trial (under two minutes)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from tuning import sweep

    tmp = Path(tempfile.mkdtemp(prefix="gdml-bench-sweep-"))
    out = {}
    for asha in (True, False):
        spec, base = sweep.load_spec(sweep_file(tmp, args.quick, asha))
        out[asha] = sweep.run(spec, base, progress=False)
    for asha, s in out.items():
        print(f"{'ASHA' if asha else 'full'}: {s['trials']} trials, {s['trial_epochs']} trial-epochs, best "
              f"val/recall_at_1={s['best_val/recall_at_1']:.4f} with {s['best_params']}")
    same = out[True]["best_params"] == out[False]["best_params"]
    print(f"same best configuration: {same}")
    print(f"RESULT sweep_asha_trial_epochs_vs_full={out[True]['trial_epochs'] / out[False]['trial_epochs']:.2f} "
          "goal=<=0.75")


if __name__ == "__main__":
    main()
