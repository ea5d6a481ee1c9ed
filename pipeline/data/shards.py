"""WebDataset tar shards plus ``manifest.json``: the on-disk form every run streams from.

Layout of a shard set::

    <root>/manifest.json
    <root>/train-00000.tar ...
    <root>/test-00000.tar ...

Each sample is ``<key>.png`` (the image), ``<key>.cls`` (the global class id) and ``<key>.json``
(class key and image key). All images of a class sit next to each other in one shard (a shard is only
closed at a class boundary), so the stream can form class-balanced batches without a global index;
the manifest lists, per shard, its ordered groups ``[class_id, count]``, which is what lets every rank
plan an equal share of an epoch without reading any data.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import webdataset as wds
from tqdm.auto import tqdm

from pipeline.config import DataConfig
from pipeline.data.sources import ClassItems, encode_png, iter_source

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SPLITS = ("train", "test")
_FIXED_MTIME = 0.0  # byte-identical shards for identical input


def source_params(cfg: DataConfig) -> dict[str, Any]:
    """What determines the shards' content: a manifest built with other values is rebuilt."""
    return {
        "source": cfg.source,
        "image_size": cfg.image_size,
        "styles": list(cfg.styles),
        "max_classes": cfg.max_classes,
        "train_fraction": cfg.train_fraction,
        "shard_max_samples": cfg.shard_max_samples,
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def split_classes(n_classes: int, train_fraction: float) -> int:
    """Number of training classes: the first ``train_fraction`` of the class order."""
    n_train = round(n_classes * train_fraction)
    if not 1 <= n_train < n_classes:
        raise ValueError(f"train_fraction {train_fraction} leaves no class for one split of {n_classes}")
    return n_train


def _write_split(
    root: Path, split: str, classes: list[tuple[int, ClassItems]], max_samples: int, progress: tqdm
) -> list[dict[str, Any]]:
    shards: list[dict[str, Any]] = []
    writer: wds.TarWriter | None = None
    current: dict[str, Any] = {}

    def close() -> None:
        nonlocal writer
        if writer is not None:
            writer.close()
            path = root / current["file"]
            current["sha256"] = _sha256(path)
            current["bytes"] = path.stat().st_size
            shards.append(current)
            writer = None

    for class_id, item in classes:
        images = []
        for image_key, load in item.images:
            try:
                images.append((image_key, encode_png(load())))
            except Exception as err:  # an unreadable image is left out, never fatal
                log.warning("left out %s/%s: %s", item.key, image_key, err)
        progress.update(1)
        if not images:
            continue
        if writer is None or current["samples"] >= max_samples:
            close()
            current = {"file": f"{split}-{len(shards):05d}.tar", "samples": 0, "groups": []}
            writer = wds.TarWriter(str(root / current["file"]), mtime=_FIXED_MTIME)
        for image_key, png in images:
            writer.write(
                {
                    "__key__": f"{item.key}_{image_key}",
                    "png": png,
                    "cls": str(class_id).encode(),
                    "json": json.dumps({"class": item.key, "image": image_key}).encode(),
                }
            )
        current["samples"] += len(images)
        current["groups"].append([class_id, len(images)])
    close()
    return shards


def build(cfg: DataConfig, root: str | Path | None = None) -> dict[str, Any]:
    """Draw the source into train/test shards and write the manifest (last, so a half build is not reused)."""
    out = Path(root or cfg.root).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    items = list(iter_source(cfg.source, image_size=cfg.image_size, styles=list(cfg.styles),
                             max_classes=cfg.max_classes))
    n_train = split_classes(len(items), cfg.train_fraction)
    classes = [
        {"id": i, "key": it.key, "name": it.name, "split": "train" if i < n_train else "test"}
        for i, it in enumerate(items)
    ]
    splits: dict[str, Any] = {}
    with tqdm(total=len(items), desc=f"shards {out.name}", unit="class") as progress:
        for split in SPLITS:
            chosen = [(c["id"], items[c["id"]]) for c in classes if c["split"] == split]
            shards = _write_split(out, split, chosen, cfg.shard_max_samples, progress)
            splits[split] = {
                "classes": sum(len(s["groups"]) for s in shards),
                "samples": sum(s["samples"] for s in shards),
                "shards": shards,
            }
    counts = {g[0]: g[1] for s in splits.values() for sh in s["shards"] for g in sh["groups"]}
    for c in classes:
        c["count"] = counts.get(c["id"], 0)
    manifest = {
        "format": FORMAT_VERSION,
        "params": source_params(cfg),
        "classes": classes,
        "splits": splits,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    log.info("built %s: %s", out, {k: (v["classes"], v["samples"]) for k, v in splits.items()})
    return manifest


def load_manifest(root: str | Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; build the shards first (gdml shards build)")
    return json.loads(path.read_text())


def is_current(root: str | Path, cfg: DataConfig) -> bool:
    """True when ``root`` holds a complete shard set built from the same source parameters."""
    try:
        manifest = load_manifest(root)
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    if manifest.get("format") != FORMAT_VERSION or manifest.get("params") != source_params(cfg):
        return False
    return all(
        (Path(root) / sh["file"]).is_file() and (Path(root) / sh["file"]).stat().st_size == sh["bytes"]
        for split in manifest["splits"].values()
        for sh in split["shards"]
    )


def ensure(cfg: DataConfig) -> dict[str, Any]:
    """Reuse the shards under ``cfg.root`` when they match the config; build them otherwise."""
    if is_current(cfg.root, cfg):
        log.info("reusing shards in %s", Path(cfg.root).resolve())
        return load_manifest(cfg.root)
    return build(cfg)


def verify(root: str | Path) -> list[str]:
    """Shard files whose sha256 differs from the manifest's (empty when all match)."""
    manifest = load_manifest(root)
    return [
        sh["file"]
        for split in manifest["splits"].values()
        for sh in split["shards"]
        if _sha256(Path(root) / sh["file"]) != sh["sha256"]
    ]
