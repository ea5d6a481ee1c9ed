"""The per-worker training function: pure torch plus ``ray.train`` calls.

Ray Train runs it on every DDP rank; local mode (``ScalingConfig(num_workers=0)``) runs the very same
function in the driver process. The driver (``pipeline.launch``) passes a plain dict:

- ``cfg``: the resolved config; ``mlflow_uri`` / ``mlflow_run_id``: where rank 0 logs (None: untracked), from a
  background thread that never makes training wait; ``journal_dir``: where what it cannot send yet is kept;
- ``name``: the run's name; its checkpoints live in ``train.storage_path/name``;
- ``checkpoint_root``: local mode only, where checkpoints are written (Ray Train persists them otherwise);
- ``fault_marker``: a file that makes each injected fault happen once per run;
- ``epoch_gate`` (sweeps): a ``pipeline.pacing.EpochGate``; every rank waits at it before each epoch until the
  trial lets that epoch start (so that a trial stopped at a rung trains no further);
- ``trace_dir`` (tests): each rank writes there the labels of every batch it trained on, the devices its
  parameters and batches were on, its process id, and each epoch it completed;
- ``synthetic_batches`` (benchmarks): train on this many fixed random batches held in device memory instead of
  the stream, to measure the training path without data loading.

The function reads as its steps: set up the worker, its data and its model; resume if there is a checkpoint;
then per epoch train, validate (rank 0), checkpoint and report.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from pipeline.checkpoint import (
    NonFiniteLoss,
    checkpoint_dir_name,
    load_checkpoint,
    load_latest,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from pipeline.config import Config
from pipeline.data.shards import load_manifest
from pipeline.data.stream import (
    BalancedStream,
    epoch_units,
    held_out_classes,
    resolve_loader_workers,
    train_loader,
    without_classes,
)
from pipeline.data.transforms import normalize, train_augment, train_min_area
from pipeline.model.adversary import adversary_lambda
from pipeline.model.embedder import Embedder
from pipeline.objectives import MetricLoss, TrainModule
from pipeline.runtime import Runtime, worker_runtime
from pipeline.tracking import WORKER_JOURNAL, Tracker, fail_fast_http

STAGING_PREFIX = ".staging-"
"""Checkpoints on their way to Ray Train's storage are written in ``<journal_dir>/.staging-*`` first."""
EPOCH_SUMS = ("loss", "loss_dml", "loss_adv", "adv_acc", "adv_grad_norm", "dml_grad_norm")


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

    config: dict[str, Any]
    cfg: Config
    rank: int
    world: int
    run: Runtime
    manifest: dict[str, Any]
    num_train_classes: int
    val_classes: set[int]
    stream: BalancedStream
    loader: Any
    steps: int
    """Steps per epoch, the same on every rank."""
    module: TrainModule
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    tracker: Tracker
    ddp_module: torch.nn.Module | None = None
    skipped_steps: int = 0
    ramp_steps: int = 0
    """The adversary ramp's horizon in steps: fixed when the run starts and kept when it is resumed with more
    epochs (lambda then stays at its final value), so resuming never changes lambda for steps already planned."""
    adv_acc_ema: float | None = None
    warmup_done_at: float | None = None
    """warmup schedule: the training progress at which the head rose above chance (None while it has not)."""
    batch_devices: set[str] | None = None
    """Devices the batches were moved to (traced runs only)."""
    validation_device: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def device(self) -> torch.device:
        return self.run.device

    @property
    def total_steps(self) -> int:
        return self.steps * self.cfg.train.epochs

    def adversary_lambda(self, step: int) -> float:
        adv = self.cfg.model.adversary
        if not adv.enabled:
            return 0.0
        return adversary_lambda(adv.weight, adv.schedule, step / max(1, self.ramp_steps - 1), self.warmup_done_at)

    def track_warmup(self, accuracy: float, step: int) -> None:
        """warmup schedule: a running mean of the head's accuracy (the same on every rank) against chance."""
        adv = self.cfg.model.adversary
        if adv.schedule != "warmup" or self.warmup_done_at is not None:
            return
        self.adv_acc_ema = accuracy if self.adv_acc_ema is None else 0.9 * self.adv_acc_ema + 0.1 * accuracy
        if self.adv_acc_ema > adv.warmup_factor / self.num_train_classes:
            self.warmup_done_at = step / max(1, self.ramp_steps - 1)

    def resume_state(self) -> dict:
        return {"ramp_steps": self.ramp_steps, "adv_acc_ema": self.adv_acc_ema, "warmup_done_at": self.warmup_done_at}


