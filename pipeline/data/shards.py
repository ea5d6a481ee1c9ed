"""WebDataset tar shards plus ``manifest.json``: the on-disk form every run streams from.

Building is deterministic, parallel and resumable; a class's images sit together in one shard, and the manifest's
per-shard class groups let every rank plan its share without reading data. Details: docs/internals.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image
from tqdm.auto import tqdm

from pipeline.config import ConfigError, DataConfig
from pipeline.data.manifest import Manifest
from pipeline.data.sources import ClassItems, encode_png, iter_source
from pipeline.errors import GdmlError
from pipeline.paths import is_remote

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
_FIXED_MTIME = 0.0  # byte-identical shards for identical input


class ShardBuildError(GdmlError):
    """Building the shards failed (too many unreadable images, an empty source)."""


def source_params(cfg: DataConfig) -> dict[str, Any]:
    """What determines the shards' content: a manifest built with other values is rebuilt."""
    return {
        "source": cfg.source,
        "path": str(Path(cfg.path).resolve()) if cfg.path else None,
        "image_size": cfg.image_size if cfg.source == "emoji" else None,
        "styles": list(cfg.styles) if cfg.source == "emoji" else None,
        "max_classes": cfg.max_classes,
        "train_fraction": cfg.train_fraction,
        "train_classes": cfg.train_classes,
        "shard_max_samples": cfg.shard_max_samples,
        "max_side": cfg.max_side,
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
        raise ConfigError(f"data.train_fraction: {train_fraction} of {n_classes} classes leaves no class for the "
                          "training or the test split (a data set needs at least 2 classes)")
    return n_train


@lru_cache(maxsize=2)
def _items(params_json: str) -> list[ClassItems]:
    """The source's classes (cached per process: shard tasks in one worker share one listing)."""
    p = json.loads(params_json)
    return iter_source(p["source"], path=p["path"], image_size=p["image_size"] or 64, styles=p["styles"],
                       max_classes=p["max_classes"], train_classes=p["train_classes"])


def _class_splits(items: list[ClassItems], train_fraction: float) -> list[str]:
    if all(it.split is not None for it in items):
        return [str(it.split) for it in items]
    n_train = split_classes(len(items), train_fraction)
    return ["train" if i < n_train else "test" for i in range(len(items))]


def plan(cfg: DataConfig) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Classes (id, key, name, split) and, per split, the shards: files and the images each holds."""
    params = source_params(cfg)
    items = _items(json.dumps(params, sort_keys=True))
    if not items:
        raise ShardBuildError(f"data.path: the {cfg.source} source found no classes")
    splits_of_class = _class_splits(items, cfg.train_fraction)
    classes = [{"id": i, "key": it.key, "name": it.name, "split": sp}
               for i, (it, sp) in enumerate(zip(items, splits_of_class))]
    per_split: dict[str, list[tuple[int, list[int]]]] = {}
    for cid, (item, split) in enumerate(zip(items, splits_of_class)):
        by_split: dict[str, list[int]] = {}
        for j in range(len(item.images)):
            by_split.setdefault(item.image_splits[j] if item.image_splits else split, []).append(j)
        for s, idx in by_split.items():
            per_split.setdefault(s, []).append((cid, idx))
    shards: dict[str, list[dict[str, Any]]] = {}
    for split in sorted(per_split):
        current: dict[str, Any] | None = None
        for cid, idx in per_split[split]:
            if current is None or current["planned"] >= cfg.shard_max_samples:
                current = {"file": f"{split}-{len(shards.get(split, [])):05d}.tar", "planned": 0, "images": []}
                shards.setdefault(split, []).append(current)
            current["images"].append([cid, idx])
            current["planned"] += len(idx)
    return classes, shards


def planned_manifest(cfg: DataConfig) -> Manifest:
    """What the manifest will say (classes, splits, shards with their class groups), from the source's listing
    alone: checks run on it before anything is written. Counts are of images listed (unreadable ones are left out
    when building)."""
    classes, planned = plan(cfg)
    entries = {split: [{"file": sh["file"], "samples": sh["planned"],
                        "groups": [[cid, len(idx)] for cid, idx in sh["images"]]} for sh in shards]
               for split, shards in planned.items()}
    return Manifest(cfg.root, {**_contents(classes, entries), "params": source_params(cfg)})


def _contents(classes: list[dict[str, Any]], entries: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """A manifest's classes (with their image counts) and splits (class and image counts, shard entries), from
    each split's shard entries."""
    counts: dict[int, int] = {}
    for cid, n in (g for shards in entries.values() for sh in shards for g in sh["groups"]):
        counts[cid] = counts.get(cid, 0) + n
    return {"classes": [{**c, "count": counts.get(c["id"], 0)} for c in classes],
            "splits": {split: {"classes": len({g[0] for sh in shards for g in sh["groups"]}),
                               "samples": sum(sh["samples"] for sh in shards), "shards": shards}
                       for split, shards in entries.items()}}


def current_or_planned(cfg: DataConfig) -> Manifest:
    """The manifest of shards that are there and current (or remote), else the plan of those to build."""
    if is_remote(cfg.root) or is_current(cfg.root, cfg):
        return load_manifest(cfg.root)
    return planned_manifest(cfg)


def _encode(load: Any, max_side: int | None, drawn: bool) -> tuple[str, bytes]:
    """(extension, bytes): drawn images as PNG; files copied as they are unless re-encoded to ``max_side``."""
    img = load()  # decodes fully: unreadable or truncated images raise here
    path = getattr(load, "path", None)
    if max_side is None and path is not None and Path(path).suffix.lower() in (".jpg", ".jpeg", ".png"):
        return ("png" if Path(path).suffix.lower() == ".png" else "jpg"), Path(path).read_bytes()
    if drawn and max_side is None:
        return "png", encode_png(img)
    if max_side is not None and max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return "jpg", buf.getvalue()


def _record_path(out: Path, file: str) -> Path:
    return out / f"{file}.json"


def _plan_digest(shard: dict[str, Any], params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps([shard["images"], params], sort_keys=True).encode()).hexdigest()


def write_shard(out: str, shard: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Write one shard (in a worker process) and its record; returns the record."""
    items = _items(json.dumps(params, sort_keys=True))
    out_dir = Path(out)
    tmp = out_dir / f".{shard['file']}.partial"
    record: dict[str, Any] = {"file": shard["file"], "samples": 0, "groups": [], "bad": [],
                              "plan": _plan_digest(shard, params)}
    with wds.TarWriter(str(tmp), mtime=_FIXED_MTIME) as writer:
        for cid, idx in shard["images"]:
            item, written = items[cid], 0
            for j in idx:
                image_key, load = item.images[j]
                try:
                    ext, data = _encode(load, params["max_side"], drawn=params["source"] == "emoji")
                except Exception as err:  # noqa: BLE001 - an unreadable image is left out and listed, never fatal
                    record["bad"].append(f"{getattr(load, 'path', f'{item.key}/{image_key}')}: {type(err).__name__}")
                    continue
                writer.write({
                    "__key__": f"{item.key}_{image_key}".replace(".", "_"),
                    ext: data,
                    "cls": str(cid).encode(),
                    "json": json.dumps({"class": item.key, "image": image_key}).encode(),
                })
                written += 1
            if written:
                record["groups"].append([cid, written])
                record["samples"] += written
    os.replace(tmp, out_dir / shard["file"])
    record["sha256"] = _sha256(out_dir / shard["file"])
    record["bytes"] = (out_dir / shard["file"]).stat().st_size
    _record_path(out_dir, shard["file"]).write_text(json.dumps(record))
    return record


def _done(out: Path, shard: dict[str, Any], params: dict[str, Any]) -> dict[str, Any] | None:
    """The record of a shard finished by an earlier (interrupted) build of the same plan, if any."""
    try:
        record = json.loads(_record_path(out, shard["file"]).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    tar = out / shard["file"]
    if record.get("plan") != _plan_digest(shard, params) or not tar.is_file() or tar.stat().st_size != record["bytes"]:
        return None
    return record


def build(cfg: DataConfig, root: str | Path | None = None, workers: int | None = None) -> Manifest:
    """Build the shards and the manifest (written last, so a half build is never taken as complete)."""
    out = Path(root or cfg.root).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    params = source_params(cfg)
    classes, planned = plan(cfg)
    tasks = [(split, i, shard) for split, shards in planned.items() for i, shard in enumerate(shards)]
    records: dict[tuple[str, int], dict[str, Any]] = {}
    todo = []
    for split, i, shard in tasks:
        record = _done(out, shard, params)
        if record is None:
            todo.append((split, i, shard))
        else:
            records[(split, i)] = record
    if records:
        log.info("resuming: %d of %d shards already built in %s", len(records), len(tasks), out)
    workers = max(1, min(workers or cfg.build_workers, len(todo) or 1))
    total = sum(s["planned"] for _, _, s in todo)
    with tqdm(total=total, desc=f"shards {out.name}", unit="img", disable=None) as bar:
        if workers == 1:
            for split, i, shard in todo:
                records[(split, i)] = write_shard(str(out), shard, params)
                bar.update(shard["planned"])
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = {pool.submit(write_shard, str(out), shard, params): (split, i, shard)
                           for split, i, shard in todo}
                for future in futures:  # in plan order; results are independent of completion order
                    split, i, shard = futures[future]
                    records[(split, i)] = future.result()
                    bar.update(shard["planned"])
    recs = {split: [records[(split, i)] for i in range(len(shards))] for split, shards in planned.items()}
    bad = [b for split_recs in recs.values() for r in split_recs for b in r["bad"]]
    contents = _contents(classes, {split: [{k: r[k] for k in ("file", "samples", "groups", "sha256", "bytes")}
                                           for r in split_recs] for split, split_recs in recs.items()})
    splits = contents["splits"]
    total_images = sum(s["samples"] for s in splits.values()) + len(bad)
    if bad:
        log.warning("left out %d unreadable images, e.g. %s", len(bad), bad[:3])
    if total_images and len(bad) / total_images > cfg.max_bad_fraction:
        raise ShardBuildError(f"{len(bad)} of {total_images} images are unreadable (over data.max_bad_fraction="
                              f"{cfg.max_bad_fraction}); first: {'; '.join(bad[:3])}")
    manifest = {"format": FORMAT_VERSION, "params": params, **contents, "bad": bad}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    log.info("built %s: %s", out, {k: (v["classes"], v["samples"]) for k, v in splits.items()})
    return Manifest(str(out), manifest)


def load_manifest(root: str | Path) -> Manifest:
    root_s = str(root)
    if is_remote(root_s):
        from pipeline.data.stream import shard_url

        with wds.gopen(shard_url(root_s, MANIFEST)) as f:
            return Manifest(root_s, json.loads(f.read()))
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; build the shards first (gdml shards build)")
    return Manifest(root_s, json.loads(path.read_text()))


def is_current(root: str | Path, cfg: DataConfig) -> bool:
    """True when ``root`` holds a complete shard set built from the same source parameters."""
    try:
        manifest = load_manifest(root)
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    if manifest.data.get("format") != FORMAT_VERSION or manifest.data.get("params") != source_params(cfg):
        return False
    return all((Path(root) / sh["file"]).is_file() and (Path(root) / sh["file"]).stat().st_size == sh["bytes"]
               for split in manifest.splits for sh in manifest.shards(split))


def ensure(cfg: DataConfig) -> Manifest:
    """Reuse the shards under ``cfg.root`` when they match the config (or are remote); build them otherwise."""
    if is_remote(cfg.root):
        return load_manifest(cfg.root)  # remote shards are built elsewhere and only read here
    if is_current(cfg.root, cfg):
        log.info("reusing shards in %s", Path(cfg.root).resolve())
        return load_manifest(cfg.root)
    return build(cfg)


def verify(root: str | Path) -> list[str]:
    """Shard files whose sha256 differs from the manifest's (empty when all match)."""
    manifest = load_manifest(root)
    return [sh["file"] for split in manifest.splits for sh in manifest.shards(split)
            if _sha256(Path(root) / sh["file"]) != sh["sha256"]]
