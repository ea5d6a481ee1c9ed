"""Reading samples from shards: where a shard is, how a sample decodes, and every image of a split in order."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset

from pipeline.data.transforms import eval_transform

log = logging.getLogger(__name__)

IMAGE_FIELDS = ("jpg", "png", "jpeg", "webp")


def shard_url(root: str, file: str) -> str:
    """A shard's location, as WebDataset opens it.

    Local paths; ``http(s)://`` and ``gs://`` URLs (curl, gsutil); ``s3://`` (through the AWS CLI:
    ``pipe:aws s3 cp URL -``); or any ``pipe:`` command with ``{file}`` where the file name goes.
    """
    if root.startswith("pipe:"):
        if "{file}" not in root:
            raise ValueError(f"data.root: a pipe: command needs {{file}} where the shard name goes, got {root!r}")
        return root.replace("{file}", file)
    if root.startswith("s3://"):
        return f"pipe:aws s3 cp {root.rstrip('/')}/{file} -"
    return f"{root.rstrip('/')}/{file}" if "://" in root else str(Path(root) / file)


def image_bytes(sample: dict) -> bytes:
    data = next((sample[k] for k in IMAGE_FIELDS if k in sample), None)
    if data is None:
        raise ValueError(f"sample {sample.get('__key__')} has no image")
    return data


def decode(sample: dict) -> tuple[Image.Image, int]:
    """(RGB image, class id) of a raw sample; raises on an unreadable image."""
    with Image.open(io.BytesIO(image_bytes(sample))) as im:
        img = im.convert("RGB")
    return img, int(sample["cls"])


def raw_samples(urls: list[str], handler) -> wds.WebDataset:
    """Undecoded samples of some shards, in order (no node or worker splitting: callers plan their share)."""
    return wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None, handler=handler,
                          empty_check=False)


class SplitImages(IterableDataset):
    """Every image of a split once, in manifest order, for embedding (no augmentation)."""

    def __init__(self, manifest: dict, root: str, split: str, raw: bool = False, image_size: int = 64,
                 classes: set[int] | None = None) -> None:
        super().__init__()
        shards = manifest["splits"][split]["shards"]
        if classes is not None:  # only the shards that hold these classes
            shards = [s for s in shards if any(g[0] in classes for g in s["groups"])]
        self.urls = [shard_url(root, s["file"]) for s in shards]
        self.classes = classes
        self.transform = (lambda img: img) if raw else eval_transform(image_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor | Image.Image, int, str]]:
        for sample in raw_samples(self.urls, wds.warn_and_continue):
            try:
                img, cls = decode(sample)
            except Exception as exn:  # noqa: BLE001
                log.warning("skipped %s: %s", sample.get("__key__"), exn)
                continue
            if self.classes is not None and cls not in self.classes:
                continue
            meta = json.loads(sample["json"]) if "json" in sample else {}
            yield self.transform(img), cls, f"{meta.get('class', cls)}/{meta.get('image', sample['__key__'])}"
