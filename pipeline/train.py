"""The per-worker training function, on every DDP rank (local mode: in the driver): set up; resume from one
``TrainState``; per epoch train, validate (rank 0), checkpoint and report. It receives one :class:`WorkerArgs`.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from pipeline.checkpoint import (
    NonFiniteLoss,
    TrainState,
    checkpoint_dir_name,
    load_checkpoint,
    load_latest,
    rng_state,
    save_checkpoint,
)
from pipeline.config import Config
from pipeline.data.manifest import Manifest
from pipeline.data.shards import load_manifest
from pipeline.data.stream import BalancedStream, train_loader, training_plan
from pipeline.data.transforms import normalize, train_augment, train_min_area
from pipeline.model.adversary import Schedule
from pipeline.model.embedder import Embedder
from pipeline.objectives import MetricLoss, TrainModule
from pipeline.runtime import Runtime, worker_runtime
from pipeline.tracking import WORKER_JOURNAL, Tracker, fail_fast_http

STAGING_PREFIX = ".staging-"
"""Checkpoints on their way to Ray Train's storage are written in ``<journal_dir>/.staging-*`` first."""
EPOCH_SUMS = ("loss", "loss_dml", "loss_adv", "adv_acc", "adv_grad_norm", "dml_grad_norm")


@dataclass(frozen=True)
class Hooks:
    """What tests and benchmarks hook into a run's ranks; the default does nothing."""

    trace_dir: str | None = None
    """Each rank writes there the labels of every batch it trained on, the devices its parameters and batches were
    on, its process id, and each epoch it completed."""
    synthetic_batches: int = 0
    """Train on this many fixed random batches held in device memory instead of the stream (the training path
    without data loading)."""


@dataclass(frozen=True)
class WorkerArgs:
    """What the driver hands every rank."""

    cfg: Config
    """The resolved config (absolute paths)."""
    name: str
    """The run's name: its checkpoints live in ``train.storage_path/name``."""
    local: bool = False
    """One process (local mode), no Ray Train workers."""
    progress: bool = True
    bars: bool = True
    """With ``progress``: a live bar per epoch (a terminal), else one line per epoch (a log file)."""
    mlflow_uri: str | None = None
    mlflow_run_id: str | None = None
    """Where rank 0 logs (None: untracked), from a background thread that never makes training wait."""
    journal_dir: str | None = None
    """Where the tracking writes a server did not take yet wait; checkpoints are staged there too."""
    checkpoint_root: str | None = None
    """Local mode only: where checkpoints are written (Ray Train persists them otherwise)."""
    fault_marker: str | None = None
    """A file that makes each injected fault (``fault.*``) happen once per run."""
    epoch_gate: Any = None
    """Sweeps: a ``pipeline.pacing.EpochGate``; every rank waits at it before each epoch until the trial lets that
    epoch start (so that a trial stopped at a rung trains no further)."""
    hooks: Hooks = field(default_factory=Hooks)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(module: TrainModule, cfg: Config) -> torch.optim.Optimizer:
    """AdamW with one learning rate per part: backbone, heads, adversary, the loss's own parameters."""
    t = cfg.train
    rates = {"backbone": t.lr, "heads": t.lr_heads, "adversary": t.lr_adversary or t.lr_heads, "loss": t.lr_loss}
    parts = {**module.embedder.parameter_groups(), "loss": [p for p in module.metric_loss.parameters()]}
    groups = [{"params": params, "lr": rates[name], "name": name} for name, params in parts.items() if params]
    on_gpu = next(iter(module.parameters())).is_cuda
    return torch.optim.AdamW(groups, weight_decay=t.weight_decay, fused=True if on_gpu else None)


