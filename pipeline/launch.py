"""The driver side of one training run: data, checks, Ray Train (or local mode), evaluation, MLflow.

Nothing here runs on a worker; the per-worker function lives in ``pipeline.train``.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import tracking
from pipeline.checkpoint import latest_checkpoint, load_latest
from pipeline.config import Config, ConfigError
from pipeline.data import shards
from pipeline.errors import GdmlError, TrainingFailed
from pipeline.paths import absolute, is_remote
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


def resolve_paths(cfg: Config) -> Config:
    """Absolute paths for everything a worker touches (Ray workers run in their own directories)."""
    data = cfg.data.model_copy(update={"root": absolute(cfg.data.root),
                                       "path": absolute(cfg.data.path) if cfg.data.path else None})
    train = cfg.train.model_copy(update={"storage_path": absolute(cfg.train.storage_path)})
    tracking_cfg = cfg.tracking.model_copy(update={"uri": tracking.resolve_uri(cfg.tracking)})
    return cfg.model_copy(update={"data": data, "train": train, "tracking": tracking_cfg})


def check_model(cfg: Config) -> None:
    """Config checks that need the backbone or the loss (still before any work)."""
    from pipeline.model.backbone import check_taps
    from pipeline.model.embedder import resolved_taps
    from pipeline.objectives import check_params

    if cfg.model.attention.enabled:
        taps = resolved_taps(cfg.model, cfg.data.image_size)
        if not taps:
            raise ConfigError("model.attention.taps: empty; name at least one layer "
                              "(or set model.attention.enabled=false)")
        problem = check_taps(cfg.model.backbone, taps, cfg.data.image_size)
        if problem:
            raise ConfigError(f"model.attention.taps: {problem}")
    adv = cfg.model.adversary
    if adv.enabled and adv.input == "taps" and not (cfg.model.attention.enabled and
                                                    resolved_taps(cfg.model, cfg.data.image_size)):
        raise ConfigError("model.adversary.input: taps needs the attention over taps on (model.attention.enabled)")
    problem = check_params(cfg.loss)
    if problem:
        raise ConfigError(f"loss.params: {problem}")
    pretrained = cfg.model.pretrained
    if pretrained and pretrained != "imagenet" and not Path(pretrained).is_file():
        raise ConfigError(f"model.pretrained: {pretrained} does not exist (expected 'imagenet' or a weights file)")
    if pretrained == "imagenet":
        from pipeline.model.backbone import backbone_spec

        problem = backbone_spec(cfg.model.backbone).imagenet_problem()
        if problem:
            raise ConfigError(f"model.pretrained: imagenet for {cfg.model.backbone}: {problem}")


def check_config(cfg: Config, local: bool) -> None:
    """Every check that needs no data, before any work: model, loss, weights, device, where checkpoints go."""
    check_model(cfg)
    check_device(cfg, local)
    if local and is_remote(cfg.train.storage_path):
        raise ConfigError(f"train.storage_path: local mode keeps checkpoints on a local path, got "
                          f"{cfg.train.storage_path}")


def prepare(cfg: Config, local: bool) -> tuple[Config, str | None, dict[str, Any]]:
    """Everything before training, in the order that does no work before it is known to be worth it: config
    checks, the tracking server, the data checks (on the shards, or on the plan of those to build), then the
    shards. (resolved config, tracking URI or None, manifest)."""
    cfg = resolve_paths(cfg)
    check_config(cfg, local)
    uri = open_tracking(cfg)
    check_data(cfg, shards.current_or_planned(cfg.data), 1 if local else cfg.train.workers)
    return cfg, uri, shards.ensure(cfg.data)


def check_device(cfg: Config, local: bool) -> None:
    """``train.device=cuda`` needs a GPU: in this process (local mode) or in the Ray cluster."""
    if cfg.train.device != "cuda":
        return
    if local:
        from pipeline.runtime import Capabilities, decide_device

        decide_device("cuda", Capabilities.detect())
        return
    import ray

    init_ray()
    if not ray.cluster_resources().get("GPU", 0):
        raise ConfigError("train.device: cuda was asked for, but the Ray cluster has no GPU "
                          "(set train.device=auto or cpu)")


def check_data(cfg: Config, manifest: dict[str, Any], world_size: int) -> None:
    """Checks that need the manifest: is there enough data for one batch on every rank and loader worker?"""
    from pipeline.data.stream import (
        batches_per_slot,
        epoch_units,
        held_out_classes,
        resolve_loader_workers,
        without_classes,
    )

    try:
        held_out = held_out_classes(manifest, cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    s = cfg.sampler
    classes = manifest["splits"]["train"]["classes"] - len(held_out)
    if classes < s.classes_per_batch:
        raise ConfigError(f"sampler.classes_per_batch: {s.classes_per_batch} classes per batch, but "
                          f"{cfg.data.root} has {classes} training classes")
    units = epoch_units(without_classes(manifest["splits"]["train"]["shards"], held_out), s.epoch, s.images_per_class)
    workers = max(1, resolve_loader_workers(s, cfg.train.cpus_per_worker, units, world_size))
    if batches_per_slot(units, world_size * workers, s.classes_per_batch, pad=False) == 0:
        unit = "classes" if s.epoch == "classes" else f"groups of {s.images_per_class} images"
        raise ConfigError(
            f"sampler.classes_per_batch: {s.classes_per_batch} per batch x {world_size} ranks x {workers} loader "
            f"workers needs at least {world_size * workers * s.classes_per_batch} {unit} per epoch; {cfg.data.root} "
            f"has {units} (fewer loader workers, ranks or classes per batch; or sampler.epoch=images)")


def _use_gpu(cfg: Config) -> bool:
    """Ask Ray for a GPU per worker: train.device=cuda, or auto on a cluster that has GPUs."""
    if cfg.train.device != "auto":
        return cfg.train.device == "cuda"
    import ray

    return bool(ray.cluster_resources().get("GPU", 0))


_INTERRUPT_ON_SIGTERM = False


def _terminate(signum: int, frame) -> None:  # noqa: ANN001 - signal handler signature
    raise KeyboardInterrupt(f"signal {signum}")


def interrupt_on_sigterm() -> None:
    """SIGTERM ends a run as Ctrl-C does (the MLflow run KILLED, Ray shut down). Ray's driver installs its own
    handler when it starts (which aborts the process), so ``init_ray`` puts this one back."""
    global _INTERRUPT_ON_SIGTERM
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
        _INTERRUPT_ON_SIGTERM = True


class RayConsole:
    """What reaches the console from Ray's processes: the workers' progress bars and gdml's own lines; Ray's own
    lines (Train's per-report INFO records, the controller's core-worker messages, raylet notes) go to the run's
    log file instead, whose path is printed once (outside a run they stay in Ray's own session logs only).
    ``verbose`` (``gdml -v``) shows everything, as Ray would."""

    verbose = False
    log_path: Path | None = None
    announced: set[str] = set()

    @classmethod
    def install(cls) -> None:
        """Wrap the function the Ray driver prints forwarded worker lines with (looked up at each call)."""
        import ray._private.worker as ray_worker
        from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

        original = ray_worker.print_worker_logs
        if getattr(original, "_gdml", False):
            return

        def route(data: dict, print_file: Any, ignore_prefix: bool = False) -> None:
            lines = data.get("lines", [])
            if cls.verbose:
                return original(data, print_file, ignore_prefix)
            shown = [line for line in lines if RAY_TQDM_MAGIC in line or "gdml:" in line]
            hidden = [line for line in lines if line not in shown]
            if hidden and cls.log_path is not None:
                try:
                    cls.log_path.parent.mkdir(parents=True, exist_ok=True)
                    with cls.log_path.open("a") as f:
                        f.writelines(f"({data.get('actor_name') or data.get('task_name') or ''} pid={data.get('pid')})"
                                     f" {line}\n" for line in hidden)
                except OSError:
                    pass
            if shown:
                original({**data, "lines": shown}, print_file, ignore_prefix)

        route._gdml = True
        ray_worker.print_worker_logs = route

    @staticmethod
    def clear_bars() -> None:
        """Forget the finished run's bars (Ray's bar manager would draw them again after every later line)."""
        from ray.experimental import tqdm_ray

        manager = tqdm_ray.instance()
        with manager.lock:
            manager.hide_bars()
            manager.bar_groups.clear()
            manager.in_hidden_state, manager.num_hides = False, 0

    @classmethod
    def for_run(cls, path: Path, progress: bool) -> None:
        cls.log_path = path
        if progress and not cls.verbose and str(path) not in cls.announced:
            cls.announced.add(str(path))
            print(f"gdml: Ray's own log lines for this run go to {path} (gdml -v shows them here)", flush=True)


def init_ray() -> None:
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(logging_level=logging.WARNING, log_to_driver=True)
        if _INTERRUPT_ON_SIGTERM:
            interrupt_on_sigterm()
    RayConsole.install()


def fit(cfg: Config, tracker: tracking.Tracker, name: str, local: bool, progress: bool = True,
        extra: dict[str, Any] | None = None, callbacks: list | None = None) -> tuple[str, list[dict]]:
    """Train with Ray Train (or in-process); returns the final checkpoint directory and the per-epoch metrics
    (in local mode the last epoch's only).

    A run whose storage already holds checkpoints (the same ``name``) resumes from the newest one.
    ``extra`` adds keys to the worker's config (e.g. ``trace_dir``, see ``pipeline.train``).
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    from pipeline.train import STAGING_PREFIX, train_loop_per_worker

    storage = cfg.train.storage_path
    for stale in journal_dir(cfg, name).glob(f"{STAGING_PREFIX}*"):  # a rank killed while it staged a checkpoint
        shutil.rmtree(stale, ignore_errors=True)
    resume_from = latest_checkpoint(storage, name)
    loop_config = {"cfg": cfg.to_dict(), "mlflow_uri": tracker.uri, "mlflow_run_id": tracker.run_id,
                   "progress": progress, "name": name, "local": local, "journal_dir": str(journal_dir(cfg, name)),
                   **(extra or {})}
    if resume_from:
        log.info("resuming %s from %s", name, resume_from)
    if not is_remote(storage):
        loop_config["fault_marker"] = str(Path(storage) / name / ".fault-injected")
    if local:
        loop_config["checkpoint_root"] = str(Path(storage) / name)
        if not RayConsole.verbose:  # Ray Train's own lines (local mode, every report): on the console with -v only
            logging.getLogger("ray.train").setLevel(logging.WARNING)
        scaling = ScalingConfig(num_workers=0)
    else:
        init_ray()
        RayConsole.for_run(journal_dir(cfg, name) / "ray.log", progress)
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
    try:
        result = trainer.fit()
    except TrainingFailedError as err:
        raise TrainingFailed(describe_failure(err, cfg, name)) from None
    finally:
        if not local:
            RayConsole.clear_bars()
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


def log_training_curves(tracker: tracking.Tracker, cfg: Config) -> None:
    """Per-epoch figures from the run's MLflow history: the generalisation gap and the adversary's state."""
    if not tracker.enabled:
        return
    from matplotlib import pyplot as plt

    from pipeline.evaluation.plots import epoch_curves

    keys = ["gap/seen_recall_at_1", "gap/unseen_recall_at_1", "gap/seen_map_at_r", "gap/unseen_map_at_r",
            "adv_acc", "adv_chance", "adv_lambda", "adv_grad_ratio"]
    try:
        history = {k: [(m.step, m.value) for m in sorted(tracker.client.get_metric_history(tracker.run_id, k),
                                                          key=lambda m: m.step)] for k in keys}
    except Exception as err:  # noqa: BLE001 - the curves are drawn from MLflow's history; without it, none
        log.warning("per-epoch figures left out: MLflow's history is not readable (%s)", type(err).__name__)
        return
    figures = []
    if history["gap/seen_recall_at_1"]:
        figures.append(("generalisation_gap", epoch_curves(
            history, [("Recall@1", keys[0:2]), ("MAP@R", keys[2:4])],
            "seen classes vs held-out classes, per epoch (the gap is their difference)")))
    if history["adv_acc"]:
        figures.append(("adversary", epoch_curves(
            history, [("head accuracy on training classes", ["adv_acc", "adv_chance"]), ("lambda", ["adv_lambda"]),
                      ("|reversed gradient| / |metric-loss gradient|", ["adv_grad_ratio"])],
            "the class adversary, per epoch")))
    for name, fig in figures:
        tracker.log_figure(fig, f"plots/{name}.png")
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
        ev = evaluate_checkpoint(checkpoint, cfg, manifest, "test", progress)
        tracker.log_params({"runtime.eval_device": ev.device})
        tracker.log_metrics({"train_seconds": seconds})
        log_evaluation(tracker, ev, manifest, cfg.data.root, "test", plots=plots, seed=cfg.train.seed,
                       image_size=cfg.data.image_size)
        if plots:
            log_training_curves(tracker, cfg)
        tracker.log_artifacts(checkpoint, "checkpoint")
    if tracker.unsent() and tracker.replay(cfg.tracking.outage_wait):
        log.warning("MLflow at %s did not answer: %d writes of this run are in %s; `gdml replay %s` sends them "
                    "(the checkpoint is safe in %s)", uri, tracker.unsent(), tracker.journal.path,
                    tracker.journal.path, checkpoint)
    return RunResult(name, tracker.run_id, tracker.uri, checkpoint, ev.metrics, seconds, ev.skipped)
