"""Tracking that never stops training: a real MLflow server stopped mid-run and restarted, and the journal."""

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.checkpoint import load_latest
from pipeline.tracking import Tracker, replay_journal
from tests.conftest import TINY, MlflowServer, cli_args, wait_for


@pytest.mark.full
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_server_that_dies_mid_run_stops_no_training_and_loses_no_epoch(tmp_path, tiny_shards):
    """The server goes down once epoch 1 is logged, while the run is held before epoch 2; epochs 2-4 train with no
    server; it comes back only once the last epoch is checkpointed. The run finishes, every epoch logged once."""
    server = MlflowServer(tmp_path)
    server.start()
    epochs, release = 4, tmp_path / "release"
    overrides = {**TINY, "data.root": str(tiny_shards), "train.storage_path": str(tmp_path / "ray"),
                 "train.epochs": epochs, "train.name": "outage", "tracking.uri": server.uri,
                 "tracking.experiment": "outage", "tracking.outage_wait": 180,
                 "fault.pause_epoch": 2, "fault.pause_file": str(release)}
    train = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "train", "--local", *cli_args(overrides)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        client = MlflowClient(server.uri)

        def first_epoch_logged():
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
            return runs and [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] == [1]

        wait_for(Path(f"{release}.rank0").exists, 240, "the run to be held before epoch 2")
        wait_for(first_epoch_logged, 60, "epoch 1 in MLflow")
        server.stop()
        release.touch()
        wait_for(lambda: (c := load_latest(str(tmp_path / "ray"), "outage")) and c[1]["epoch"] == epochs, 240,
                 f"epoch {epochs}'s checkpoint with the server down", interval=0.2)
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
            train.wait()
        server.stop()


def test_an_unreachable_server_leaves_the_writes_in_a_journal_that_replays(tmp_path, monkeypatch):
    """No server at all: nothing raises, every write waits in order; replay sends them once a server answers."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    dead = Tracker("http://127.0.0.1:9", "0123456789abcdef", journal_dir=tmp_path)
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


def test_a_write_still_on_its_way_when_the_worker_ends_is_in_its_journal(tmp_path, monkeypatch):
    """A training worker closes its tracker with a short wait and its process ends: a write that MLflow has not
    taken yet (here a server that accepts the connection and never answers) is in the journal the driver takes
    over, not lost with the sending thread."""
    import socket

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        tracker = Tracker(f"http://127.0.0.1:{silent.getsockname()[1]}", "0123456789abcdef", journal_dir=tmp_path,
                          background=True)
        tracker.log_metrics({"loss": 0.5}, step=4, once=True)
        assert not tracker.close(timeout=1.0) and tracker.unsent() == 1  # still on its way
        assert tracker.journal.path == tmp_path / "tracking-journal.jsonl"
        [op] = tracker.journal.read()
        assert (op["op"], op["metrics"], op["step"]) == ("metrics", {"loss": 0.5}, 4)


def test_drain_waits_for_every_write_to_be_tried_not_for_a_dead_server(tmp_path, monkeypatch):
    """What a sweep's rank 0 does before Tune may stop it: every queued write sent, or in the journal (which
    outlives the process); a server that is down costs no wait."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"sqlite:///{tmp_path / 'local.db'}"
    live = Tracker.start(uri, "drain", "r")
    background = Tracker(uri, live.run_id, journal_dir=tmp_path, background=True)
    for step in (1, 2, 3):
        background.log_metrics({"loss": float(step)}, step=step)
    assert background.drain(timeout=30)
    assert [m.step for m in MlflowClient(uri).get_metric_history(live.run_id, "loss")] == [1, 2, 3]

    dead = Tracker("http://127.0.0.1:9", "0123456789abcdef", journal_dir=tmp_path / "dead", background=True)
    dead.log_metrics({"loss": 1.0}, step=1)
    assert dead.drain(timeout=30) and dead.unsent() == 1
    assert '"op": "metrics"' in (tmp_path / "dead" / "tracking-journal.jsonl").read_text()