@dataclass
class Worker:
    """Everything one rank trains with."""

    args: WorkerArgs
    rank: int
    world: int
    run: Runtime
    manifest: Manifest
    num_train_classes: int
    val_classes: set[int]
    stream: BalancedStream
    loader: Any
    steps: int
    """Steps per epoch, the same on every rank."""
    state: TrainState
    tracker: Tracker
    ddp_module: torch.nn.Module | None = None
    batch_devices: set[str] | None = None
    """Devices the batches were moved to (traced runs only)."""
    validation_device: str | None = None

    @property
    def cfg(self) -> Config:
        return self.args.cfg

    @property
    def module(self) -> TrainModule:
        return self.state.module

    @property
    def schedule(self) -> Schedule:
        return self.state.schedule

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def device(self) -> torch.device:
        return self.run.device


def setup_worker(args: WorkerArgs) -> Worker:
    """Threads, seeds and hardware choice; the rank's share of the data; the model, optimiser and tracker."""
    cfg = args.cfg
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.train.cpus_per_worker)
    seed_everything(cfg.train.seed)  # same initial weights on every rank (DDP also broadcasts them)
    run = worker_runtime(cfg.train.device, cfg.train.amp, cfg.train.channels_last, local=args.local)
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = run.device.type == "cuda" and not cfg.train.deterministic  # fixed shapes

    manifest = load_manifest(cfg.data.root)
    num_train_classes = len(manifest.class_ids("train"))
    plan = training_plan(manifest, cfg, world)
    val_classes, loader_workers = plan.held_out, plan.loader_workers
    stream = BalancedStream(manifest, cfg.sampler, train_augment(cfg.augment, cfg.data.image_size),
                            rank=rank, world_size=world, seed=cfg.train.seed, exclude=val_classes,
                            loader_workers=loader_workers, min_area=train_min_area(cfg.augment, cfg.data.image_size),
                            verify=cfg.data.verify)
    steps = stream.steps_per_epoch()
    if cfg.train.max_steps_per_epoch:
        steps = min(steps, cfg.train.max_steps_per_epoch)

    embedder = Embedder(cfg.model, num_train_classes, cfg.data.image_size)
    embedder.measure_gradients = cfg.model.adversary.enabled  # the adversary's state, logged every epoch
    # The whole module (backbone, attention, embedding, adversary, the loss's proxies) on the one device.
    module = TrainModule(embedder, MetricLoss(cfg.loss, num_train_classes, cfg.model.embedding_size, world))
    module = module.to(run.device, memory_format=torch.channels_last if run.channels_last else torch.preserve_format)
    fail_fast_http()
    tracker = Tracker(args.mlflow_uri, args.mlflow_run_id, journal_dir=args.journal_dir, background=True,
                      journal_name=WORKER_JOURNAL) if rank == 0 else Tracker(None, None)
    if rank == 0:
        tracker.log_params({"runtime.device": str(run.device), "runtime.describe": run.describe(),
                            "runtime.world_size": world, "runtime.loader_workers": loader_workers})
        train_ids = set(manifest.class_ids("train")) - val_classes
        tracker.log_inputs([manifest.split("train", train_ids).dataset_input("training")] + (
            [manifest.split("train", val_classes).dataset_input("validation")] if val_classes else []))
        _say(f"training on {run.describe()}" + (f", {world} workers" if world > 1 else ""))
    loader = train_loader(stream, run.pin_memory)
    if args.hooks.synthetic_batches:
        loader = synthetic_batches(args.hooks.synthetic_batches, cfg, num_train_classes, run.device)
        steps = cfg.train.max_steps_per_epoch or args.hooks.synthetic_batches
    scaler = torch.amp.GradScaler(run.device_type, enabled=run.grad_scaler)
    state = TrainState(module, build_optimizer(module, cfg), scaler,
                       Schedule(cfg.model.adversary, num_train_classes, ramp_steps=steps * cfg.train.epochs))
    return Worker(args, rank, world, run, manifest, num_train_classes, val_classes, stream, loader, steps,
                  state, tracker, batch_devices=set() if args.hooks.trace_dir else None)


