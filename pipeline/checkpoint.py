"""Checkpoints: writing, reading, finding the newest, and loading a trained model from one.

No Ray, no training loop, no data pipeline here: the served model and ``gdml eval`` load models through this
module alone. A checkpoint is one directory ``checkpoint_epoch=NNNN`` holding ``model.pt``: tensors and plain
values only, loadable with ``torch.load(..., weights_only=True)``, which executes no code.
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
    """Every RNG the training loop draws from, as tensors and plain values (safe for ``weights_only`` loading)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"][0]), state["python"][1]))
    np.random.set_state(("MT19937", state["numpy"][0].numpy().astype(np.uint32), state["numpy"][1], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_finite(module: torch.nn.Module, epoch: int) -> None:
    """Refuse to checkpoint NaN/inf weights."""
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise NonFiniteLoss(f"{name} holds NaN/inf at epoch {epoch}: not writing a checkpoint")


def save_checkpoint(directory: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, cfg: Config, num_train_classes: int, epoch: int, step: int,
                    metrics: dict[str, float], extra: dict[str, Any] | None = None) -> None:
    """Write ``directory/model.pt``. ``module`` holds ``embedder`` and ``metric_loss`` (``objectives.TrainModule``).

    ``extra``: plain values the loop needs to resume exactly (e.g. the adversary ramp's horizon).
    """
    check_finite(module, epoch)
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f".{CHECKPOINT_FILE}.partial"
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
            **(extra or {}),
        },
        partial,
    )
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
    model = Embedder(cfg.model.model_copy(update={"pretrained": None}), state["num_train_classes"],
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
