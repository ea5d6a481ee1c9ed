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


# Three lanes side by side, each running its benchmarks one after another: a run mostly waits (interpreter, Ray and
# worker start-ups), so the lanes take about the longest one's time on 2 cores: the sweep alone (the longest), the
# other two that start Ray, the rest. On the 2-core machine the fixture took 107-113 s in three lanes, 140 s in two
# (`pytest -m 'full or not full' tests/test_benchmarks.py`, its setup time).
LANES = (("bench_sweep.py",), ("bench_train_overhead.py", "bench_backbones.py"))


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every benchmark's ``--smoke`` run (each in its own folder, without the session's Ray runtime)."""
    from concurrent.futures import ThreadPoolExecutor

    import ray

    ray.shutdown()  # they start Ray runtimes of their own

    def run(script: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke"], capture_output=True,
                              text=True, timeout=220, cwd=tmp_path_factory.mktemp(script.removesuffix(".py")),
                              env={**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": ""})

    lanes = [*([s for s in BENCHMARKS if s in lane] for lane in LANES),
             [s for s in BENCHMARKS if not any(s in lane for lane in LANES)]]
    with ThreadPoolExecutor(len(lanes)) as pool:
        done = pool.map(lambda lane: {script: run(script) for script in lane}, lanes)
        return {script: proc for lane in done for script, proc in lane.items()}


@pytest.mark.full
@pytest.mark.slow
@pytest.mark.timeout(480)
@pytest.mark.parametrize("script", BENCHMARKS)
def test_the_benchmark_runs_its_smoke_version_to_its_result_line(script, smoke_runs):
    proc = smoke_runs[script]
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert RESULT.match(last), proc.stdout[-2000:]