def setup_worker(config: dict[str, Any]) -> Worker:
    """Threads, seeds and hardware choice; the rank's share of the data; the model, optimiser and tracker."""
    cfg = Config.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.train.cpus_per_worker)
    seed_everything(cfg.train.seed)  # same initial weights on every rank (DDP also broadcasts them)
    run = worker_runtime(cfg.train.device, cfg.train.amp, cfg.train.channels_last, local=config.get("local", False))
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = run.device.type == "cuda" and not cfg.train.deterministic  # fixed shapes

    manifest = load_manifest(cfg.data.root)
    num_train_classes = manifest["splits"]["train"]["classes"]
    val_classes = held_out_classes(manifest, cfg)
    units = epoch_units(without_classes(manifest["splits"]["train"]["shards"], val_classes), cfg.sampler.epoch,
                        cfg.sampler.images_per_class)
    loader_workers = resolve_loader_workers(cfg.sampler, cfg.train.cpus_per_worker, units, world)
    stream = BalancedStream(manifest, cfg.data.root, cfg.sampler, train_augment(cfg.augment, cfg.data.image_size),
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
    tracker = Tracker(config.get("mlflow_uri"), config.get("mlflow_run_id"), journal_dir=config.get("journal_dir"),
                      background=True, journal_name=WORKER_JOURNAL) if rank == 0 else Tracker(None, None)
    if rank == 0:
        tracker.log_params({"runtime.device": str(run.device), "runtime.describe": run.describe(),
                            "runtime.world_size": world, "runtime.loader_workers": loader_workers})
        # (not print: Ray Train patches print in its workers to log the line as well, which shows it twice)
        sys.stdout.write(f"gdml: training on {run.describe()}" + (f", {world} workers\n" if world > 1 else "\n"))
        sys.stdout.flush()
    loader = train_loader(stream, run.pin_memory)
    if config.get("synthetic_batches"):
        loader = synthetic_batches(config["synthetic_batches"], cfg, num_train_classes, run.device)
        steps = cfg.train.max_steps_per_epoch or config["synthetic_batches"]
    return Worker(config, cfg, rank, world, run, manifest, num_train_classes, val_classes, stream,
                  loader, steps, module, build_optimizer(module, cfg),
                  torch.amp.GradScaler(run.device_type, enabled=run.grad_scaler), tracker,
                  ramp_steps=steps * cfg.train.epochs, batch_devices=set() if config.get("trace_dir") else None)


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


def resume(w: Worker) -> tuple[int, int]:
    """(first epoch, global step) from the newest checkpoint: the one Ray Train restarted the group with (a lost
    worker), or the newest in the run's storage (the same run name again; or a checkpoint a rank had written
    before the failure that Ray Train had not registered yet). (0, 0) for a fresh run."""
    candidates = []
    restarted = ray.train.get_checkpoint()
    if restarted is not None:
        with restarted.as_directory() as directory:
            candidates.append(load_checkpoint(directory))
    stored = load_latest(w.cfg.train.storage_path, w.config["name"]) if w.config.get("name") else None
    if stored is not None:
        candidates.append(stored[1])
    if not candidates:
        return 0, 0
    state = max(candidates, key=lambda s: s["epoch"])
    w.module.embedder.load_state_dict(state["model"])
    w.module.metric_loss.load_state_dict(state["loss"])
    w.optimizer.load_state_dict(state["optimizer"])
    w.scaler.load_state_dict(state["scaler"])
    per_rank = state.get("rng_per_rank") or []
    set_rng_state(per_rank[w.rank] if len(per_rank) == w.world else state["rng"])  # each rank its own RNG
    w.skipped_steps = int(state["metrics"].get("skipped_steps", 0))
    loop = state.get("loop", {})
    w.ramp_steps = int(loop.get("ramp_steps", w.ramp_steps))
    w.adv_acc_ema, w.warmup_done_at = loop.get("adv_acc_ema"), loop.get("warmup_done_at")
    # Exactly once: the epoch of this checkpoint was reported; its metrics are logged unless MLflow has them
    # (the crash may have come between the checkpoint and the log).
    w.tracker.log_metrics(_mlflow_metrics(state["metrics"]), step=state["epoch"], once=True)
    return state["epoch"], state["step"]


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
    marker = w.config.get("fault_marker")
    if f.crash_step == step and f.crash_rank == w.rank and marker and not os.path.exists(marker):
        Path(marker).parent.mkdir(parents=True, exist_ok=True)
        Path(marker).write_text(f"rank {w.rank} crashed at step {step}\n")
        os._exit(17)  # a lost worker: the process dies without a word


def train_step(w: Worker, images: torch.Tensor, labels: torch.Tensor, lam: float, where: str, global_step: int
               ) -> dict[str, float] | None:
    """One optimisation step (AMP, gradient scaling, the NaN policy); the step's loss terms, None if skipped.

    The device is synchronised once per step: for the values that decide whether the step is applied (a NaN/inf
    on any rank skips or stops it everywhere), which are also the values logged.
    """
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
    if w.cfg.fault.nan_step == global_step and w.cfg.fault.nan_rank in (None, w.rank):
        loss = loss * float("nan")
    w.optimizer.zero_grad(set_to_none=True)
    w.scaler.scale(loss).backward()  # under DDP the gradients are all-reduced here: the same on every rank
    w.scaler.unscale_(w.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(w.module.parameters(), float("inf"))
    zero = loss.new_zeros(())
    norms = w.module.embedder.grad_norms  # at the adversary's input, per path (scaled like the loss)
    values = torch.stack([loss.detach(), loss_dml.detach(),
                          zero if loss_adv is None else loss_adv.detach().float(),
                          zero if logits is None else (logits.argmax(1) == labels).float().mean(),
                          grad_norm.detach().float(), norms.get("adv", zero), norms.get("dml", zero)])
    checked = (("loss_dml", 1), ("loss_adv", 2), ("loss", 0))
    if not w.run.grad_scaler:  # fp16: the scaler skips steps whose gradients overflowed
        checked += (("gradient norm", 4),)
    bad = (~torch.isfinite(values[[i for _, i in checked]])).any().float()
    shared = torch.stack([bad, values[3]])  # the NaN decision and the head's accuracy, the same on every rank
    if w.distributed:
        dist.all_reduce(shared)
        shared[1] /= w.world
    host, (bad_anywhere, accuracy) = values.tolist(), shared.tolist()
    if w.run.grad_scaler:  # the gradient norms were taken on the scaled loss
        scale = w.scaler.get_scale()
        host[5], host[6] = host[5] / scale, host[6] / scale
    if bad_anywhere:
        terms = [name for name, i in checked if not math.isfinite(host[i])]
        if w.cfg.train.nonfinite == "stop":
            raise NonFiniteLoss(f"non-finite {' and '.join(terms) or 'loss on another rank'} at {where}; "
                                "no checkpoint was written from it (train.nonfinite=skip skips such steps)")
        w.skipped_steps += 1
        w.optimizer.zero_grad(set_to_none=True)
        w.scaler.update()
        return None
    w.scaler.step(w.optimizer)  # with fp16, skips steps whose gradients overflowed
    w.scaler.update()
    out = {"loss": host[0], "loss_dml": host[1]}
    if loss_adv is not None:
        out.update(loss_adv=host[2], adv_acc=host[3], adv_grad_norm=host[5], dml_grad_norm=host[6])
        w.track_warmup(accuracy, global_step)
    return out


def train_epoch(w: Worker, epoch: int, step: int) -> tuple[dict[str, float], int]:
    """One epoch on this rank's share: (epoch metrics averaged over ranks, global step after it)."""
    adv = w.cfg.model.adversary
    w.stream.set_epoch(epoch)
    w.ddp_module.train()
    sums = dict.fromkeys(EPOCH_SUMS, 0.0)
    started = time.perf_counter()
    bar = _progress(w.steps, f"epoch {epoch + 1}/{w.cfg.train.epochs}",
                    w.rank == 0 and w.config.get("progress", True), w.config.get("local", False))
    seen, applied, lam = 0, 0, 0.0
    traced: list[list[int]] = []
    for images, labels in w.loader:
        if seen >= w.steps:
            break
        _inject_crash(w, step + 1)
        lam = w.adversary_lambda(step)
        where = f"epoch {epoch + 1}, step {seen + 1} (global step {step + 1})"
        terms = train_step(w, images, labels, lam, where, step + 1)
        if terms is not None:
            applied += 1
            for key, value in terms.items():
                sums[key] += value
        if w.config.get("trace_dir"):
            traced.append(labels.tolist())
        seen += 1
        step += 1
        if bar is not None:
            bar.update(1)
            if terms is not None and seen % 10 == 1:
                bar.set_description(f"epoch {epoch + 1}/{w.cfg.train.epochs} loss {terms['loss']:.3f}")
    if bar is not None:
        bar.close()
    if seen != w.steps:
        raise RuntimeError(f"rank {w.rank} took {seen} steps in epoch {epoch + 1}, expected {w.steps}")
    if w.config.get("trace_dir"):
        (Path(w.config["trace_dir"]) / f"rank{w.rank}-epoch{epoch + 1}.json").write_text(json.dumps(traced))
    metrics = _mean_across_ranks({k: v / max(1, applied) for k, v in sums.items()}, w)
    metrics.update(epoch=epoch + 1, steps=seen, adv_lambda=lam, epoch_seconds=time.perf_counter() - started,
                   skipped_samples=w.stream.stats.skipped, reused_units=w.stream.stats.reused_units,
                   skipped_steps=w.skipped_steps)
    if adv.enabled:
        metrics.update(adv_chance=1.0 / w.num_train_classes,
                       adv_grad_ratio=metrics["adv_grad_norm"] / max(metrics["dml_grad_norm"], 1e-12))
        if adv.schedule == "warmup":
            metrics["adv_warmup_done_at"] = -1.0 if w.warmup_done_at is None else w.warmup_done_at
    else:
        for key in ("loss_adv", "adv_acc", "adv_lambda", "adv_grad_norm", "dml_grad_norm"):
            metrics.pop(key)
    return metrics, step


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
        out = validation_metrics(w.module.embedder, w.manifest, w.cfg.data.root, w.val_classes, w.cfg.eval,
                                 w.cfg.data.image_size, w.cfg.train.seed)
    if w.cfg.eval.gap_images:
        started = time.perf_counter()
        out.update(gap_metrics(w.module.embedder, w.manifest, w.cfg.data.root, w.cfg.eval, w.cfg.data.image_size,
                               w.cfg.train.seed, w.val_classes, out))
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


def report(w: Worker, metrics: dict[str, float], epoch: int, step: int) -> None:
    """Every rank reports once per epoch (a barrier); rank 0 attaches the checkpoint (with every rank's RNG
    state), then logs to MLflow (after the checkpoint: see ``resume``)."""
    if w.rank != 0:
        _gather_rng(w)
        ray.train.report(metrics)
        return
    rng_per_rank = _gather_rng(w)
    keep = w.config.get("checkpoint_root")  # local mode: checkpoints stay where they are written
    name = checkpoint_dir_name(epoch)
    # else staged beside the run's journal (a local folder in every mode: a rank killed mid-report leaves its
    # staging there, where the next start of the run removes it, not in the machine's temp folder)
    staging = Path(w.config["journal_dir"]) if w.config.get("journal_dir") else None
    if staging is not None:
        staging.mkdir(parents=True, exist_ok=True)
    directory = Path(keep) / name if keep else Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=staging)) / name
    save_checkpoint(directory, w.module, w.optimizer, w.scaler, w.cfg, w.num_train_classes, epoch, step, metrics,
                    extra={"runtime": {"device": str(w.device), "describe": w.run.describe(), "world_size": w.world},
                           "loop": w.resume_state(), "rng_per_rank": rng_per_rank})
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
                     checkpoint_dir_name=name)
    if not keep:
        shutil.rmtree(directory.parent, ignore_errors=True)
    w.tracker.log_metrics(_mlflow_metrics(metrics), step=epoch, once=True)


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
    w = setup_worker(config)
    trace = Path(config["trace_dir"]) if config.get("trace_dir") else None
    if trace:
        (trace / f"rank{w.rank}.pid").write_text(str(os.getpid()))
    first_epoch, step = resume(w)
    distribute(w)
    gate = config.get("epoch_gate")
    for epoch in range(first_epoch, w.cfg.train.epochs):
        _pause(w, epoch)
        if gate is not None:
            w.tracker.drain(timeout=10.0)  # the epoch before is in MLflow (or the journal) before Tune may stop us
            ray.get(gate.wait.remote(epoch))
        metrics, step = train_epoch(w, epoch, step)
        if trace:  # written before the checkpoint exists: a loss after it cannot hide a trained epoch
            with (trace / f"rank{w.rank}-epochs.log").open("a") as f:
                f.write(f"{epoch + 1}\n")
        metrics.update(validate(w))
        report(w, metrics, epoch + 1, step)
        if trace:
            _trace_devices(w)
    w.tracker.close(timeout=10.0)  # what is still unsent stays in the worker's journal: the driver takes it over


def _trace_devices(w: Worker) -> None:
    """Where this rank's parameters, batches and validation ran (tests on GPU machines read it)."""
    (Path(w.config["trace_dir"]) / f"rank{w.rank}-devices.json").write_text(json.dumps({
        "decided": str(w.device), "batches": sorted(w.batch_devices), "validation": w.validation_device,
        "parameters": sorted({str(p.device) for p in w.module.parameters()})}))
