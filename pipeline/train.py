"""The per-worker training function: pure torch plus ``ray.train`` calls.

Ray Train runs it on every DDP rank; local mode (``ScalingConfig(num_workers=0)``) runs the very same
function in the driver process. The driver (``pipeline.launch``) passes a plain dict:

- ``cfg``: the resolved config; ``mlflow_uri`` / ``mlflow_run_id``: where rank 0 logs (None: untracked);
- ``checkpoint_root``: local mode only, where checkpoints are written (Ray Train persists them otherwise);
- ``resume_from``: the run's latest checkpoint directory, when it is run again under the same name;
- ``fault_marker``: a file that makes each injected fault happen once per run;
- ``trace_dir`` (tests): each rank writes the labels of every batch it trained on there.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import ray.train
import ray.train.torch
from pipeline import config as config_mod
from pipeline.config import Config, ConfigError
from pipeline.data.shards import load_manifest
from pipeline.data.stream import BalancedStream, train_loader, train_transform, validation_classes
from pipeline.model.adversary import adversary_lambda
from pipeline.model.embedder import Embedder
from pipeline.objectives import MetricLoss, TrainModule
from pipeline.runtime import Capabilities, choose
from pipeline.tracking import Tracker

CHECKPOINT_FILE = "model.pt"


class NonFiniteLoss(RuntimeError):
    pass


def checkpoint_dir_name(epoch: int) -> str:
    return f"checkpoint_epoch={epoch:04d}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from, as tensors and plain values (safe for ``weights_only`` loading)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": [list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2])],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"][0]), state["python"][1]))
    np.random.set_state(("MT19937", state["numpy"][0].numpy().astype(np.uint32), state["numpy"][1], 0, 0.0))


def build_optimizer(module: TrainModule, cfg: Config) -> torch.optim.Optimizer:
    """AdamW with one learning rate per part: backbone, heads, adversary, the loss's own parameters."""
    t = cfg.train
    rates = {"backbone": t.lr, "heads": t.lr_heads, "adversary": t.lr_adversary or t.lr_heads, "loss": t.lr_loss}
    parts = {**module.embedder.parameter_groups(), "loss": [p for p in module.metric_loss.parameters()]}
    groups = [{"params": params, "lr": rates[name], "name": name} for name, params in parts.items() if params]
    return torch.optim.AdamW(groups, weight_decay=t.weight_decay)


def save_checkpoint(directory: Path, module: TrainModule, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, epoch: int, step: int, cfg: Config, num_train_classes: int,
                    metrics: dict[str, float]) -> None:
    """Tensors and plain types only: loadable with ``torch.load(weights_only=True)``, which runs no code."""
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise NonFiniteLoss(f"{name} holds NaN/inf at epoch {epoch}: not writing a checkpoint")
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "model": module.embedder.state_dict(),
            "loss": module.metric_loss.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch,
            "step": step,
            "rng": rng_state(),
            "config": cfg.to_dict(),
            "num_train_classes": num_train_classes,
            "metrics": metrics,
        },
        directory / CHECKPOINT_FILE,
    )


