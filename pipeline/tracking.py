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
