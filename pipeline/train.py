"""The per-worker training function: pure torch plus ``ray.train`` calls.

Ray Train runs it on every DDP rank; local mode (``ScalingConfig(num_workers=0)``) runs the very same
function in the driver process. The driver (``pipeline.launch``) passes a plain dict:
``{"cfg": <config dict>, "mlflow_uri": ..., "mlflow_run_id": ..., "checkpoint_root": <dir or None>}``, and
optionally ``"trace_dir"``: each rank then writes the labels of every batch it trained on there (to check
how data was split across ranks).
"""

from __future__ import annotations

import json
import math
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
from pipeline import tracking
from pipeline import config as config_mod
from pipeline.config import Config, ConfigError
from pipeline.data.shards import load_manifest
from pipeline.data.stream import BalancedStream, train_loader, train_transform
from pipeline.model.adversary import adversary_lambda
from pipeline.model.embedder import Embedder
from pipeline.objectives import MetricLoss, TrainModule

CHECKPOINT_FILE = "model.pt"


class NonFiniteLoss(RuntimeError):
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(module: TrainModule, cfg: Config) -> torch.optim.Optimizer:
    """AdamW with one learning rate per part: backbone, heads, adversary, the loss's own parameters."""
    t = cfg.train
    rates = {"backbone": t.lr, "heads": t.lr_heads, "adversary": t.lr_adversary or t.lr_heads, "loss": t.lr_loss}
    parts = {**module.embedder.parameter_groups(), "loss": list(module.metric_loss.parameters())}
    groups = [{"params": params, "lr": rates[name], "name": name} for name, params in parts.items() if params]
    return torch.optim.AdamW(groups, weight_decay=t.weight_decay)


def save_checkpoint(directory: Path, module: TrainModule, optimizer: torch.optim.Optimizer, epoch: int,
                    cfg: Config, num_train_classes: int, metrics: dict[str, float]) -> None:
    """Tensors and plain types only: loadable with ``torch.load(weights_only=True)``."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "model": module.embedder.state_dict(),
            "loss": module.metric_loss.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "config": cfg.to_dict(),
            "num_train_classes": num_train_classes,
            "metrics": metrics,
        },
        directory / CHECKPOINT_FILE,
    )


def load_model(checkpoint_dir: str | Path) -> tuple[Embedder, Config, dict[str, Any]]:
    """The trained model (eval mode, CPU), its config and the raw checkpoint of a checkpoint directory."""
    path = Path(checkpoint_dir) / CHECKPOINT_FILE
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        cfg = config_mod.from_dict(state["config"])
    except ConfigError as err:
        raise ConfigError(f"{path}: its config does not fit this version of gdml ({err})") from None
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


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", mininterval=2.0)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    cfg = Config.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    distributed = world > 1
    torch.set_num_threads(cfg.train.cpus_per_worker)
    seed_everything(cfg.train.seed)  # same initial weights on every rank (DDP also broadcasts them)

    manifest = load_manifest(cfg.data.root)
    num_train_classes = manifest["splits"]["train"]["classes"]
    stream = BalancedStream(manifest, cfg.data.root, cfg.sampler, train_transform(cfg.augment, cfg.data.image_size),
                            rank=rank, world_size=world, seed=cfg.train.seed)
    loader = train_loader(stream)
    steps = stream.steps_per_epoch()
    if cfg.train.max_steps_per_epoch:
        steps = min(steps, cfg.train.max_steps_per_epoch)
    total_steps = steps * cfg.train.epochs

    embedder = Embedder(cfg.model, num_train_classes, cfg.data.image_size)
    module = TrainModule(embedder, MetricLoss(cfg.loss, num_train_classes, cfg.model.embedding_size, world))
    optimizer = build_optimizer(module, cfg)
    ddp_module = ray.train.torch.prepare_model(module) if distributed else module
    device = next(module.parameters()).device
    adv = cfg.model.adversary

    uri, run_id = config.get("mlflow_uri"), config.get("mlflow_run_id")
    log_to_mlflow = rank == 0 and uri and run_id
    step = 0
    for epoch in range(cfg.train.epochs):
        stream.set_epoch(epoch)
        ddp_module.train()
        sums = {"loss": 0.0, "loss_dml": 0.0, "loss_adv": 0.0, "adv_acc": 0.0}
        started = time.perf_counter()
        bar = _progress(steps, f"epoch {epoch + 1}/{cfg.train.epochs}", rank == 0 and config.get("progress", True))
        seen = 0
        traced: list[list[int]] = []
        for images, labels in loader:
            if seen >= steps:
                break
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            lam = adversary_lambda(adv.weight, adv.schedule, step / max(1, total_steps - 1)) if adv.enabled else 0.0
            loss_dml, loss_adv, logits = ddp_module(images, labels, lam)
            loss = loss_dml
            if loss_adv is not None:
                loss = loss + loss_adv
                sums["loss_adv"] += loss_adv.item()
                sums["adv_acc"] += (logits.argmax(1) == labels).float().mean().item()
            for term, value in (("loss_dml", loss_dml), ("loss", loss)):
                if not math.isfinite(value.item()):
                    raise NonFiniteLoss(f"{term} is {value.item()} at epoch {epoch + 1}, step {seen + 1} (rank {rank})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if config.get("trace_dir"):
                traced.append(labels.tolist())
            sums["loss"] += loss.item()
            sums["loss_dml"] += loss_dml.item()
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
        metrics = {k: v / max(1, seen) for k, v in sums.items()}
        metrics = _mean_across_ranks(metrics, distributed)
        metrics.update(epoch=epoch + 1, steps=seen, adv_lambda=lam, epoch_seconds=time.perf_counter() - started,
                       skipped_samples=stream.stats.skipped)
        if not adv.enabled:
            for k in ("loss_adv", "adv_acc", "adv_lambda"):
                metrics.pop(k)
        if log_to_mlflow:
            tracking.log_metrics(uri, run_id, {k: v for k, v in metrics.items() if k != "epoch"}, step=epoch + 1)
        _report(config, metrics, rank, module, optimizer, epoch, cfg, num_train_classes)


def _report(config: dict[str, Any], metrics: dict[str, float], rank: int, module: TrainModule,
            optimizer: torch.optim.Optimizer, epoch: int, cfg: Config, num_train_classes: int) -> None:
    """Every rank reports once per epoch (a barrier); rank 0 attaches the checkpoint."""
    if rank != 0:
        ray.train.report(metrics)
        return
    keep = config.get("checkpoint_root")  # local mode: checkpoints stay where they are written
    directory = Path(keep) / f"checkpoint_epoch={epoch + 1:04d}" if keep else Path(tempfile.mkdtemp(prefix="gdml-ckpt-"))
    save_checkpoint(directory, module, optimizer, epoch + 1, cfg, num_train_classes, metrics)
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)))
    if not keep:
        shutil.rmtree(directory, ignore_errors=True)
