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
    run_id: str | None
    tracking_uri: str | None
    checkpoint: str
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def resolve_paths(cfg: Config) -> Config:
    """Absolute paths for everything a worker touches (Ray workers run in their own directories)."""
    root = cfg.data.root if "://" in cfg.data.root or cfg.data.root.startswith("pipe:") else \
        str(Path(cfg.data.root).resolve())
    path = str(Path(cfg.data.path).resolve()) if cfg.data.path else None
    data = cfg.data.model_copy(update={"root": root, "path": path})
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
    from pipeline.data.stream import validation_classes

    try:
        held_out = validation_classes(manifest, cfg.train.val_fraction, cfg.train.seed)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    groups = manifest["splits"]["train"]["classes"] - len(held_out)
    slots = world_size * max(1, cfg.sampler.loader_workers)
    if batches_per_slot(groups, slots, cfg.sampler.classes_per_batch, pad=False) == 0:
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


def latest_checkpoint(storage_path: str, name: str) -> str | None:
    """The newest ``checkpoint_epoch=NNNN`` directory of a run (local path or s3:// / gs://), if any."""
    import pyarrow.fs

    from pipeline.train import CHECKPOINT_FILE

    fs, base = pyarrow.fs.FileSystem.from_uri(storage_path) if "://" in storage_path else \
        (pyarrow.fs.LocalFileSystem(), storage_path)
    run_dir = f"{base.rstrip('/')}/{name}"
    try:
        entries = fs.get_file_info(pyarrow.fs.FileSelector(run_dir, allow_not_found=True))
    except (OSError, FileNotFoundError):
        return None
    names = sorted(e.base_name for e in entries if e.type == pyarrow.fs.FileType.Directory
                   and e.base_name.startswith("checkpoint_epoch="))
    for candidate in reversed(names):
        path = f"{run_dir}/{candidate}"
        if fs.get_file_info(f"{path}/{CHECKPOINT_FILE}").type == pyarrow.fs.FileType.File:
            return path if "://" not in storage_path else f"{storage_path.rstrip('/')}/{name}/{candidate}"
    return None


def fit(cfg: Config, tracker: tracking.Tracker, name: str, local: bool, progress: bool = True,
        extra: dict[str, Any] | None = None, callbacks: list | None = None) -> tuple[str, list[dict]]:
    """Train with Ray Train (or in-process); returns the final checkpoint directory and per-epoch metrics.

    A run whose storage already holds checkpoints (the same ``name``) resumes from the newest one.
    ``extra`` adds keys to the worker's config (e.g. ``trace_dir``, see ``pipeline.train``).
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.train import train_loop_per_worker

    storage = cfg.train.storage_path
    loop_config = {"cfg": cfg.to_dict(), "mlflow_uri": tracker.uri, "mlflow_run_id": tracker.run_id,
                   "progress": progress, "resume_from": latest_checkpoint(storage, name), **(extra or {})}
    if loop_config["resume_from"]:
        log.info("resuming %s from %s", name, loop_config["resume_from"])
    if "://" not in storage:
        loop_config["fault_marker"] = str(Path(storage) / name / ".fault-injected")
    if local:
        if "://" in storage:
            raise ConfigError(f"train.storage_path: local mode keeps checkpoints on a local path, got {storage}")
        loop_config["checkpoint_root"] = str(Path(storage) / name)
        scaling = ScalingConfig(num_workers=0)
    else:
        init_ray()
        scaling = ScalingConfig(num_workers=cfg.train.workers, use_gpu=_use_gpu(cfg),
                                resources_per_worker={"CPU": cfg.train.cpus_per_worker})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling,
        run_config=RunConfig(name=name, storage_path=storage,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             callbacks=callbacks or [],
                             logging_config=LoggingConfig(log_level="WARNING")),
    )
    result = trainer.fit()
    checkpoint = result.checkpoint.path if result.checkpoint is not None else loop_config["resume_from"]
    if checkpoint is None:
        raise RuntimeError(f"run {name} finished without a checkpoint")
    history = []
    if result.metrics_dataframe is not None:
        history = result.metrics_dataframe.to_dict("records")
    return checkpoint, history


def evaluate_checkpoint(checkpoint: str, cfg: Config, manifest: dict[str, Any], split: str = "test",
                        progress: bool = True):
    """Load a checkpoint's model and evaluate it on a split, in this process."""
    from pipeline.evaluate import evaluate_model
    from pipeline.train import load_model

    model, _, _ = load_model(checkpoint)
    return evaluate_model(model, manifest, cfg.data.root, split, cfg.eval.recall_at, cfg.eval.batch_size,
                          seed=cfg.train.seed, progress=progress, image_size=cfg.data.image_size,
                          engine=cfg.eval.engine)


