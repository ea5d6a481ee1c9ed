"""The driver side of one training run: data, checks, Ray Train (or local mode), evaluation, MLflow.

Nothing here runs on a worker; the per-worker function lives in ``pipeline.train``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import tracking
from pipeline.config import Config, ConfigError
from pipeline.data import shards
from pipeline.data.stream import batches_per_slot

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    name: str
    run_id: str
    tracking_uri: str
    checkpoint: str
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def resolve_paths(cfg: Config) -> Config:
    """Absolute paths for everything a worker touches (Ray workers run in their own directories)."""
    data = cfg.data.model_copy(update={"root": str(Path(cfg.data.root).resolve())})
    storage = cfg.train.storage_path
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    train = cfg.train.model_copy(update={"storage_path": storage})
    tracking_cfg = cfg.tracking.model_copy(update={"uri": tracking.resolve_uri(cfg.tracking)})
    return cfg.model_copy(update={"data": data, "train": train, "tracking": tracking_cfg})


def check_model(cfg: Config) -> None:
    """Config checks that need the backbone or the loss (still before any work)."""
    from pipeline.model.backbone import check_taps
    from pipeline.model.embedder import resolved_taps
    from pipeline.objectives import check_params

    if cfg.model.attention.enabled:
        taps = resolved_taps(cfg.model)
        if not taps:
            raise ConfigError("model.attention.taps: empty; name at least one layer (or set model.attention.enabled=false)")
        problem = check_taps(cfg.model.backbone, taps)
        if problem:
            raise ConfigError(f"model.attention.taps: {problem}")
    problem = check_params(cfg.loss)
    if problem:
        raise ConfigError(f"loss.params: {problem}")
    pretrained = cfg.model.pretrained
    if pretrained and pretrained != "imagenet" and not Path(pretrained).is_file():
        raise ConfigError(f"model.pretrained: {pretrained} does not exist (expected 'imagenet' or a weights file)")


def check_data(cfg: Config, manifest: dict[str, Any], world_size: int) -> None:
    """Checks that need the manifest: is there enough data for one batch on every rank and worker?"""
    groups = manifest["splits"]["train"]["classes"]
    slots = world_size * max(1, cfg.sampler.loader_workers)
    if batches_per_slot(groups, slots, cfg.sampler.classes_per_batch) == 0:
        raise ConfigError(
            f"sampler.classes_per_batch: {cfg.sampler.classes_per_batch} classes x {world_size} ranks x "
            f"{max(1, cfg.sampler.loader_workers)} loader workers needs at least "
            f"{slots * cfg.sampler.classes_per_batch} training classes; {cfg.data.root} has {groups}"
        )


def _use_gpu(cfg: Config) -> bool:
    if cfg.train.use_gpu is not None:
        return cfg.train.use_gpu
    import ray

    return bool(ray.cluster_resources().get("GPU", 0))


def init_ray() -> None:
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(logging_level=logging.WARNING, log_to_driver=True)


def fit(cfg: Config, run_id: str, uri: str, name: str, local: bool, progress: bool = True,
        extra: dict[str, Any] | None = None) -> tuple[str, list[dict]]:
    """Train with Ray Train (or in-process); returns the final checkpoint directory and per-epoch metrics.

    ``extra`` adds keys to the worker's config (e.g. ``trace_dir``, see ``pipeline.train``).
    """
    from ray.train import CheckpointConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.train import train_loop_per_worker

    storage = Path(cfg.train.storage_path) if "://" not in cfg.train.storage_path else None
    loop_config = {"cfg": cfg.to_dict(), "mlflow_uri": uri, "mlflow_run_id": run_id, "progress": progress,
                   **(extra or {})}
    if local:
        assert storage is not None, "local mode keeps checkpoints on a local path"
        loop_config["checkpoint_root"] = str(storage / name)
        scaling = ScalingConfig(num_workers=0)
    else:
        init_ray()
        scaling = ScalingConfig(num_workers=cfg.train.workers, use_gpu=_use_gpu(cfg),
                                resources_per_worker={"CPU": cfg.train.cpus_per_worker})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling,
        run_config=RunConfig(name=name, storage_path=cfg.train.storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             logging_config=LoggingConfig(log_level="WARNING")),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"run {name} finished without a checkpoint")
    history = []
    if result.metrics_dataframe is not None:
        history = result.metrics_dataframe.to_dict("records")
    return result.checkpoint.path, history


def evaluate_checkpoint(checkpoint: str, cfg: Config, manifest: dict[str, Any], split: str = "test",
                        progress: bool = True):
    """Load a checkpoint's model and evaluate it on a split, in this process."""
    from pipeline.evaluate import evaluate_model
    from pipeline.train import load_model

    model, _, _ = load_model(checkpoint)
    return evaluate_model(model, manifest, cfg.data.root, split, cfg.eval.recall_at, cfg.eval.batch_size,
                          seed=cfg.train.seed, progress=progress)


