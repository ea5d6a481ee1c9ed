"""MLflow: where runs go, and the few calls the driver and rank 0 make.

Default store: ``sqlite:///<cwd>/mlflow.db`` with artifacts in ``<cwd>/mlruns`` (absolute, so Ray workers,
which run in their own directories, write to the same place); ``MLFLOW_TRACKING_URI`` or
``tracking.uri`` point elsewhere (a team server: ``http://host:5000``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline.config import TrackingConfig


def resolve_uri(cfg: TrackingConfig) -> str:
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            # sqlite:///relative.db -> absolute, so every process opens the same file.
            uri = f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
        return uri
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def experiment_id(uri: str, name: str) -> str:
    """The experiment's id, created on first use with an absolute artifact location for local stores."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if _is_local_store(uri):
        base = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:") else Path.cwd()
        location = (base / "mlruns").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def start_run(uri: str, experiment: str, run_name: str, tags: dict[str, str] | None = None) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.create_run(experiment_id(uri, experiment), run_name=run_name, tags=tags or {})
    return run.info.run_id


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    client = MlflowClient(uri)
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
    MlflowClient(uri).log_batch(run_id, metrics=items)


def log_dict(uri: str, run_id: str, data: dict[str, Any], artifact_file: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).log_dict(run_id, data, artifact_file)


def log_artifacts(uri: str, run_id: str, local_dir: str | Path, artifact_path: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).log_artifacts(run_id, str(local_dir), artifact_path)


def log_figure(uri: str, run_id: str, figure: Any, artifact_file: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).log_figure(run_id, figure, artifact_file)


def download_checkpoint(uri: str, run_id: str, dst: str | Path) -> str:
    """The run's ``checkpoint`` artifact, downloaded into ``dst``; its local directory."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    try:
        return download_artifacts(run_id=run_id, artifact_path="checkpoint", dst_path=str(dst), tracking_uri=uri)
    except MlflowException as err:
        raise FileNotFoundError(f"--run {run_id}: no checkpoint artifact in {uri} ({str(err).splitlines()[0]})") from None


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).set_terminated(run_id, status=status)


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
    """One MLflow run, or nothing at all when tracking is off: every call is then a no-op."""

    def __init__(self, uri: str | None, run_id: str | None) -> None:
        self.uri, self.run_id = uri, run_id

    @property
    def enabled(self) -> bool:
        return bool(self.uri and self.run_id)

    @classmethod
    def open(cls, uri: str | None, experiment: str, name: str, tags: dict[str, str]) -> "Tracker":
        """Continue the run of this name if the experiment has one (a resumed training), else start one."""
        if uri is None:
            return cls(None, None)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        exp_id = experiment_id(uri, experiment)
        found = client.search_runs([exp_id], filter_string=f"tags.`gdml.run_name` = '{name}'", max_results=1)
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            return cls(uri, run_id)
        return cls(uri, start_run(uri, experiment, name, {**tags, "gdml.run_name": name}))

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params; in a continued run, params cannot change: changed values are kept as tags instead."""
        if not self.enabled:
            return
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        old = client.get_run(self.run_id).data.params
        log_params(self.uri, self.run_id, {k: v for k, v in params.items() if k not in old})
        for key, value in params.items():
            if key in old and old[key] != str(value)[:6000]:
                client.set_tag(self.run_id, f"resumed_with.{key}", f"{old[key]} -> {value}")

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.enabled:
            log_metrics(self.uri, self.run_id, metrics, step)

    def logged_steps(self, key: str) -> set[int]:
        if not self.enabled:
            return set()
        from mlflow.tracking import MlflowClient

        return {m.step for m in MlflowClient(self.uri).get_metric_history(self.run_id, key)}

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        if self.enabled:
            log_dict(self.uri, self.run_id, data, artifact_file)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str) -> None:
        if self.enabled:
            log_artifacts(self.uri, self.run_id, local_dir, artifact_path)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        if self.enabled:
            log_figure(self.uri, self.run_id, figure, artifact_file)

    def end(self, status: str = "FINISHED") -> None:
        if self.enabled:
            end_run(self.uri, self.run_id, status)
