"""Every benchmark runs: ``benchmarks/bench_<topic>.py --smoke`` (the same code path on the smallest inputs) ends
with its ``RESULT <name>=<value> goal=<op><target>`` line, so that a change of an API they use breaks the suite, not
the next measurement. What they measure is checked by running them in full (the README has the figures)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = sorted(p.name for p in (ROOT / "benchmarks").glob("bench_*.py"))
RESULT = re.compile(r"^RESULT (\w+)=(\d+(\.\d+)?) goal=(<=|>=|<|>|==)\d+(\.\d+)?$")


def test_every_benchmark_is_found():
    assert {"bench_stream.py", "bench_train_overhead.py", "bench_metrics.py", "bench_sweep.py", "bench_serve.py",
            "bench_backbones.py"} <= set(BENCHMARKS)


@pytest.mark.full
@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("script", BENCHMARKS)
def test_the_benchmark_runs_its_smoke_version_to_its_result_line(script, tmp_path, no_shared_ray):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke"], capture_output=True,
                          text=True, timeout=220, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": ""})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert RESULT.match(last), proc.stdout[-2000:]