def log_evaluation(uri: str, run_id: str, ev: Any, manifest: dict[str, Any], root: str, prefix: str,
                   plots: bool = True, seed: int = 0) -> None:
    """Metrics as ``<prefix>/<key>``; plots (Recall@K curve, retrieval grid, t-SNE) under ``plots/``."""
    import numpy as np
    from matplotlib import pyplot as plt

    from pipeline import plots as figures
    from pipeline.data.stream import load_images

    tracking.log_metrics(uri, run_id, {f"{prefix}/{k}": v for k, v in ev.metrics.items()})
    if not plots:
        return
    rng = np.random.default_rng(seed)
    queries = sorted(rng.choice(len(ev.labels), size=min(8, len(ev.labels)), replace=False).tolist())
    top = min(5, ev.neighbors.shape[1])
    wanted_refs = {int(j) for q in queries for j in ev.neighbors[q, :top]}
    if ev.ref_split is None:
        query_images = ref_images = load_images(manifest, root, ev.query_split, set(queries) | wanted_refs)
    else:
        query_images = load_images(manifest, root, ev.query_split, set(queries))
        ref_images = load_images(manifest, root, ev.ref_split, wanted_refs)
    ref_labels = ev.labels if ev.ref_labels is None else ev.ref_labels
    for name, fig in (
        ("recall_at_k", figures.recall_curve({prefix: ev.metrics})),
        ("retrieval", figures.retrieval_grid(query_images, ref_images, ev.labels, ref_labels, ev.neighbors,
                                             queries, top)),
        ("tsne", figures.projection(ev.embeddings, ev.labels, seed=seed)),
    ):
        tracking.log_figure(uri, run_id, fig, f"plots/{prefix}_{name}.png")
        plt.close(fig)


def run_name(cfg: Config, variant: str | None = None) -> str:
    if cfg.train.name:
        return cfg.train.name
    return f"{variant or 'gdml'}-{cfg.loss.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def variant_of(cfg: Config) -> str:
    att, adv = cfg.model.attention.enabled, cfg.model.adversary.enabled
    return {(False, False): "baseline", (True, False): "attention", (False, True): "adversary"}.get(
        (att, adv), "framework")


def train_and_evaluate(cfg: Config, local: bool = False, name: str | None = None, progress: bool = True,
                       tags: dict[str, str] | None = None, plots: bool = True) -> RunResult:
    """One training run followed by its zero-shot evaluation, all logged to one MLflow run."""
    cfg = resolve_paths(cfg)
    check_model(cfg)
    manifest = shards.ensure(cfg.data)
    check_data(cfg, manifest, 1 if local else cfg.train.workers)
    uri = cfg.tracking.uri
    assert uri is not None
    variant = variant_of(cfg)
    name = name or run_name(cfg, variant)
    run_id = tracking.start_run(uri, cfg.tracking.experiment, name,
                                tags={"variant": variant, "mode": "local" if local else "ray", **(tags or {})})
    tracking.log_params(uri, run_id, cfg.flat())
    tracking.log_dict(uri, run_id, cfg.to_dict(), "config.yaml")
    started = time.perf_counter()
    try:
        checkpoint, history = fit(cfg, run_id, uri, name, local, progress)
        seconds = time.perf_counter() - started
        ev = evaluate_checkpoint(checkpoint, cfg, manifest, "test", progress)
        metrics = ev.metrics
        tracking.log_metrics(uri, run_id, {"train_seconds": seconds})
        log_evaluation(uri, run_id, ev, manifest, cfg.data.root, "test", plots=plots, seed=cfg.train.seed)
        tracking.log_artifacts(uri, run_id, checkpoint, "checkpoint")
    except BaseException:
        tracking.end_run(uri, run_id, "FAILED")
        raise
    tracking.end_run(uri, run_id)
    return RunResult(name, run_id, uri, checkpoint, metrics, history, seconds)
