"""The driver side of one training run: data, checks, Ray Train (or local mode), evaluation, MLflow (the
per-worker function is ``pipeline.train``).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import tracking
from pipeline.checkpoint import latest_checkpoint, load_latest
from pipeline.config import Config
from pipeline.console import RayConsole, init_ray, interactive
from pipeline.errors import GdmlError, TrainingFailed
from pipeline.paths import is_remote
from pipeline.preflight import prepare
from pipeline.variants import variant_of

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    name: str
    run_id: str | None
    tracking_uri: str | None
    checkpoint: str
    metrics: dict[str, float]
    seconds: float = 0.0
    skipped: int = 0
    """Test images that could not be read (left out of the metrics)."""


def fit(cfg: Config, tracker: tracking.Tracker, name: str, local: bool, progress: bool = True,
        hooks: Any = None, epoch_gate: Any = None, callbacks: list | None = None) -> tuple[str, list[dict]]:
    """Train with Ray Train (or in-process); returns the final checkpoint directory and the per-epoch metrics
    (in local mode the last epoch's only).

    A run whose storage already holds checkpoints (the same ``name``) resumes from the newest one. ``hooks``
    (``pipeline.train.Hooks``): what tests and benchmarks hook into the ranks; ``epoch_gate``: a sweep trial's
    ``pipeline.pacing.EpochGate``.
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    from pipeline.restarts import RestartNotice
    from pipeline.train import STAGING_PREFIX, Hooks, WorkerArgs, train_loop_per_worker

    storage = cfg.train.storage_path
    for stale in journal_dir(cfg, name).glob(f"{STAGING_PREFIX}*"):  # a rank killed while it staged a checkpoint
        shutil.rmtree(stale, ignore_errors=True)
    resume_from = latest_checkpoint(storage, name)
    if resume_from:
        log.info("resuming %s from %s", name, resume_from)
    args = WorkerArgs(cfg, name, local, progress, interactive(), tracker.uri, tracker.run_id,
                      str(journal_dir(cfg, name)),
                      checkpoint_root=str(Path(storage) / name) if local else None,
                      fault_marker=None if is_remote(storage) else str(Path(storage) / name / ".fault-injected"),
                      epoch_gate=epoch_gate, hooks=hooks or Hooks())
    if local:
        if not RayConsole.verbose:  # Ray Train's own lines (local mode, every report): on the console with -v only
            logging.getLogger("ray.train").setLevel(logging.WARNING)
        scaling = ScalingConfig(num_workers=0)
    else:
        from pipeline import cluster as cluster_mod

        init_ray()
        cluster = cluster_mod.inspect(cfg)
        cluster_mod.check_fits(cfg, cluster)
        if progress:
            cluster_mod.announce(cfg, cluster)
        scaling = ScalingConfig(num_workers=cfg.train.workers, use_gpu=cluster_mod.use_gpu(cfg, cluster),
                                resources_per_worker={"CPU": cfg.train.cpus_per_worker})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"args": args},
        scaling_config=scaling,
        run_config=RunConfig(name=name, storage_path=storage,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             callbacks=[*(callbacks or []), RestartNotice(storage, name, cfg.train.max_failures)],
                             logging_config=LoggingConfig(log_level="WARNING")),
    )
    with contextlib.ExitStack() as stack:
        if not local:
            stack.enter_context(RayConsole.for_run(journal_dir(cfg, name) / "ray.log", progress))
            stack.callback(RayConsole.clear_bars)
        try:
            result = trainer.fit()
        except TrainingFailedError as err:
            raise TrainingFailed(describe_failure(err, cfg, name)) from None
    if is_remote(storage):  # evaluation and MLflow read a local copy
        checkpoint = result.checkpoint.to_directory() if result.checkpoint is not None else None
    else:
        checkpoint = latest_checkpoint(storage, name) or (result.checkpoint.path if result.checkpoint else None)
    if checkpoint is None:
        raise RuntimeError(f"run {name} finished without a checkpoint")
    history = []
    if result.metrics_dataframe is not None:
        history = result.metrics_dataframe.to_dict("records")
    elif result.metrics:  # local mode (Train V2 without workers) keeps no table of reports: the last one only
        history = [dict(result.metrics)]
    return checkpoint, history


