"""The MLflow UI in a real (headless) browser: the session's trained run as a user sees it."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "check_mlflow_ui.py"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_mlflow_ui_shows_the_run_its_data_set_source_metrics_system_metrics_and_a_plot(trained, tmp_path):
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium); the check needs a real browser")
    result = trained.result
    proc = subprocess.run([sys.executable, str(SCRIPT), result.tracking_uri, "--experiment",
                           trained.cfg.tracking.experiment, "--run", result.run_id, "--screenshots", str(tmp_path)],
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name for p in tmp_path.glob("*.png")} == {"runs-table.png", "run-metrics.png", "run-system-metrics.png",
                                                        "run-artifact.png"}