def load_checkpoint(checkpoint_dir: str | Path) -> dict[str, Any]:
    return torch.load(Path(checkpoint_dir) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def load_model(checkpoint_dir: str | Path) -> tuple[Embedder, Config, dict[str, Any]]:
    """The trained model (eval mode, CPU), its config and the raw checkpoint of a checkpoint directory."""
    state = load_checkpoint(checkpoint_dir)
    try:
        cfg = config_mod.from_dict(state["config"])
    except ConfigError as err:
        raise ConfigError(f"{Path(checkpoint_dir) / CHECKPOINT_FILE}: its config does not fit this version of gdml "
                          f"({err})") from None
    model = Embedder(cfg.model.model_copy(update={"pretrained": None}), state["num_train_classes"],
                     cfg.data.image_size)
    model.load_state_dict(state["model"])
    return model.eval(), cfg, state


def _mean_across_ranks(values: dict[str, float], distributed: bool) -> dict[str, float]:
    if not distributed:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def _any_rank(flag: bool, distributed: bool) -> bool:
    if not distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", mininterval=2.0)


def _inject_crash(config: dict[str, Any], cfg: Config, rank: int, step: int) -> None:
    f = cfg.fault
    marker = config.get("fault_marker")
    if f.crash_step == step and f.crash_rank == rank and marker and not os.path.exists(marker):
        Path(marker).parent.mkdir(parents=True, exist_ok=True)
        Path(marker).write_text(f"rank {rank} crashed at step {step}\n")
        os._exit(17)  # a lost worker: the process dies without a word


def train_loop_per_worker(config: dict[str, Any]) -> None:
    cfg = Config.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    distributed = world > 1
    torch.set_num_threads(cfg.train.cpus_per_worker)
    seed_everything(cfg.train.seed)  # same initial weights on every rank (DDP also broadcasts them)
    run = choose(Capabilities.detect(), cfg.train.amp, cfg.train.channels_last)

    manifest = load_manifest(cfg.data.root)
    num_train_classes = manifest["splits"]["train"]["classes"]
    val_classes = validation_classes(manifest, cfg.train.val_fraction, cfg.train.seed)
    stream = BalancedStream(manifest, cfg.data.root, cfg.sampler, train_transform(cfg.augment, cfg.data.image_size),
                            rank=rank, world_size=world, seed=cfg.train.seed, exclude=val_classes)
    loader = train_loader(stream)
    steps = stream.steps_per_epoch()
    if cfg.train.max_steps_per_epoch:
        steps = min(steps, cfg.train.max_steps_per_epoch)
    total_steps = steps * cfg.train.epochs

    embedder = Embedder(cfg.model, num_train_classes, cfg.data.image_size)
    module = TrainModule(embedder, MetricLoss(cfg.loss, num_train_classes, cfg.model.embedding_size, world))
    if run.channels_last:
        module = module.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(module, cfg)
    scaler = torch.amp.GradScaler(run.device_type, enabled=run.grad_scaler)
    tracker = Tracker(config.get("mlflow_uri"), config.get("mlflow_run_id")) if rank == 0 else Tracker(None, None)

    start_epoch, step = 0, 0
    state = None
    restarted = ray.train.get_checkpoint()  # set after a worker was lost and Ray Train restarted the group
    if restarted is not None:
        with restarted.as_directory() as directory:
            state = load_checkpoint(directory)
    elif config.get("resume_from"):
        state = load_checkpoint(config["resume_from"])
    if state is not None:
        module.embedder.load_state_dict(state["model"])
        module.metric_loss.load_state_dict(state["loss"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        start_epoch, step = state["epoch"], state["step"]
        # Exactly once: the epoch of this checkpoint was reported; log its metrics if the crash came first.
        if start_epoch not in tracker.logged_steps("loss"):
            tracker.log_metrics(_mlflow_metrics(state["metrics"]), step=start_epoch)

    ddp_module = ray.train.torch.prepare_model(module) if distributed else module
    device = next(module.parameters()).device
    adv = cfg.model.adversary
    skipped_steps = 0
    for epoch in range(start_epoch, cfg.train.epochs):
        stream.set_epoch(epoch)
        ddp_module.train()
        sums = {"loss": 0.0, "loss_dml": 0.0, "loss_adv": 0.0, "adv_acc": 0.0}
        started = time.perf_counter()
        bar = _progress(steps, f"epoch {epoch + 1}/{cfg.train.epochs}", rank == 0 and config.get("progress", True))
        seen, applied = 0, 0
        traced: list[list[int]] = []
        lam = 0.0
        for images, labels in loader:
            if seen >= steps:
                break
            _inject_crash(config, cfg, rank, step + 1)
            images = images.to(device, non_blocking=True)
            if run.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = labels.to(device, non_blocking=True)
            lam = adversary_lambda(adv.weight, adv.schedule, step / max(1, total_steps - 1)) if adv.enabled else 0.0
            with run.autocast():
                loss_dml, loss_adv, logits = ddp_module(images, labels, lam)
            loss_dml = loss_dml.float()
            loss = loss_dml if loss_adv is None else loss_dml + loss_adv.float()
            if cfg.fault.nan_step == step + 1:
                loss = loss * float("nan")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # under DDP the gradients are all-reduced here: the same on every rank
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), float("inf"))
            bad_terms = [name for name, value in (("loss_dml", loss_dml), ("loss_adv", loss_adv), ("loss", loss))
                         if value is not None and not torch.isfinite(value.detach())]
            if not torch.isfinite(grad_norm) and not run.grad_scaler:
                bad_terms.append("gradient norm")
            if _any_rank(bool(bad_terms), distributed):
                where = f"epoch {epoch + 1}, step {seen + 1} (global step {step + 1})"
                if cfg.train.nonfinite == "stop":
                    raise NonFiniteLoss(f"non-finite {' and '.join(bad_terms) or 'loss on another rank'} at {where}; "
                                        "no checkpoint was written from it (train.nonfinite=skip skips such steps)")
                skipped_steps += 1
                optimizer.zero_grad(set_to_none=True)
                scaler.update()
            else:
                scaler.step(optimizer)  # with fp16, skips steps whose gradients overflowed
                scaler.update()
                applied += 1
                sums["loss"] += loss.item()
                sums["loss_dml"] += loss_dml.item()
                if loss_adv is not None:
                    sums["loss_adv"] += loss_adv.item()
                    sums["adv_acc"] += (logits.argmax(1) == labels).float().mean().item()
            if config.get("trace_dir"):
                traced.append(labels.tolist())
            seen += 1
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
        if bar is not None:
            bar.close()
        if seen != steps:
            raise RuntimeError(f"rank {rank} took {seen} steps in epoch {epoch + 1}, expected {steps}")
        if config.get("trace_dir"):
            trace = Path(config["trace_dir"]) / f"rank{rank}-epoch{epoch + 1}.json"
            trace.write_text(json.dumps(traced))
        metrics = _mean_across_ranks({k: v / max(1, applied) for k, v in sums.items()}, distributed)
        metrics.update(epoch=epoch + 1, steps=seen, adv_lambda=lam, epoch_seconds=time.perf_counter() - started,
                       skipped_samples=stream.stats.skipped, skipped_steps=skipped_steps)
        if not adv.enabled:
            for k in ("loss_adv", "adv_acc", "adv_lambda"):
                metrics.pop(k)
        if val_classes and rank == 0:  # computed once, on rank 0; the others wait at the report below
            from pipeline.evaluate import validation_metrics

            metrics.update(validation_metrics(module.embedder, manifest, cfg.data.root, val_classes,
                                              cfg.eval.recall_at, cfg.eval.batch_size, cfg.data.image_size,
                                              cfg.train.seed, cfg.eval.engine))
        _report(config, metrics, rank, module, optimizer, scaler, epoch + 1, step, cfg, num_train_classes)
        tracker.log_metrics(_mlflow_metrics(metrics), step=epoch + 1)  # after the checkpoint: see resume above


def _mlflow_metrics(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k != "epoch"}


def _report(config: dict[str, Any], metrics: dict[str, float], rank: int, module: TrainModule,
            optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, epoch: int, step: int, cfg: Config,
            num_train_classes: int) -> None:
    """Every rank reports once per epoch (a barrier); rank 0 attaches the checkpoint."""
    if rank != 0:
        ray.train.report(metrics)
        return
    keep = config.get("checkpoint_root")  # local mode: checkpoints stay where they are written
    name = checkpoint_dir_name(epoch)
    directory = Path(keep) / name if keep else Path(tempfile.mkdtemp(prefix="gdml-ckpt-")) / name
    save_checkpoint(directory, module, optimizer, scaler, epoch, step, cfg, num_train_classes, metrics)
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
                     checkpoint_dir_name=name)
    if not keep:
        shutil.rmtree(directory.parent, ignore_errors=True)
