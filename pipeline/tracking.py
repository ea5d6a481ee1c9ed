"""MLflow: where runs go, and every call gdml makes to it: a :class:`Tracker` per run, a few functions for the
rest. Training never waits on tracking: writes a server did not take wait in a journal. Details: docs/internals.md.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.config import TrackingConfig
from pipeline.errors import GdmlError

PARAM_LIMIT = 6000  # MLflow's longest parameter value
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
"""Opens gdml's experiments in MLflow 3's model-training view (not its GenAI traces view)."""
VIEW = "workflowType=machine_learning"
JOURNAL = "tracking-journal.jsonl"
WORKER_JOURNAL = "tracking-journal-worker.jsonl"

log = logging.getLogger(__name__)


def fail_fast_http() -> None:
    """MLflow's HTTP client retries a dead server for minutes (7 retries with back-off), blocking its caller;
    gdml queues and retries itself, so its processes ask for a quick failure instead."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def resolve_uri(cfg: TrackingConfig) -> str:
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            # sqlite:///relative.db -> absolute, so every process opens the same file.
            uri = f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
        return uri
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def experiment_id(uri: str, name: str) -> str:
    """The experiment's id, created on first use with an absolute artifact location for local stores."""
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if _is_local_store(uri):
        base = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:") else Path.cwd()
        location = (base / "mlruns").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)


def find_runs(uri: str, experiment: str, filter_string: str = "") -> list:
    """Runs of an experiment matching an MLflow filter (empty when the experiment does not exist)."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string=filter_string, max_results=10_000)


def download_checkpoint(uri: str, run_id: str, dst: str | Path) -> str:
    """The run's ``checkpoint`` artifact, downloaded into ``dst``; its local directory."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    try:
        return download_artifacts(run_id=run_id, artifact_path="checkpoint", dst_path=str(dst), tracking_uri=uri)
    except MlflowException as err:
        first = str(err).splitlines()[0]
        raise FileNotFoundError(f"--run {run_id}: no checkpoint artifact in {uri} ({first})") from None


def browse_hint(uri: str, experiment: str, run_id: str | None = None) -> str:
    """How to look at an experiment's runs (or one run) in the MLflow UI: the link, in the model-training view,
    and for a local store the command that serves it first."""
    exp = _client(uri).get_experiment_by_name(experiment)
    where = f"experiments/{exp.experiment_id}/" if exp is not None else ""
    page = f"{where}runs/{run_id}?{VIEW}" if run_id and where else f"{where}runs?{VIEW}"
    if _is_local_store(uri):
        return f"mlflow ui --backend-store-uri {uri}   then open http://127.0.0.1:5000/#/{page}"
    return f"open {uri.rstrip('/')}/#/{page}"


def source_tags() -> dict[str, str]:
    """What produced a run: the gdml command, the gdml version and, when gdml runs from a git checkout, its commit
    (MLflow's runs table shows them in its Source column)."""
    return {"mlflow.source.type": "LOCAL", "mlflow.source.name": os.environ.get("GDML_COMMAND", "gdml"),
            **_code_tags()}


@functools.lru_cache(maxsize=1)
def _code_tags() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        tags = {"gdml.version": version("gdml")}
    except PackageNotFoundError:
        tags = {"gdml.version": "unknown"}
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / ".git").exists():
        import subprocess

        try:
            commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True,
                                    text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit = ""
        if commit:
            tags["mlflow.source.git.commit"] = commit
    return tags


class TrackingUnavailable(GdmlError):
    """The tracking server did not answer at start."""

    exit_code = 2


def check_reachable(uri: str, timeout: float = 5.0) -> str | None:
    """None when the store answers, else one line saying why (only servers are probed; local stores are files)."""
    if not uri.startswith(("http://", "https://")):
        return None
    import requests

    try:
        response = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout)
        response.raise_for_status()
    except requests.RequestException as err:
        return f"MLflow tracking server {uri} is unreachable ({type(err).__name__})"
    return None