def describe_failure(err: Exception, cfg: Config, name: str) -> str:
    """One line: what failed on which rank, how often Ray Train restarted, and the checkpoint to resume from."""
    failures = getattr(err, "worker_failures", None) or {}
    causes = []
    for rank, failure in sorted(failures.items()):
        cause = getattr(failure, "cause", None) or failure
        if isinstance(cause, GdmlError):
            causes.append(f"rank {rank}: {cause}")
        elif "died" in str(cause).lower() or any(word in type(cause).__name__ for word in ("Died", "HealthCheck")):
            causes.append(f"rank {rank}: its process died (killed, or out of memory)")
        else:
            lines = [line for line in str(cause).splitlines() if line.strip()]
            causes.append(f"rank {rank}: {type(cause).__name__}: {lines[-1] if lines else ''}")
    if not causes:
        lines = [line for line in str(err).splitlines() if line.strip()]
        causes.append(lines[-1] if lines else type(err).__name__)
    if any("no GPUs found" in c or "No CUDA GPUs are available" in c for c in causes):
        # Ray gave the workers GPUs, but torch there sees none: NCCL's set-up fails before gdml's own check runs
        from pipeline.runtime import unusable_gpu

        causes = [unusable_gpu(cfg.train.device, False, 1, False) or causes[0]]
    latest = load_latest(cfg.train.storage_path, name)
    if latest:
        resume = (f"the last checkpoint is {latest[0]} (epoch {latest[1]['epoch']}); run again with "
                  f"--set train.name={name} to resume from it")
    else:
        resume = f"no checkpoint was written; run again with --set train.name={name} to start over"
    message = (f"training {name} failed after {cfg.train.max_failures} restart(s) allowed by train.max_failures: "
               f"{'; '.join(causes)}; {resume}")
    return " ".join(message.split())


def journal_dir(cfg: Config, name: str) -> Path:
    """Where a run keeps the tracking writes its server has not taken yet: beside its checkpoints (local storage),
    else in the temp folder of the machine that runs the driver."""
    import tempfile

    storage = cfg.train.storage_path
    return Path(tempfile.gettempdir()) / "gdml-journals" / name if is_remote(storage) else Path(storage) / name


def run_name(cfg: Config, variant: str | None = None) -> str:
    if cfg.train.name:
        return cfg.train.name
    from pipeline.variants import slug

    return f"{slug(variant) if variant else 'gdml'}-{cfg.loss.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def train_and_evaluate(cfg: Config, local: bool = False, name: str | None = None, progress: bool = True,
                       tags: dict[str, str] | None = None, plots: bool = True) -> RunResult:
    """One training run followed by its zero-shot evaluation, all logged to one MLflow run."""
    cfg, uri, manifest = prepare(cfg, local)
    variant = variant_of(cfg)
    name = name or run_name(cfg, variant)
    from pipeline.evaluation.run import evaluate_checkpoint, log_evaluation

    journal = journal_dir(cfg, name)
    with tracking.Tracker.open(uri, cfg.tracking.experiment, name, journal_dir=journal,
                               tags={"variant": variant, "mode": "local" if local else "ray", **(tags or {})}
                               ) as tracker:
        from pipeline.evaluation.diagnostics import unseen_source

        tracker.log_params(cfg.flat())
        held_out = cfg.train.val_fraction > 0 or cfg.tune.folds > 1
        tracker.log_params({"gap.unseen": unseen_source(manifest, held_out, cfg.eval.gap_images)})
        tracker.log_dict(cfg.to_dict(), "config.yaml")
        started = time.perf_counter()
        checkpoint, _ = fit(cfg, tracker, name, local, progress)
        seconds = time.perf_counter() - started
        tracker.adopt(journal / tracking.WORKER_JOURNAL)  # what the training worker could not send
        tracker.log_inputs([manifest.split(split).dataset_input("test")  # after the training data sets
                            for split in ("test", "query", "gallery") if split in manifest.splits])
        ev = evaluate_checkpoint(checkpoint, cfg, manifest, "test", progress)
        tracker.log_params({"runtime.eval_device": ev.device})
        tracker.log_metrics({"train_seconds": seconds})
        log_evaluation(tracker, ev, manifest, "test", plots=plots, seed=cfg.train.seed,
                       image_size=cfg.data.image_size)
        if plots:
            from pipeline.evaluation.plots import log_training_curves

            log_training_curves(tracker)
        tracker.log_artifacts(checkpoint, "checkpoint")
    if tracker.unsent() and tracker.replay(cfg.tracking.outage_wait):
        log.warning("MLflow at %s did not answer: %d writes of this run are in %s; `gdml replay %s` sends them "
                    "(the checkpoint is safe in %s)", uri, tracker.unsent(), tracker.journal.path,
                    tracker.journal.path, checkpoint)
    return RunResult(name, tracker.run_id, tracker.uri, checkpoint, ev.metrics, seconds, ev.skipped)