def synthetic_batches(count: int, cfg: Config, num_classes: int, device: torch.device) -> list:
    """``count`` fixed random P x m batches, created once on ``device`` (the loop cycles through them)."""
    g = torch.Generator().manual_seed(cfg.train.seed)
    s, p, m = cfg.data.image_size, cfg.sampler.classes_per_batch, cfg.sampler.images_per_class
    batches = []
    for _ in range(count):
        classes = torch.randperm(num_classes, generator=g)[:p]
        images = torch.randint(0, 256, (p * m, 3, s, s), dtype=torch.uint8, generator=g)
        batches.append((images.to(device), classes.repeat_interleave(m).to(device)))
    return _Cycle(batches)


class _Cycle:
    def __init__(self, items: list) -> None:
        self.items = items

    def __iter__(self):
        while True:
            yield from self.items


def resume(w: Worker) -> None:
    """Load the newest checkpoint into the rank's state: the one Ray Train restarted the group with (a lost
    worker), or the newest in the run's storage (the same run name again; or a checkpoint a rank had written
    before the failure that Ray Train had not registered yet). A fresh run starts at epoch 0."""
    candidates = []
    restarted = ray.train.get_checkpoint()
    if restarted is not None:
        with restarted.as_directory() as directory:
            candidates.append(load_checkpoint(directory))
    stored = load_latest(w.cfg.train.storage_path, w.args.name)
    if stored is not None:
        candidates.append(stored[1])
    if not candidates:
        return
    saved = max(candidates, key=lambda s: s["epoch"])
    w.state.load_state_dict(saved, w.rank, w.world)
    # Exactly once: the epoch of this checkpoint was reported; its metrics are logged unless MLflow has them
    # (the crash may have come between the checkpoint and the log).
    w.tracker.log_metrics(_mlflow_metrics(saved["metrics"]), step=saved["epoch"], once=True)


def distribute(w: Worker) -> None:
    """DDP over the ranks (gradients all-reduced in backward); one process trains the module as it is. The
    module is already on its device (the one decision), so Ray Train only wraps it."""
    w.ddp_module = ray.train.torch.prepare_model(w.module, move_to_device=False) if w.distributed else w.module


def _mean_across_ranks(values: dict[str, float], w: Worker) -> dict[str, float]:
    if not w.distributed:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=w.device)  # nccl: on the GPU
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def _say(line: str) -> None:
    """One ``gdml:`` line on the driver's console (the prefix lets it through ``RayConsole``). Not print: Ray Train
    patches print in its workers to log the line as well, which shows it twice."""
    sys.stdout.write(f"gdml: {line}\n")
    sys.stdout.flush()


def _progress(total: int, desc: str, enabled: bool, local: bool):
    """A bar for rank 0's epoch: drawn by the driver from a Ray worker (``tqdm_ray``: one live bar, not a line per
    update), by tqdm itself in local mode."""
    if not enabled:
        return None
    if local:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="step", mininterval=2.0)
    from ray.experimental.tqdm_ray import tqdm

    return tqdm(total=total, desc=desc, unit="step")


def _inject_crash(w: Worker, step: int) -> None:
    f = w.cfg.fault
    marker = w.args.fault_marker
    if f.crash_step == step and f.crash_rank == w.rank and marker and not os.path.exists(marker):
        Path(marker).parent.mkdir(parents=True, exist_ok=True)
        Path(marker).write_text(f"rank {w.rank} crashed at step {step}\n")
        os._exit(17)  # a lost worker: the process dies without a word


class StepTerms(NamedTuple):
    """One step's loss terms and gradient norms (host values, this rank's own, as logged)."""

    loss: float
    loss_dml: float
    loss_adv: float
    adv_acc: float
    grad_norm: float
    adv_grad_norm: float
    dml_grad_norm: float


