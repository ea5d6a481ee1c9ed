"""A 2-trial sweep end to end: Ray Tune -> TorchTrainer per trial -> validation classes -> final test."""

import subprocess
import sys

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.config import ConfigError
from tests.conftest import TINY
from tuning import sweep


def _write_sweep(tmp_path, tiny_shards, **search):
    base = {k: v for k, v in TINY.items()}
    spec = {
        "name": "t",
        "base": "base.yaml",
        "set": {**base, "data.root": str(tiny_shards), "train.storage_path": str(tmp_path / "ray"),
                "train.val_fraction": 0.25, "train.epochs": 2, "train.workers": 1,
                "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment": "sweeps"},
        "search": {"algorithm": "grid", "num_samples": 1, "metric": "val/recall_at_1",
                   "space": {"model.adversary.weight": {"type": "grid", "values": [0.05, 0.5]}}, **search},
    }
    (tmp_path / "base.yaml").write_text("train:\n  seed: 0\n")
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_bad_sweeps_fail_with_one_clear_line(tmp_path, tiny_shards):
    path = _write_sweep(tmp_path, tiny_shards, space={"model.adversry.weight": {"type": "grid", "values": [1]}})
    with pytest.raises(ConfigError, match="'model.adversry.weight' is not a config field"):
        sweep.load_spec(path)
    path = _write_sweep(tmp_path, tiny_shards, space={"model.attention.taps": {"type": "choice", "values": [["x9"]]}})
    with pytest.raises(ConfigError, match="'x9' is not a layer of resnet18"):
        sweep.load_spec(path)
    path = _write_sweep(tmp_path, tiny_shards)
    with pytest.raises(ConfigError, match="train.val_fraction"):
        sweep.load_spec(path, ["train.val_fraction=0"])


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_two_trial_sweep_logs_parent_children_and_a_final_test(tmp_path, tiny_shards):
    path = _write_sweep(tmp_path, tiny_shards)
    proc = subprocess.run([sys.executable, "tuning/sweep.py", "--config", str(path)], capture_output=True,
                          text=True, timeout=580)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 trials" in proc.stdout and "tested once on the unseen classes" in proc.stdout

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sweeps")
    runs = client.search_runs([exp.experiment_id])
    by_mode = {}
    for r in runs:
        by_mode.setdefault(r.data.tags.get("mode"), []).append(r)
    parent = by_mode["sweep"][0]
    trials, final = by_mode["tune-trial"], by_mode["sweep-final"][0]
    assert len(trials) == 2
    assert all(t.data.tags["mlflow.parentRunId"] == parent.info.run_id for t in [*trials, final])
    assert sorted(t.data.params["model.adversary.weight"] for t in trials) == ["0.05", "0.5"]
    assert all("val/recall_at_1" in t.data.metrics for t in trials)
    assert [t.data.tags.get("best") for t in trials].count("true") == 1
    assert "test/recall_at_1" in final.data.metrics and final.data.params["train.val_fraction"] == "0.0"
    assert "val/recall_at_1" not in final.data.metrics  # the final run never sees validation splits
    assert parent.data.metrics["final_test/recall_at_1"] == final.data.metrics["test/recall_at_1"]


def test_set_values_keep_their_yaml_types(tmp_path, tiny_shards):
    path = _write_sweep(tmp_path, tiny_shards)
    spec = yaml.safe_load(path.read_text())
    spec["set"].update({"model.attention.taps": None, "model.attention.kind": "cbam", "train.val_fraction": 0.3})
    path.write_text(yaml.safe_dump(spec))
    _, base = sweep.load_spec(path)
    assert base.model.attention.taps is None and base.model.attention.kind == "cbam"
    assert base.train.val_fraction == 0.3 and base.data.root == str(tiny_shards)
