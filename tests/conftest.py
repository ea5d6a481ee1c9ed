"""Shared fixtures: tiny emoji shards (built once per session) and a temporary MLflow store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline import config as config_mod
from pipeline.config import Config

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")

TINY = {
    "model.backbone": "timm/test_resnet",  # a 0.4M-parameter ResNet (timm's test model): small steps, small checkpoints
    "model.pretrained": "null",
    "model.attention.taps": "[layer2,layer3]",
    "data.max_classes": 48,
    "data.image_size": 32,
    "data.shard_max_samples": 20,  # several uneven shards per split
    "sampler.classes_per_batch": 4,
    "sampler.images_per_class": 3,
    "sampler.batch_size": 12,
    "model.embedding_size": 16,
    "model.attention.width": 16,
    "model.adversary.hidden": 32,
    "train.epochs": 1,
    "train.cpus_per_worker": 1,
}


def tiny_config(tmp: Path, **overrides: object) -> Config:
    """A config small enough for a unit test, rooted in ``tmp`` (shards may live elsewhere)."""
    values = {**TINY, "train.storage_path": str(tmp / "ray"), "tracking.uri": f"sqlite:///{tmp / 'mlflow.db'}",
              "tracking.experiment": "tests", **overrides}
    return config_mod.load(None, [f"{k}={v}" for k, v in values.items()])


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.data import shards

    root = tmp_path_factory.mktemp("shards") / "emoji"
    cfg = tiny_config(root.parent, **{"data.root": str(root)})
    shards.build(cfg.data)
    return root


@pytest.fixture()
def tiny_cfg(tmp_path: Path, tiny_shards: Path) -> Config:
    return tiny_config(tmp_path, **{"data.root": str(tiny_shards)})


RAY_SESSIONS = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray"
_BEFORE = pytest.StashKey[set]()


def _ray_sessions() -> set[Path]:
    return set(RAY_SESSIONS.glob("session_2*")) if RAY_SESSIONS.is_dir() else set()


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_BEFORE] = _ray_sessions()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remove the Ray session folders (logs, spilled objects) that this test session's Ray runtimes left; the
    temporary trees of passed tests go too (``tmp_path_retention_policy``), so a run leaves little under /tmp."""
    import shutil

    import psutil

    before = session.config.stash.get(_BEFORE, None)
    if before is None:
        return
    new = _ray_sessions() - before
    if not new:
        return
    in_use = set()  # a Ray started meanwhile by something else on this machine is still running: keep its folder
    for proc in psutil.process_iter(["cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        in_use |= {folder for folder in new if folder.name in line}
    for folder in new - in_use:
        shutil.rmtree(folder, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` need a CUDA device: skipped without one (``make gpu-check`` runs them on a GPU)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (make gpu-check runs these on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
