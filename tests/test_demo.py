"""The demo end to end, shrunken: CLI -> shards -> 2 Ray workers x 2 variants -> FAISS metrics -> MLflow."""

import os
import re
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import TINY


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(480)
def test_shrunken_demo_prints_both_variants_and_logs_two_runs(tmp_path, tiny_shards):
    overrides = {**TINY, "data.root": str(tiny_shards), "train.storage_path": str(tmp_path / "ray"),
                 "train.max_steps_per_epoch": 2}
    args = [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "demo", *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=450, env={**os.environ, "MLFLOW_TRACKING_URI": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    header = next(line for line in out.splitlines() if line.startswith("metric"))
    assert header.split()[1:] == ["baseline", "+both"]
    rows = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in out.splitlines()
            if re.match(r"^(recall_at_\d|map_at_r|nmi)\s", line)}
    assert set(rows) == {"recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "map_at_r", "nmi"}
    assert all(0 <= v <= 1 and len(vals) == 2 for vals in rows.values() for v in vals)
    assert "mlflow ui --backend-store-uri" in out
    assert re.search(r"^diagnostics \(gap curve .*\): \d+ s of the \d+ s \(\d+\.\d%\)$", out, re.M), out[-2000:]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("gdml-demo")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.data.tags["variant"] for r in runs) == ["+both", "baseline"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mode"] == "ray"
        assert "test/recall_at_1" in run.data.metrics and "loss_dml" in run.data.metrics
        assert run.data.metrics["gap_seconds"] > 0 and run.data.metrics["test/diagnostics_seconds"] > 0