def train_step(w: Worker, images: torch.Tensor, labels: torch.Tensor, lam: float, where: str) -> StepTerms | None:
    """One optimisation step (AMP, gradient scaling, the NaN policy); the step's terms, None if skipped.

    The device is synchronised once per step: for the values that decide whether the step is applied (a NaN/inf
    on any rank skips or stops it everywhere), which are also the values logged.
    """
    step, state = w.state.step + 1, w.state
    if w.batch_devices is not None:  # (traced: "pinned" when the loader handed over page-locked memory)
        w.batch_devices |= {"pinned"} if images.is_pinned() else set()
    images = normalize(images.to(w.device, non_blocking=True))  # uint8 from the stream: normalised on the device
    if w.run.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = labels.to(w.device, non_blocking=True)
    if w.batch_devices is not None:
        w.batch_devices |= {str(images.device), str(labels.device)}
    with w.run.autocast():
        loss_dml, loss_adv, logits = w.ddp_module(images, labels, lam)
    loss_dml = loss_dml.float()
    loss = loss_dml if loss_adv is None else loss_dml + loss_adv.float()
    if w.cfg.fault.nan_step == step and w.cfg.fault.nan_rank in (None, w.rank):
        loss = loss * float("nan")
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()  # under DDP the gradients are all-reduced here: the same on every rank
    state.scaler.unscale_(state.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(w.module.parameters(), float("inf"))
    zero = loss.new_zeros(())
    norms = w.module.embedder.grad_norms  # at the adversary's input, per path (scaled like the loss)
    on_device = StepTerms(loss.detach(), loss_dml.detach(), zero if loss_adv is None else loss_adv.detach().float(),
                          zero if logits is None else (logits.argmax(1) == labels).float().mean(),
                          grad_norm.detach().float(), norms.get("adv", zero), norms.get("dml", zero))
    # (fp16: the scaler itself skips steps whose gradients overflowed, so their norm is not checked)
    checked = ["loss_dml", "loss_adv", "loss"] + ([] if w.run.grad_scaler else ["grad_norm"])
    bad = (~torch.isfinite(torch.stack([getattr(on_device, name) for name in checked]))).any().float()
    shared = torch.stack([bad, on_device.adv_acc])  # the NaN decision and the head's accuracy, on every rank
    if w.distributed:
        dist.all_reduce(shared)
        shared[1] /= w.world
    terms = StepTerms(*torch.stack(list(on_device)).tolist())
    bad_anywhere, accuracy = shared.tolist()
    if w.run.grad_scaler:  # the gradient norms were taken on the scaled loss
        scale = state.scaler.get_scale()
        terms = terms._replace(adv_grad_norm=terms.adv_grad_norm / scale, dml_grad_norm=terms.dml_grad_norm / scale)
    if bad_anywhere:
        names = [n.replace("grad_norm", "gradient norm") for n in checked if not math.isfinite(getattr(terms, n))]
        if w.cfg.train.nonfinite == "stop":
            raise NonFiniteLoss(f"non-finite {' and '.join(names) or 'loss on another rank'} at {where}; "
                                "no checkpoint was written from it (train.nonfinite=skip skips such steps)")
        state.skipped_steps += 1
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.update()
        return None
    state.scaler.step(state.optimizer)  # with fp16, skips steps whose gradients overflowed
    state.scaler.update()
    if loss_adv is not None:
        w.schedule.observe(accuracy, step)
    return terms


def train_epoch(w: Worker, epoch: int) -> dict[str, float]:
    """One epoch on this rank's share (``w.state.step`` moves on): the epoch's metrics averaged over ranks."""
    adv = w.cfg.model.adversary
    hooks = w.args.hooks
    w.stream.set_epoch(epoch)
    w.ddp_module.train()
    sums = dict.fromkeys(EPOCH_SUMS, 0.0)
    started = time.perf_counter()
    shown = w.rank == 0 and w.args.progress
    bar = _progress(w.steps, f"epoch {epoch + 1}/{w.cfg.train.epochs}", shown and w.args.bars, w.args.local)
    seen, applied, lam = 0, 0, 0.0
    traced: list[list[int]] = []
    for images, labels in w.loader:
        if seen >= w.steps:
            break
        step = w.state.step + 1
        _inject_crash(w, step)
        lam = w.schedule.lam(w.state.step)
        terms = train_step(w, images, labels, lam, f"epoch {epoch + 1}, step {seen + 1} (global step {step})")
        if terms is not None:
            applied += 1
            for key in EPOCH_SUMS:
                sums[key] += getattr(terms, key)
        if hooks.trace_dir:
            traced.append(labels.tolist())
        seen += 1
        w.state.step = step
        if bar is not None:
            bar.update(1)
            if terms is not None and seen % 10 == 1:
                bar.set_description(f"epoch {epoch + 1}/{w.cfg.train.epochs} loss {terms.loss:.3f}")
    if bar is not None:
        bar.close()
    if seen != w.steps:
        raise RuntimeError(f"rank {w.rank} took {seen} steps in epoch {epoch + 1}, expected {w.steps}")
    if hooks.trace_dir:
        (Path(hooks.trace_dir) / f"rank{w.rank}-epoch{epoch + 1}.json").write_text(json.dumps(traced))
    metrics = _mean_across_ranks({k: v / max(1, applied) for k, v in sums.items()}, w)
    metrics.update(epoch=epoch + 1, steps=seen, adv_lambda=lam, epoch_seconds=time.perf_counter() - started,
                   skipped_samples=w.stream.stats.skipped, reused_units=w.stream.stats.reused_units,
                   skipped_steps=w.state.skipped_steps)
    if shown and not w.args.bars:
        _say(f"{w.args.name} epoch {epoch + 1}/{w.cfg.train.epochs}: loss {metrics['loss']:.4f}, {seen} steps, "
             f"{metrics['epoch_seconds']:.1f} s")
    if adv.enabled:
        metrics.update(adv_chance=1.0 / w.num_train_classes,
                       adv_grad_ratio=metrics["adv_grad_norm"] / max(metrics["dml_grad_norm"], 1e-12))
        if adv.schedule == "warmup":
            done_at = w.schedule.warmup_done_at
            metrics["adv_warmup_done_at"] = -1.0 if done_at is None else done_at
    else:
        for key in ("loss_adv", "adv_acc", "adv_lambda", "adv_grad_norm", "dml_grad_norm"):
            metrics.pop(key)
    return metrics


def validate(w: Worker) -> dict[str, float]:
    """On rank 0 (the others wait at the report that follows): ``val/*`` metrics on the held-out training classes,
    and the generalisation gap (``gap/*``: seen classes beside held-out ones)."""
    if w.rank != 0:
        return {}
    from pipeline.evaluation.diagnostics import gap_metrics
    from pipeline.evaluation.embed import model_device
    from pipeline.evaluation.run import validation_metrics

    w.validation_device = str(model_device(w.module.embedder))
    out = {}
    if w.val_classes:
        out = validation_metrics(w.module.embedder, w.manifest.split("train", w.val_classes, w.cfg.data.verify),
                                 w.cfg.eval, w.cfg.data.image_size, w.cfg.train.seed, w.run)
    if w.cfg.eval.gap_images:
        started = time.perf_counter()
        out.update(gap_metrics(w.module.embedder, w.manifest, w.cfg.eval, w.cfg.data.image_size,
                               w.cfg.train.seed, w.val_classes, out, w.run))
        out["gap_seconds"] = time.perf_counter() - started  # what the diagnostic costs, beside epoch_seconds
    w.module.train()
    return out


def _gather_rng(w: Worker) -> list[dict[str, Any]]:
    """Every rank's RNG state (rank 0 gets the list): a rank's dropout masks follow its own RNG."""
    if not w.distributed:
        return [rng_state()]
    states: list[Any] = [None] * w.world
    dist.all_gather_object(states, rng_state())
    return states


def report(w: Worker, metrics: dict[str, float]) -> None:
    """Every rank reports once per epoch (a barrier); rank 0 attaches the checkpoint (the training state with every
    rank's RNG state), then logs to MLflow (after the checkpoint: see ``resume``)."""
    if w.rank != 0:
        _gather_rng(w)
        ray.train.report(metrics)
        return
    rng_per_rank = _gather_rng(w)
    keep = w.args.checkpoint_root  # local mode: checkpoints stay where they are written
    name = checkpoint_dir_name(w.state.epoch)
    # else staged beside the run's journal (a local folder in every mode: a rank killed mid-report leaves its
    # staging there, where the next start of the run removes it, not in the machine's temp folder)
    staging = Path(w.args.journal_dir) if w.args.journal_dir else None
    if staging is not None:
        staging.mkdir(parents=True, exist_ok=True)
    directory = Path(keep) / name if keep else Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=staging)) / name
    save_checkpoint(directory, w.state, w.cfg, w.num_train_classes, metrics, rng_per_rank, extra={
        "runtime": {"device": str(w.device), "describe": w.run.describe(), "world_size": w.world}})
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
                     checkpoint_dir_name=name)
    if not keep:
        shutil.rmtree(directory.parent, ignore_errors=True)
    w.tracker.log_metrics(_mlflow_metrics(metrics), step=w.state.epoch, once=True)


