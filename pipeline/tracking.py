"""MLflow: where runs go, and every call gdml makes to it.

One style: a :class:`Tracker` (one run, through ``MlflowClient``) for everything a run logs, and a few
functions for what is not about one run (finding runs, checking a server). The only fluent MLflow call in
gdml is ``mlflow.pyfunc.log_model``, which has no client form; :meth:`Tracker.active` bridges to it.

Default store: ``sqlite:///<cwd>/mlflow.db`` with artifacts in ``<cwd>/mlruns`` (absolute, so Ray workers,
which run in their own directories, write to the same place); ``MLFLOW_TRACKING_URI`` or
``tracking.uri`` point elsewhere (a team server: ``http://host:5000``).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.config import TrackingConfig

PARAM_LIMIT = 6000  # MLflow's longest parameter value


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
    return client.create_experiment(name, artifact_location=location)


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
        raise FileNotFoundError(f"--run {run_id}: no checkpoint artifact in {uri} ({str(err).splitlines()[0]})") from None


def ui_hint(uri: str) -> str:
    if uri.startswith("sqlite:") or "://" not in uri:
        return f"mlflow ui --backend-store-uri {uri}   (then open http://127.0.0.1:5000)"
    return f"open {uri} in a browser"


class TrackingUnavailable(RuntimeError):
    """The tracking server did not answer at start."""


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


class Tracker:
    """One MLflow run, or nothing at all when tracking is off (every call is then a no-op).

    As a context manager it ends the run: FINISHED, KILLED on an interrupt (Ctrl-C, SIGTERM), FAILED on any
    other error.
    """

    def __init__(self, uri: str | None, run_id: str | None) -> None:
        self.uri, self.run_id = uri, run_id
        self._mlflow = None

    @property
    def enabled(self) -> bool:
        return bool(self.uri and self.run_id)

    @property
    def client(self):
        if self._mlflow is None:
            self._mlflow = _client(self.uri)
        return self._mlflow

    @classmethod
    def start(cls, uri: str | None, experiment: str, name: str, tags: dict[str, str] | None = None) -> "Tracker":
        """A new run."""
        if uri is None:
            return cls(None, None)
        run = _client(uri).create_run(experiment_id(uri, experiment), run_name=name,
                                      tags={**(tags or {}), "gdml.run_name": name})
        return cls(uri, run.info.run_id)

    @classmethod
    def open(cls, uri: str | None, experiment: str, name: str, tags: dict[str, str] | None = None) -> "Tracker":
        """Continue the run of this name if the experiment has one (a resumed training), else start one."""
        if uri is None:
            return cls(None, None)
        found = find_runs(uri, experiment, f"tags.`gdml.run_name` = '{name}'")
        if found:
            tracker = cls(uri, found[0].info.run_id)
            tracker.client.update_run(tracker.run_id, status="RUNNING")
            return tracker
        return cls.start(uri, experiment, name, tags)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.end("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.end("KILLED")
        else:
            self.end("FAILED")
        return False

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params; in a continued run, params cannot change: changed values are kept as tags instead."""
        if not self.enabled:
            return
        from mlflow.entities import Param

        old = self.client.get_run(self.run_id).data.params
        new = [Param(k, str(v)[:PARAM_LIMIT]) for k, v in sorted(params.items()) if k not in old]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i:i + 100])
        for key, value in params.items():
            if key in old and old[key] != str(value)[:PARAM_LIMIT]:
                self.client.set_tag(self.run_id, f"resumed_with.{key}", f"{old[key]} -> {value}")

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step or 0) for k, v in metrics.items()])

    def logged_steps(self, key: str) -> set[int]:
        if not self.enabled:
            return set()
        return {m.step for m in self.client.get_metric_history(self.run_id, key)}

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, value)

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        if self.enabled:
            self.client.log_dict(self.run_id, data, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            self.client.log_text(self.run_id, text, artifact_file)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str) -> None:
        if self.enabled:
            self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        if self.enabled:
            self.client.log_figure(self.run_id, figure, artifact_file)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """This run as MLflow's active run, for the calls that exist only in the fluent API (``log_model``)."""
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        with mlflow.start_run(run_id=self.run_id):
            yield

    def end(self, status: str = "FINISHED") -> None:
        if self.enabled:
            self.client.set_terminated(self.run_id, status=status)
