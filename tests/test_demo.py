"""The demo end to end, shrunken: CLI -> shards -> 2 Ray workers x 2 variants -> metrics -> MLflow, and the printed
table is the MLflow runs' own numbers."""

import re

import pytest
from mlflow.tracking import MlflowClient

from pipeline import cli
from tests.conftest import SYSTEM_METRICS, TINY, cli_args
from tests.test_train import check_view


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(300)
def test_shrunken_demo_prints_both_variants_and_logs_two_runs(tmp_path, tiny_shards, monkeypatch, capsys,
                                                              shared_ray):
    overrides = {**TINY, **SYSTEM_METRICS, "data.root": str(tiny_shards), "train.storage_path": str(tmp_path / "ray"),
                 "train.max_steps_per_epoch": 2}
    monkeypatch.chdir(tmp_path)  # the demo's default MLflow store: ./mlflow.db
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli.main(["demo", *cli_args(overrides)]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("metric"))
    assert header.split()[1:] == ["baseline", "+both"]
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()
            if re.match(r"^(recall_at_\d|map_at_r|r_precision|precision_at_1|nmi)\s", line)}
    assert set(rows) == {"recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "map_at_r", "r_precision",
                         "precision_at_1", "nmi"}
    # off a terminal (here, a captured stdout) progress is one line per epoch per run, not bars
    epochs = re.findall(r"^.*gdml: (demo-\S+) epoch (\d)/1: loss \d+\.\d+, 2 steps, \d+\.\d s$", out, re.M)
    assert sorted(name.split("-")[1] for name, _ in epochs) == ["baseline", "both"], out[-3000:]
    assert "step/s" not in out and "\r" not in out and "\x1b[" not in out
    experiment = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_experiment_by_name("gdml-demo")
    # the link opens the experiment's runs table in the model-training view
    assert (f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}   then open http://127.0.0.1:5000/#/"
            f"experiments/{experiment.experiment_id}/runs?workflowType=machine_learning") in out
    assert re.search(r"^diagnostics \(gap curve .*\): \d+ s of the \d+ s \(\d+\.\d%\)$", out, re.M), out[-2000:]
    ids = dict(pair.split("=") for pair in re.search(r"MLflow runs: (.*)$", out, re.M).group(1).split(", "))

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("gdml-demo").experiment_id])
    assert sorted(r.data.tags["variant"] for r in runs) == ["+both", "baseline"]
    for run in runs:
        variant = run.data.tags["variant"]
        assert ids[variant] == run.info.run_id
        assert run.info.status == "FINISHED" and run.data.tags["mode"] == "ray"
        assert run.data.params["runtime.world_size"] == "2"  # two Ray Train workers (DDP)
        assert run.data.params["model.attention.enabled"] == str(variant == "+both")
        assert run.data.params["model.adversary.enabled"] == str(variant == "+both")
        column = ["baseline", "+both"].index(variant)
        for key, printed in rows.items():  # the printed table is these runs' test metrics
            assert printed[column] == f"{run.data.metrics[f'test/{key}']:.4f}", (variant, key)
        assert "loss_dml" in run.data.metrics
        assert run.data.tags["mlflow.source.name"] == "gdml demo"
        check_view(client, run, held_out=0)
        assert run.data.metrics["gap_seconds"] > 0 and run.data.metrics["test/diagnostics_seconds"] > 0
