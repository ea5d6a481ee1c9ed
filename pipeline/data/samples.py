"""Reading samples from shards: shard URLs, a minimal tar reader with sha256 checks, image decoding, and every
image of a split in order. Details: docs/internals.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.data.manifest import Split
from pipeline.data.transforms import eval_transform
from pipeline.errors import GdmlError

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


class ShardChecksumError(GdmlError):
    """A shard's bytes differ from what its manifest recorded: it was altered after it was built."""


class _Reader:
    """Exact reads from a stream, hashing every byte."""

    def __init__(self, stream) -> None:
        self.stream, self.sha256 = stream, hashlib.sha256()

    def read(self, n: int) -> bytes:
        chunks, left = [], n
        while left > 0:
            chunk = self.stream.read(left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        self.sha256.update(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _tar_members(reader: _Reader, url: str) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file in a tar stream (GNU long names and pax paths understood)."""
    long_name = None
    while True:
        header = reader.read(512)
        if len(header) < 512:
            if header.strip(b"\0"):
                raise OSError(f"{url}: truncated tar header")
            return
        if not header.strip(b"\0"):  # end of archive
            return
        field = header[124:136]
        size = int.from_bytes(field[1:], "big") if field[0] & 0x80 else int(field.strip(b"\0 ") or b"0", 8)
        data = reader.read(size)
        if len(data) < size:
            raise OSError(f"{url}: truncated (a member of {size} bytes ends after {len(data)})")
        reader.read(-size % 512)
        kind = header[156:157]
        if kind == b"L":
            long_name = data.rstrip(b"\0").decode()
            continue
        if kind in (b"x", b"g"):
            for record in data.decode().split("\n"):
                if " path=" in record:
                    long_name = record.split(" path=", 1)[1]
            continue
        name = long_name or header[:100].rstrip(b"\0").decode()
        prefix = header[345:500].rstrip(b"\0") if header[257:262] == b"ustar" else b""
        if prefix and long_name is None:
            name = f"{prefix.decode()}/{name}"
        long_name = None
        if kind in (b"0", b"\0"):
            yield name, data


def read_shard(url: str, sha256: str | None = None) -> Iterator[dict]:
    """The samples of one shard, undecoded, in order: ``{"__key__": key, "<ext>": bytes, ...}`` (WebDataset's
    grouping: members sharing a name up to the first dot of their file name form one sample). Read to the end,
    the shard's sha256 is compared with ``sha256`` (its manifest's) and ``ShardChecksumError`` raised on a
    difference; raises OSError on a truncated or unreadable shard."""
    with wds.gopen(url, "rb") as stream:
        reader = _Reader(stream)
        sample: dict = {}
        for name, data in _tar_members(reader, url):
            folder, _, base = name.rpartition("/")
            stem, _, ext = base.partition(".")
            key = f"{folder}/{stem}" if folder else stem
            if sample and sample["__key__"] != key:
                yield sample
                sample = {}
            sample.setdefault("__key__", key)
            sample[ext] = data
        if sample:
            yield sample
        reader.drain()
    if sha256 and reader.sha256.hexdigest() != sha256:
        raise ShardChecksumError(f"{url} does not match the sha256 its manifest recorded: it was altered after it was "
                                 "built (rebuild it: gdml shards build --force; or check: gdml shards verify)")


def raw_samples(shards: list[tuple[str, str | None]], on_error: Callable[[Exception], None]) -> Iterator[dict]:
    """Undecoded samples of some shards ((url, sha256) pairs), in order. An unreadable or truncated shard goes to
    ``on_error`` (which may raise to stop) and reading goes on with the next one; a checksum mismatch goes there
    too, after the shard's samples."""
    for url, sha in shards:
        try:
            yield from read_shard(url, sha)
        except (OSError, ValueError, ShardChecksumError) as err:
            on_error(err)


class SplitImages(IterableDataset):
    """Every image of a split once, for embedding (no augmentation). Yields ``(image, class, key, place)``; in
    loader workers each takes every n-th shard, and ``place`` (shard, position) puts the images back in manifest
    order. Images that cannot be read are left out (and logged); a checksum mismatch raises."""

    def __init__(self, split: Split, raw: bool = False, image_size: int = 64) -> None:
        super().__init__()
        self.shards = [(shard_url(split.root, s["file"]), s.get("sha256") if split.verify else None)
                       for s in split.shards]
        self.classes = split.classes
        self.transform = (lambda img: img) if raw else eval_transform(image_size)

    @staticmethod
    def _error(err: Exception) -> None:
        if isinstance(err, ShardChecksumError):
            raise err
        log.warning("skipped unreadable data: %s", err)

    def __iter__(self) -> Iterator[tuple[torch.Tensor | Image.Image, int, str, int]]:
        info = get_worker_info()
        first, step = (info.id, info.num_workers) if info else (0, 1)
        for s in range(first, len(self.shards), step):
            for position, sample in enumerate(raw_samples(self.shards[s:s + 1], self._error)):
                try:
                    img, cls = decode(sample)
                except Exception as exn:  # noqa: BLE001
                    log.warning("skipped %s: %s", sample.get("__key__"), exn)
                    continue
                if self.classes is not None and cls not in self.classes:
                    continue
                meta = json.loads(sample["json"]) if "json" in sample else {}
                yield (self.transform(img), cls, f"{meta.get('class', cls)}/{meta.get('image', sample['__key__'])}",
                       s << 32 | position)
