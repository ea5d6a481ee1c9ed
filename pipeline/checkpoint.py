"""Checkpoints: writing, reading, finding the newest, and loading a trained model from one (no Ray here).

A checkpoint is a directory ``checkpoint_epoch=NNNN`` holding ``model.pt``, loadable with ``weights_only=True``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import config as config_mod
from pipeline.config import Config, ConfigError
from pipeline.errors import GdmlError
from pipeline.paths import is_remote

CHECKPOINT_FILE = "model.pt"
CHECKPOINT_PREFIX = "checkpoint_epoch="


class NonFiniteLoss(GdmlError):
    """A NaN/inf loss, gradient or weight: the run stops (or the step is skipped) and no checkpoint is written."""


def checkpoint_dir_name(epoch: int) -> str:
    return f"{CHECKPOINT_PREFIX}{epoch:04d}"


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop draws from, as tensors and plain values (safe for ``weights_only`` loading):
    of the GPU, only this process's own device (a node may show another number of GPUs when the run resumes)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore ``rng_state()``; the GPU's where this process has one (older checkpoints hold one state per visible
    GPU: the first is taken)."""
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"][0]), state["python"][1]))
    np.random.set_state(("MT19937", state["numpy"][0].numpy().astype(np.uint32), state["numpy"][1], 0, 0.0))
    cuda = state.get("cuda")
    if cuda is not None and len(cuda) and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda if isinstance(cuda, torch.Tensor) else cuda[0])