def log_evaluation(tracker: tracking.Tracker, ev: Any, manifest: dict[str, Any], root: str, prefix: str,
                   plots: bool = True, seed: int = 0) -> None:
    """Metrics as ``<prefix>/<key>``; plots (Recall@K curve, retrieval grid, t-SNE) under ``plots/``."""
    import numpy as np
    from matplotlib import pyplot as plt

    from pipeline import plots as figures
    from pipeline.data.stream import load_images

    tracker.log_metrics({f"{prefix}/{k}": v for k, v in ev.metrics.items()})
    if not plots or not tracker.enabled:
        return
    rng = np.random.default_rng(seed)
    queries = sorted(rng.choice(len(ev.labels), size=min(8, len(ev.labels)), replace=False).tolist())
    neighbours = ev.neighbours(queries, 5)
    top = min(len(nn) for nn in neighbours.values())
    wanted_refs = {j for q in queries for j in neighbours[q][:top]}
    if ev.ref_split is None:
        query_images = ref_images = load_images(manifest, root, ev.query_split, set(queries) | wanted_refs)
    else:
        query_images = load_images(manifest, root, ev.query_split, set(queries))
        ref_images = load_images(manifest, root, ev.ref_split, wanted_refs)
    ref_labels = ev.labels if ev.ref_labels is None else ev.ref_labels
    for name, fig in (
        ("recall_at_k", figures.recall_curve({prefix: ev.metrics})),
        ("retrieval", figures.retrieval_grid(query_images, ref_images, ev.labels, ref_labels, neighbours,
                                             queries, top)),
        ("tsne", figures.projection(ev.embeddings, ev.labels, seed=seed)),
    ):
        tracker.log_figure(fig, f"plots/{prefix}_{name}.png")
        plt.close(fig)


def open_tracking(cfg: Config) -> str | None:
    """The tracking URI, checked before any training: unreachable -> stop (or, if not required, go untracked)."""
    uri = cfg.tracking.uri
    assert uri is not None
    problem = tracking.check_reachable(uri)
    if problem is None:
        return uri
    if cfg.tracking.required:
        raise tracking.TrackingUnavailable(f"{problem}; nothing was trained. Start it, point MLFLOW_TRACKING_URI "
                                           "elsewhere, or set tracking.required=false to train untracked")
    log.warning("!!! %s: training WITHOUT tracking (tracking.required=false); nothing goes to MLflow !!!", problem)
    return None


def run_name(cfg: Config, variant: str | None = None) -> str:
    if cfg.train.name:
        return cfg.train.name
    return f"{variant or 'gdml'}-{cfg.loss.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def with_parts(cfg: Config, attention: bool, adversary: bool) -> Config:
    """The same config with the framework's two parts switched on or off (baseline = both off)."""
    model = cfg.model.model_copy(update={
        "attention": cfg.model.attention.model_copy(update={"enabled": attention}),
        "adversary": cfg.model.adversary.model_copy(update={"enabled": adversary}),
    })
    return cfg.model_copy(update={"model": model})


def variant_of(cfg: Config) -> str:
    att, adv = cfg.model.attention.enabled, cfg.model.adversary.enabled
    return {(False, False): "baseline", (True, False): "attention", (False, True): "adversary"}.get(
        (att, adv), "framework")


def train_and_evaluate(cfg: Config, local: bool = False, name: str | None = None, progress: bool = True,
                       tags: dict[str, str] | None = None, plots: bool = True) -> RunResult:
    """One training run followed by its zero-shot evaluation, all logged to one MLflow run."""
    cfg = resolve_paths(cfg)
    check_model(cfg)
    uri = open_tracking(cfg)
    manifest = shards.ensure(cfg.data)
    check_data(cfg, manifest, 1 if local else cfg.train.workers)
    variant = variant_of(cfg)
    name = name or run_name(cfg, variant)
    tracker = tracking.Tracker.open(uri, cfg.tracking.experiment, name,
                                    tags={"variant": variant, "mode": "local" if local else "ray", **(tags or {})})
    tracker.log_params(cfg.flat())
    tracker.log_dict(cfg.to_dict(), "config.yaml")
    started = time.perf_counter()
    try:
        checkpoint, history = fit(cfg, tracker, name, local, progress)
        seconds = time.perf_counter() - started
        ev = evaluate_checkpoint(checkpoint, cfg, manifest, "test", progress)
        metrics = ev.metrics
        tracker.log_metrics({"train_seconds": seconds})
        log_evaluation(tracker, ev, manifest, cfg.data.root, "test", plots=plots, seed=cfg.train.seed)
        tracker.log_artifacts(checkpoint, "checkpoint")
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end()
    return RunResult(name, tracker.run_id, tracker.uri, checkpoint, metrics, history, seconds)