class _Journal:
    """Operations not sent yet, in order, one JSON object per line."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def write(self, ops: list[dict[str, Any]]) -> None:
        """The journal holds exactly ``ops`` (written atomically; removed when empty)."""
        if not ops:
            self.path.unlink(missing_ok=True)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(op) + "\n" for op in ops))
        os.replace(tmp, self.path)


class _Sender(threading.Thread):
    """Sends a tracker's operations in order from a background thread. An operation is in the journal from the
    moment it is put until MLflow has taken it, so a process that ends (or is killed) with writes unsent leaves
    them there, at worst one already sent among them (sending again is harmless: an epoch's metrics are skipped
    where MLflow has them). While sending fails, it is tried again every ``retry`` seconds and on every new
    operation. A journal left by an earlier process of the same run is sent first."""

    def __init__(self, tracker: "Tracker", retry: float = 5.0) -> None:
        super().__init__(daemon=True, name="gdml-tracking")
        self.tracker, self.retry = tracker, retry
        self.outbox: list[dict[str, Any]] = tracker.journal.read()
        self.done = threading.Condition()
        self.failing = False
        self.accepted, self.tried = len(self.outbox), 0
        """Writes put (an earlier process's included), and tried at least once (sent, or kept in the journal)."""

    def put(self, op: dict[str, Any]) -> None:
        with self.done:
            self.outbox.append(op)
            self.tracker.journal.write(self.outbox)
            self.accepted += 1
            self.done.notify_all()

    def unsent(self) -> int:
        with self.done:
            return len(self.outbox)

    def run(self) -> None:
        while True:
            with self.done:
                if self.tried == self.accepted:  # nothing new: wait for a write, or (unsent ones) the retry
                    self.done.wait(self.retry if self.outbox else None)
                target, ops = self.accepted, list(self.outbox)
            sent = self._send(ops)
            with self.done:
                if sent:
                    del self.outbox[:sent]
                    self.tracker.journal.write(self.outbox)
                self.tried = target
                self.done.notify_all()

    def _send(self, ops: list[dict[str, Any]]) -> int:
        """Send in order until one fails; how many went."""
        for sent, op in enumerate(ops):
            try:
                self.tracker.apply(op)
            except Exception as err:  # noqa: BLE001 - whatever failed, it stays in the journal for later
                if not self.failing:
                    log.warning("MLflow tracking at %s failed (%s); training goes on, unsent entries wait in %s and "
                                "are sent when it answers again", self.tracker.uri, type(err).__name__,
                                self.tracker.journal.path)
                self.failing = True
                return sent
        if self.failing and ops:
            log.warning("MLflow tracking at %s answers again: the queued entries were sent", self.tracker.uri)
            self.failing = False
        return len(ops)

    def drain(self, timeout: float) -> bool:
        """Until every write queued so far has been tried once: sent, or kept in the journal (which outlives the
        process); True if so within ``timeout`` seconds. Unlike ``wait``, a server that is down costs no wait."""
        deadline = time.monotonic() + timeout
        with self.done:
            target = self.accepted
            while self.tried < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.done.wait(left)
        return True

    def wait(self, timeout: float) -> bool:
        """Until everything queued is sent, or ``timeout`` seconds; True if everything was sent."""
        deadline = time.monotonic() + timeout
        with self.done:
            while self.outbox:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.done.wait(min(left, self.retry))
        return True


class Tracker:
    """One MLflow run, or nothing at all when tracking is off (every call is then a no-op).

    With ``journal_dir`` the tracker never raises on a failed send: in ``background`` mode it queues every write
    for a sending thread (training never waits), otherwise it sends at once and keeps what fails; either way the
    unsent writes, in order, are the journal ``journal_dir/<journal_name>`` until they go through (``close``
    waits a while for that; ``gdml replay`` sends a journal later).

    As a context manager it ends the run: FINISHED, KILLED on an interrupt (Ctrl-C, SIGTERM), FAILED on any other
    error; on ``sys.exit(0)`` it leaves the run as it is (Ray Tune ends a trial's function that way, stopped early
    or at its last report, and the sweep closes the trial's runs from Tune's results: a late FINISHED from the
    trial's own process must not overwrite the KILLED of a trial ASHA stopped).
    """

    def __init__(self, uri: str | None, run_id: str | None, journal_dir: str | Path | None = None,
                 background: bool = False, journal_name: str = JOURNAL) -> None:
        self.uri, self.run_id = uri, run_id
        self._mlflow = None
        self.journal = _Journal(Path(journal_dir) / journal_name) if journal_dir and self.enabled else None
        self._sender = None
        if self.journal is not None and background:
            self._sender = _Sender(self)
            self._sender.start()

    @property
    def enabled(self) -> bool:
        return bool(self.uri and self.run_id)

    @property
    def client(self):
        if self._mlflow is None:
            self._mlflow = _client(self.uri)
        return self._mlflow

    @classmethod
    def start(cls, uri: str | None, experiment: str, name: str, tags: dict[str, str] | None = None,
              **kwargs: Any) -> "Tracker":
        """A new run."""
        if uri is None:
            return cls(None, None)
        run = _client(uri).create_run(experiment_id(uri, experiment), run_name=name,
                                      tags={**source_tags(), **(tags or {}), "gdml.run_name": name})
        return cls(uri, run.info.run_id, **kwargs)

    @classmethod
    def open(cls, uri: str | None, experiment: str, name: str, tags: dict[str, str] | None = None,
             **kwargs: Any) -> "Tracker":
        """Continue the run of this name if the experiment has one (a resumed training), else start one."""
        if uri is None:
            return cls(None, None)
        found = find_runs(uri, experiment, f"tags.`gdml.run_name` = '{name}'")
        if found:
            tracker = cls(uri, found[0].info.run_id, **kwargs)
            tracker.client.update_run(tracker.run_id, status="RUNNING")
            return tracker
        return cls.start(uri, experiment, name, tags, **kwargs)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.end("FINISHED")
        elif issubclass(exc_type, SystemExit) and exc.code in (0, None):
            pass  # a Ray Tune trial that Tune ended: the sweep closes its runs (sweep.trial_outcomes)
        elif issubclass(exc_type, KeyboardInterrupt):
            self.end("KILLED")
        else:
            self.end("FAILED")
        return False

    # -- sending ------------------------------------------------------------------------------------------------

    def _do(self, op: dict[str, Any]) -> None:
        if not self.enabled:
            return
        op = {**op, "uri": self.uri, "run_id": self.run_id}  # a journal line says where it goes
        if self._sender is not None:
            self._sender.put(op)
            return
        if self.journal is None:
            self.apply(op)
            return
        unsent = self.journal.read()
        if unsent:  # still failing earlier: keep the order
            self.journal.write([*unsent, op])
            return
        try:
            self.apply(op)
        except Exception as err:  # noqa: BLE001 - keep it for later
            self.journal.write([op])
            log.warning("MLflow tracking at %s failed (%s); unsent entries wait in %s", self.uri, type(err).__name__,
                        self.journal.path)

    def apply(self, op: dict[str, Any]) -> None:
        """Send one operation now (raises if MLflow does not take it)."""
        kind, client = op["op"], self.client
        if kind == "metrics":
            from mlflow.entities import Metric

            if op.get("once") and op["metrics"] and op["step"] in self.logged_steps(next(iter(op["metrics"]))):
                return  # this epoch is in MLflow already (a resent or replayed entry)
            client.log_batch(self.run_id, metrics=[Metric(k, float(v), op["ts"], op["step"])
                                                   for k, v in op["metrics"].items()])
        elif kind == "params":
            self._log_params_now(op["params"])
        elif kind == "tags":
            for key, value in op["tags"].items():
                client.set_tag(self.run_id, key, value)
        elif kind == "inputs":
            from mlflow.entities import Dataset, DatasetInput, InputTag

            client.log_inputs(self.run_id, [
                DatasetInput(Dataset(d["name"], d["digest"], d["source_type"], d["source"], profile=d["profile"]),
                             [InputTag("mlflow.data.context", d["context"])]) for d in op["datasets"]])
        elif kind == "text":
            client.log_text(self.run_id, op["text"], op["artifact_file"])
        elif kind == "artifact":
            client.log_artifact(self.run_id, op["local_path"], op["artifact_path"] or None)
        elif kind == "artifacts":
            client.log_artifacts(self.run_id, op["local_dir"], op["artifact_path"])
        elif kind == "end":
            client.set_terminated(self.run_id, status=op["status"])
        else:
            raise ValueError(f"unknown tracking operation {kind!r}")

    def unsent(self) -> int:
        """Writes not in MLflow yet (queued, or in the journal)."""
        if self._sender is not None:
            return self._sender.unsent()
        return len(self.journal.read()) if self.journal is not None else 0

    def drain(self, timeout: float) -> bool:
        """Every write so far sent or in the journal (background mode; otherwise that holds already)."""
        return self._sender.drain(timeout) if self._sender is not None else True

    def close(self, timeout: float = 0.0) -> bool:
        """Wait up to ``timeout`` seconds for everything to be sent; True if it was."""
        if self._sender is not None:
            return self._sender.wait(timeout)
        return self.replay(timeout) == 0

    def adopt(self, journal_path: Path) -> int:
        """Take over the unsent writes of another journal (the training worker's), in order; how many."""
        ops = _Journal(journal_path).read()
        for op in ops:
            self._do(op)
        journal_path.unlink(missing_ok=True)
        return len(ops)

    def replay(self, timeout: float = 0.0, retry: float = 3.0) -> int:
        """Send this tracker's journal, trying for up to ``timeout`` seconds; how many writes are still unsent."""
        if self.journal is None:
            return 0
        deadline = time.monotonic() + timeout
        ops = self.journal.read()
        while ops:
            try:
                self.apply(ops[0])
            except Exception:  # noqa: BLE001
                self.journal.write(ops)
                if time.monotonic() + retry > deadline:
                    return len(ops)
                time.sleep(retry)
                continue
            ops.pop(0)
        self.journal.write([])
        return 0

    # -- what a run logs ----------------------------------------------------------------------------------------

    def _log_params_now(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        old = self.client.get_run(self.run_id).data.params
        new = [Param(k, str(v)[:PARAM_LIMIT]) for k, v in sorted(params.items()) if k not in old]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i:i + 100])
        for key, value in params.items():
            if key in old and old[key] != str(value)[:PARAM_LIMIT]:
                self.client.set_tag(self.run_id, f"resumed_with.{key}", f"{old[key]} -> {value}")

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params; in a continued run, params cannot change: changed values are kept as tags instead."""
        self._do({"op": "params", "params": {k: str(v)[:PARAM_LIMIT] for k, v in params.items()}})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, once: bool = False) -> None:
        """``once``: skipped if MLflow already holds this step (an epoch resent after a restart)."""
        self._do({"op": "metrics", "metrics": {k: float(v) for k, v in metrics.items()}, "step": step or 0,
                  "ts": int(time.time() * 1000), "once": once})

    def logged_steps(self, key: str) -> set[int]:
        if not self.enabled:
            return set()
        return {m.step for m in self.client.get_metric_history(self.run_id, key)}

    def log_inputs(self, datasets: list[dict[str, str]]) -> None:
        """Data sets as the run's inputs (MLflow's Dataset column); each a dict of name, digest, source_type,
        source, profile (JSON) and context (training, validation, test)."""
        self._do({"op": "inputs", "datasets": datasets})

    @contextlib.contextmanager
    def system_metrics(self, interval: float | None) -> Iterator[None]:
        """CPU, memory, disk, network and (where NVML finds them) GPU use, sampled every ``interval`` seconds by
        MLflow's own monitor and logged as ``system/*`` metrics of this run; None: nothing. The monitor stops
        at its first failed write (a tracking outage) and the run goes on."""
        if not self.enabled or interval is None:
            yield
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # not its start/stop lines
        monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval, resume_logging=True,
                                       tracking_uri=self.uri)
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()

    def set_tags(self, tags: dict[str, str]) -> None:
        self._do({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        import yaml

        text = yaml.safe_dump(data, sort_keys=False) if artifact_file.endswith((".yaml", ".yml")) else \
            json.dumps(data, indent=1)
        self.log_text(text, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._do({"op": "text", "text": text, "artifact_file": artifact_file})

    def log_artifacts(self, local_dir: str | Path, artifact_path: str) -> None:
        self._do({"op": "artifacts", "local_dir": str(local_dir), "artifact_path": artifact_path})

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """A matplotlib figure as a PNG artifact (written to a file first, so that it can wait in the journal)."""
        if not self.enabled:
            return
        import tempfile

        folder = Path(artifact_file).parent
        op = {"op": "artifact", "artifact_path": "" if folder == Path(".") else str(folder)}
        if self.journal is None:  # sent at once: the file need not outlive this call
            with tempfile.TemporaryDirectory(prefix="gdml-figure-") as tmp:
                figure.savefig(Path(tmp) / Path(artifact_file).name)
                self._do({**op, "local_path": str(Path(tmp) / Path(artifact_file).name)})
            return
        local = self.journal.path.parent / "figures" / Path(artifact_file).name
        local.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(local)
        self._do({**op, "local_path": str(local)})

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """This run as MLflow's active run, for the calls that exist only in the fluent API (``log_model``)."""
        import mlflow
        from mlflow.tracking._model_registry import utils as registry_utils
        from mlflow.tracking._tracking_service import utils as tracking_utils

        # MLflow's setters also write MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI into os.environ, for subprocesses:
        # put back what was there, so that this run's store does not become every later call's (or child's) default
        saved_env = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
        saved = (tracking_utils._tracking_uri, registry_utils._registry_uri)
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        try:
            with mlflow.start_run(run_id=self.run_id):
                yield
        finally:
            tracking_utils._tracking_uri, registry_utils._registry_uri = saved
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def end(self, status: str = "FINISHED") -> None:
        self._do({"op": "end", "status": status})


def replay_journal(path: str | Path, timeout: float = 60.0) -> tuple[int, int]:
    """Send a journal's writes to where they were going; (sent, still unsent)."""
    path = Path(path)
    ops = _Journal(path).read()
    if not ops:
        return 0, 0
    tracker = Tracker(ops[0]["uri"], ops[0]["run_id"], journal_dir=path.parent, journal_name=path.name)
    left = tracker.replay(timeout)
    return len(ops) - left, left