def _lay_out_like_parameters(optimizer: torch.optim.Optimizer) -> None:
    """Each parameter's optimiser state on its device and in its memory layout: ``load_state_dict`` moves the
    state's device and dtype but keeps the saved strides, and a fused AdamW on a GPU needs the parameter's (a
    checkpoint written on the CPU, or under another ``channels_last``, has others)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    moved = torch.empty_like(p, dtype=value.dtype)
                    moved.copy_(value)
                    optimizer.state[p][key] = moved


class TrainState:
    """What a rank trains with and resumes from, saved and loaded whole (``state_dict`` / ``load_state_dict``): the
    module (embedder and the loss's own parameters), the optimiser, the gradient scaler, the adversary's schedule,
    every rank's RNGs, and where training is (epoch, global step, steps skipped). The stream's position is a
    function of the epoch (``BalancedStream.set_epoch``): the epoch restores it."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 schedule: Any = None) -> None:
        self.module, self.optimizer, self.scaler, self.schedule = module, optimizer, scaler, schedule
        self.epoch = self.step = self.skipped_steps = 0

    def state_dict(self, rng_per_rank: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return {"model": self.module.embedder.state_dict(), "loss": self.module.metric_loss.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": self.epoch, "step": self.step, "skipped_steps": self.skipped_steps,
                "loop": self.schedule.state_dict() if self.schedule is not None else {},
                "rng": rng_state(), "rng_per_rank": rng_per_rank or [rng_state()]}

    def load_state_dict(self, state: dict[str, Any], rank: int = 0, world: int = 1) -> None:
        """Everything back; each rank its own RNG state (dropout masks follow it) when the world is the same."""
        self.module.embedder.load_state_dict(state["model"])
        self.module.metric_loss.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        _lay_out_like_parameters(self.optimizer)
        if state["scaler"] or not self.scaler.is_enabled():  # (a bf16 or float32 run's scaler state is empty: an
            self.scaler.load_state_dict(state["scaler"])     # fp16 resume of it starts a fresh scale)
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", state.get("metrics", {}).get("skipped_steps", 0)))
        if self.schedule is not None:
            self.schedule.load_state_dict(state.get("loop", {}))
        per_rank = state.get("rng_per_rank") or []
        set_rng_state(per_rank[rank] if len(per_rank) == world else state["rng"])


def check_finite(module: torch.nn.Module, epoch: int) -> None:
    """Refuse to checkpoint NaN/inf weights."""
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise NonFiniteLoss(f"{name} holds NaN/inf at epoch {epoch}: not writing a checkpoint")


def save_checkpoint(directory: Path, state: TrainState, cfg: Config, num_train_classes: int,
                    metrics: dict[str, float], rng_per_rank: list[dict[str, Any]] | None = None,
                    extra: dict[str, Any] | None = None) -> None:
    """Write ``directory/model.pt``: the whole training state, the config, the epoch's metrics and ``extra`` (plain
    values, e.g. the runtime it ran on)."""
    check_finite(state.module, state.epoch)
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f".{CHECKPOINT_FILE}.partial"
    torch.save({**state.state_dict(rng_per_rank), "config": cfg.to_dict(), "num_train_classes": num_train_classes,
                "metrics": metrics, **(extra or {})}, partial)
    os.replace(partial, directory / CHECKPOINT_FILE)  # never a half-written model.pt, even if the process dies


def load_checkpoint(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The checkpoint in a directory: a local path or an object-store URI (``s3://``, ``gs://``)."""
    if is_remote(str(checkpoint_dir)):
        import io

        import pyarrow.fs

        fs, base = pyarrow.fs.FileSystem.from_uri(str(checkpoint_dir))
        with fs.open_input_stream(f"{base.rstrip('/')}/{CHECKPOINT_FILE}") as f:
            return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    path = Path(checkpoint_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint_dir}: no {CHECKPOINT_FILE} there (not a gdml checkpoint directory)")
    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_config(state: dict[str, Any], where: str | Path) -> Config:
    try:
        return config_mod.from_dict(state["config"])
    except ConfigError as err:
        raise ConfigError(f"{where}: its config does not fit this version of gdml ({err})") from None


def load_model(checkpoint_dir: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode on ``device``, its config, the raw checkpoint) of a checkpoint directory."""
    from pipeline.model.embedder import Embedder

    state = load_checkpoint(checkpoint_dir)
    cfg = checkpoint_config(state, Path(checkpoint_dir) / CHECKPOINT_FILE)
    model = Embedder(config_mod.with_values(cfg, {"model.pretrained": None}).model, state["num_train_classes"],
                     cfg.data.image_size)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg, state


def checkpoints(storage_path: str, name: str) -> list[str]:
    """A run's checkpoint directories holding a ``model.pt``, newest first (local path or s3:// / gs://)."""
    import pyarrow.fs

    remote = is_remote(storage_path)
    fs, base = pyarrow.fs.FileSystem.from_uri(storage_path) if remote else (pyarrow.fs.LocalFileSystem(), storage_path)
    run_dir = f"{base.rstrip('/')}/{name}"
    try:
        entries = fs.get_file_info(pyarrow.fs.FileSelector(run_dir, allow_not_found=True))
    except (OSError, FileNotFoundError):
        return []
    names = sorted(e.base_name for e in entries
                   if e.type == pyarrow.fs.FileType.Directory and e.base_name.startswith(CHECKPOINT_PREFIX))
    found = []
    for candidate in reversed(names):
        path = f"{run_dir}/{candidate}"
        if fs.get_file_info(f"{path}/{CHECKPOINT_FILE}").type == pyarrow.fs.FileType.File:
            found.append(f"{storage_path.rstrip('/')}/{name}/{candidate}" if remote else path)
    return found


def latest_checkpoint(storage_path: str, name: str) -> str | None:
    """The newest checkpoint directory of a run, if any."""
    found = checkpoints(storage_path, name)
    return found[0] if found else None


def load_latest(storage_path: str, name: str) -> tuple[str, dict[str, Any]] | None:
    """(directory, state) of the newest checkpoint that loads: one still being copied into storage when a process
    died (Ray Train's copy is not atomic) is passed over for the one before it."""
    for path in checkpoints(storage_path, name):
        try:
            return path, load_checkpoint(path)
        except Exception:  # noqa: BLE001 - a torn file: the previous checkpoint will do
            continue
    return None
