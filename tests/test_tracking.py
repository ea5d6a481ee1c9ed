"""Tracking that never stops training: a real MLflow server stopped mid-run and restarted, and the journal."""

import os
import socket
import subprocess
import sys
import time

import pytest
import requests
from mlflow.tracking import MlflowClient

from pipeline.checkpoint import load_latest
from pipeline.tracking import Tracker, replay_journal
from tests.conftest import TINY


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    def __init__(self, tmp_path):
        self.port, self.tmp = _free_port(), tmp_path
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.tmp / 'server.db'}",
             "--artifacts-destination", str(self.tmp / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"],
            stdout=open(self.tmp / "server.log", "a"), stderr=subprocess.STDOUT,
            env={**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"})
        for _ in range(240):
            try:
                if requests.get(f"{self.uri}/health", timeout=1).ok:
                    return
            except requests.RequestException:
                time.sleep(0.25)
        raise RuntimeError(f"mlflow server did not start: {(self.tmp / 'server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def _wait(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_server_that_dies_mid_run_stops_no_training_and_loses_no_epoch(tmp_path, tiny_shards):
    server = MlflowServer(tmp_path)
    server.start()
    epochs = 6
    overrides = {**TINY, "data.root": str(tiny_shards), "train.storage_path": str(tmp_path / "ray"),
                 "train.epochs": epochs, "train.name": "outage", "tracking.uri": server.uri,
                 "tracking.experiment": "outage", "tracking.outage_wait": 180}
    train = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "train", "--local",
                              *[a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        client = MlflowClient(server.uri)

        def first_epoch_logged():
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
            return runs and [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] == [1]

        _wait(first_epoch_logged, 240, "epoch 1 in MLflow")
        server.stop()
        # Training goes on without the server: three more epochs are checkpointed while it is down.
        _wait(lambda: (c := load_latest(str(tmp_path / "ray"), "outage")) and c[1]["epoch"] >= 4,
              240, "epoch 4's checkpoint with the server down")
        server.start()
        out, err = train.communicate(timeout=300)
        assert train.returncode == 0, err[-3000:]
        run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
        assert run.info.status == "FINISHED"
        for key in ("loss", "loss_dml", "epoch_seconds"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert steps == list(range(1, epochs + 1)), key  # every epoch, once
        assert "test/recall_at_1" in run.data.metrics
        assert {"checkpoint", "test_per_class.csv"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
        assert err.count("training goes on") == 1, err[-3000:]  # one line, once
        assert not (tmp_path / "ray" / "outage" / "tracking-journal.jsonl").exists()  # everything was sent
    finally:
        if train.poll() is None:
            train.kill()
        server.stop()


def test_an_unreachable_server_leaves_the_writes_in_a_journal_that_replays(tmp_path):
    """No server at all: nothing raises, every write waits in order; replay sends them once a server answers."""
    dead = Tracker("http://127.0.0.1:9", "0123456789abcdef", journal_dir=tmp_path)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    dead.log_metrics({"loss": 1.0}, step=1, once=True)
    dead.log_params({"a": 1})
    dead.end("FINISHED")
    ops = [line for line in (tmp_path / "tracking-journal.jsonl").read_text().splitlines()]
    assert len(ops) == 3 and '"op": "metrics"' in ops[0] and '"op": "end"' in ops[2]

    # the same writes, redirected to a local store that has the run: they go through, each once
    uri = f"sqlite:///{tmp_path / 'local.db'}"
    live = Tracker.start(uri, "replay", "r")
    text = (tmp_path / "tracking-journal.jsonl").read_text()
    (tmp_path / "tracking-journal.jsonl").write_text(text.replace("http://127.0.0.1:9", uri)
                                                     .replace("0123456789abcdef", live.run_id))
    assert replay_journal(tmp_path / "tracking-journal.jsonl", timeout=5) == (3, 0)
    assert replay_journal(tmp_path / "tracking-journal.jsonl", timeout=5) == (0, 0)  # nothing left
    run = MlflowClient(uri).get_run(live.run_id)
    assert run.info.status == "FINISHED" and run.data.params["a"] == "1"
    assert [m.step for m in MlflowClient(uri).get_metric_history(live.run_id, "loss")] == [1]