def _mlflow_metrics(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k != "epoch"}


def _pause(w: Worker, epoch: int) -> None:
    """``fault.pause_epoch``: wait before that epoch until ``fault.pause_file`` exists (see ``FaultConfig``)."""
    f = w.cfg.fault
    if f.pause_epoch != epoch + 1 or not f.pause_file or os.path.exists(f.pause_file):
        return
    Path(f"{f.pause_file}.rank{w.rank}").write_text(str(os.getpid()))
    while not os.path.exists(f.pause_file):
        time.sleep(0.05)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry: ``config["args"]`` is the run's :class:`WorkerArgs`."""
    args: WorkerArgs = config["args"]
    w = setup_worker(args)
    trace = Path(args.hooks.trace_dir) if args.hooks.trace_dir else None
    if trace:
        (trace / f"rank{w.rank}.pid").write_text(str(os.getpid()))
    resume(w)
    distribute(w)
    tracking = w.cfg.tracking
    with w.tracker.system_metrics(tracking.system_metrics_interval if tracking.system_metrics else None):
        for epoch in range(w.state.epoch, w.cfg.train.epochs):
            _pause(w, epoch)
            if args.epoch_gate is not None:
                w.tracker.drain(timeout=10.0)  # the epoch before is in MLflow (or the journal) before Tune may stop
                ray.get(args.epoch_gate.wait.remote(epoch))
            metrics = train_epoch(w, epoch)
            if trace:  # written before the checkpoint exists: a loss after it cannot hide a trained epoch
                with (trace / f"rank{w.rank}-epochs.log").open("a") as f:
                    f.write(f"{epoch + 1}\n")
            metrics.update(validate(w))
            w.state.epoch = epoch + 1
            report(w, metrics)
            if trace:
                _trace_devices(w, trace)
    w.tracker.close(timeout=10.0)  # what is still unsent stays in the worker's journal: the driver takes it over


def _trace_devices(w: Worker, trace: Path) -> None:
    """Where this rank's parameters, batches and validation ran, and how the ranks talk (tests on GPU machines
    read it)."""
    (trace / f"rank{w.rank}-devices.json").write_text(json.dumps({
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "decided": str(w.device), "batches": sorted(w.batch_devices), "validation": w.validation_device,
        "parameters": sorted({str(p.device) for p in w.module.parameters()})}))
