"""Shards -> class-balanced batches of P classes x m images, decoding only the images a batch draws.

Each epoch's units (m images of one class) are cut into ``ranks x loader_workers`` equal pieces of whole batches,
planned from the manifest alone: every rank takes the same number of steps with the same batch shape. A bad image
or unit is skipped, counted and replaced. Details (units, splitting, reading): docs/internals.md.
"""

from __future__ import annotations

import io
import logging
import math
import multiprocessing
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config import SamplerConfig
from pipeline.data.manifest import Manifest
from pipeline.data.samples import ShardChecksumError, image_bytes, raw_samples, shard_url

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Slot:
    """One consumer of an epoch: a training rank's loader worker."""

    rank: int
    world_size: int
    worker: int = 0
    num_workers: int = 1

    @property
    def index(self) -> int:
        return self.rank * self.num_workers + self.worker

    @property
    def count(self) -> int:
        return self.world_size * self.num_workers


def validation_classes(manifest: Manifest, fraction: float, seed: int, folds: int = 1, fold: int = 0) -> set[int]:
    """A seeded, class-disjoint share of the training classes held out for validation (empty for 0).

    With ``folds`` > 1 the training classes are dealt, in a seeded order, into that many disjoint folds and fold
    ``fold`` is held out (``fraction`` is then not used): k runs with fold = 0 .. k-1 validate on every training
    class exactly once.
    """
    train = manifest.class_ids("train")
    if folds > 1:
        held = random.Random(f"{seed}/folds").sample(train, len(train))[fold::folds]
        if len(held) < 2 or len(train) - len(held) < 2:
            raise ValueError(f"tune.folds={folds} leaves {len(held)} of {len(train)} training classes in a fold; "
                             "need at least 2 per fold and 2 to train on")
        return set(held)
    n = round(len(train) * fraction)
    if fraction > 0 and not 2 <= n < len(train):
        raise ValueError(f"train.val_fraction={fraction} holds out {n} of {len(train)} training classes; "
                         "need at least 2 and fewer than all")
    return set(random.Random(f"{seed}/validation").sample(train, n)) if n else set()


def held_out_classes(manifest: Manifest, cfg: Any) -> set[int]:
    """The classes a run (config ``cfg``) validates on: ``tune.folds``/``tune.fold``, else ``train.val_fraction``."""
    return validation_classes(manifest, cfg.train.val_fraction, cfg.train.seed, cfg.tune.folds, cfg.tune.fold)


@dataclass(frozen=True)
class TrainingPlan:
    """What a run trains on, from the manifest alone: the held-out classes, the classes and units left to train
    on, and the loader workers of each rank."""

    held_out: set[int]
    classes: int
    units: int
    loader_workers: int


def training_plan(manifest: Manifest, cfg: Any, world: int) -> TrainingPlan:
    """The one place that derives held-out classes -> units per epoch -> loader workers (``cfg``: the run's
    config; ``world``: its ranks). Raises ValueError where the held-out share is impossible."""
    held_out = held_out_classes(manifest, cfg)
    s = cfg.sampler
    units = epoch_units(without_classes(manifest.shards("train"), held_out), s.epoch, s.images_per_class)
    return TrainingPlan(held_out, len(manifest.class_ids("train")) - len(held_out), units,
                        resolve_loader_workers(s, cfg.train.cpus_per_worker, units, world))


def without_classes(shards: list[dict], exclude: set[int]) -> list[dict]:
    """The shards' entries with the given classes' groups removed (their images are skipped when read)."""
    if not exclude:
        return shards
    return [{**sh, "groups": [g for g in sh["groups"] if g[0] not in exclude]} for sh in shards]


def units_of(count: int, epoch_mode: str, m: int) -> int:
    """Units a class of ``count`` images gives per epoch."""
    return 1 if epoch_mode == "classes" else max(1, math.ceil(count / m))


def epoch_units(shards: list[dict], epoch_mode: str, m: int) -> int:
    return sum(units_of(n, epoch_mode, m) for sh in shards for _, n in sh["groups"])


def batches_per_slot(n_units: int, slots: int, classes_per_batch: int, pad: bool = True) -> int:
    per_batch = slots * classes_per_batch
    return -(-n_units // per_batch) if pad else n_units // per_batch


def resolve_loader_workers(sampler: SamplerConfig, cpus: int, n_units: int, world: int) -> int:
    """``sampler.loader_workers``, with ``auto`` resolved: one process per CPU of the worker beyond the one that
    trains, and no more than give every loader worker at least one batch per epoch."""
    if sampler.loader_workers != "auto":
        return int(sampler.loader_workers)
    if cpus <= 1:
        return 0
    return max(0, min(cpus - 1, n_units // (world * sampler.classes_per_batch)))


@dataclass
class EpochPlan:
    """One slot's share of one epoch."""

    files: list[str]
    """The shards it reads, in order."""
    draws: dict[int, list[tuple[int, int]]]
    """Class id -> the units of it this slot draws: (unit index within the class, pass over the epoch's units:
    0, or more where ``pad`` cycled the list)."""
    n_batches: int


def plan_epoch(shards: list[dict], slot: Slot, classes_per_batch: int, seed: int, epoch: int,
               pad: bool = True, epoch_mode: str = "classes", m: int = 1) -> EpochPlan:
    """A slot's shards, units and batch count for one epoch: the same on every rank (manifest, seed and epoch
    only), linear in the number of units."""
    rng = random.Random(f"{seed}/{epoch}/plan")  # str seeds are hashed stably across processes
    order = list(range(len(shards)))
    rng.shuffle(order)
    flat = [(i, cls, u) for i in order for cls, n in shards[i]["groups"] for u in range(units_of(n, epoch_mode, m))]
    if flat:
        offset = rng.randrange(len(flat))
        flat = flat[offset:] + flat[:offset]
    n_batches = batches_per_slot(len(flat), slot.count, classes_per_batch, pad)
    per_slot = n_batches * classes_per_batch
    start = slot.index * per_slot
    positions = range(start, start + per_slot) if flat else range(0)
    piece = [(*flat[p % len(flat)], p // len(flat)) for p in positions]  # p // len: the pass (pad cycles)
    files = list(dict.fromkeys(shards[i]["file"] for i, _, _, _ in piece))
    draws: dict[int, list[tuple[int, int]]] = {}
    for _, cls, unit, cycle in piece:
        draws.setdefault(cls, []).append((unit, cycle))
    return EpochPlan(files, draws, n_batches)


def unit_images(count: int, m: int, seed: int, epoch: int, cls: int, unit: int, cycle: int,
                epoch_mode: str) -> list[int]:
    """Positions (within the class's group) of the m images of a unit: decided before anything is read, the same
    on every slot. ``cycle``: a second pass over the epoch's units (``pad``) draws other images of the class."""
    if epoch_mode == "classes":
        rng = random.Random(f"{seed}/{epoch}/{cls}/{cycle}")
        if count >= m:
            return rng.sample(range(count), m)
        return list(range(count)) + rng.choices(range(count), k=m - count)  # few images: with replacement
    order = list(range(count))
    random.Random(f"{seed}/{epoch}/{cls}/{cycle}").shuffle(order)
    chosen = order[unit * m:(unit + 1) * m]
    if len(chosen) < m:  # the last unit: topped up from the class's other images (with replacement if few)
        rng = random.Random(f"{seed}/{epoch}/{cls}/top-up")
        others = [p for p in order if p not in chosen]
        extra = m - len(chosen)
        chosen += rng.sample(others, extra) if len(others) >= extra else rng.choices(order, k=extra)
    return chosen


def _torchvision_jpeg() -> Callable | None:
    """torchvision's JPEG decoder (libjpeg-turbo straight into a uint8 tensor: 0.8 ms a CUB-sized photo faster
    than through Pillow's pixel copy). Deprecated in torchvision 0.29 in favour of TorchCodec but present in the
    pinned version; where it is gone, Pillow decodes everything."""
    try:
        import warnings

        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None

    def decode(data: bytes) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)

    return decode


_DECODE_JPEG = _torchvision_jpeg()


def decode_rgb(data: bytes, min_area: float = 0.0) -> torch.Tensor:
    """An encoded image -> a (3, H, W) uint8 tensor; raises if the image is broken. A JPEG much larger than
    ``min_area`` pixels is decoded at a reduced scale (1/2, 1/4 or 1/8 in the DCT: far cheaper), never below
    ``min_area``."""
    with Image.open(io.BytesIO(data)) as im:  # reads the header only
        factor = 1
        if min_area and im.format == "JPEG":
            w, h = im.size
            factor = next((f for f in (8, 4, 2) if w * h / (f * f) >= min_area), 1)
        if not (im.format == "JPEG" and factor == 1 and _DECODE_JPEG is not None):
            if factor > 1:
                im.draft("RGB", (math.ceil(w / factor), math.ceil(h / factor)))
            rgb = im if im.mode == "RGB" else im.convert("RGB")
            return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)
    return _DECODE_JPEG(data)


@dataclass
class StreamStats:
    skipped: int = 0
    """Images (or shard parts) that could not be read or decoded."""
    reused_units: int = 0
    """Units drawn a second time because a unit came out empty (every rank still takes its steps)."""
    peak_bytes: int = 0
    """Most encoded image bytes the shuffle buffer held at once (the stream's memory: never decoded pixels)."""


@dataclass
class _Unit:
    cls: int
    images: list[bytes] = field(default_factory=list)


class BalancedStream(IterableDataset):
    """Class-balanced P x m batches of one split for one rank (loader workers split it further).

    Yields ``(uint8 images (P*m, 3, S, S), labels (P*m,))``; ``normalize`` turns the images into the model's input.
    """

    def __init__(
        self,
        manifest: Manifest,
        sampler: SamplerConfig,
        augment: Callable[[torch.Tensor], torch.Tensor],
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        split: str = "train",
        exclude: set[int] | None = None,
        loader_workers: int | None = None,
        min_area: float = 0.0,
        verify: bool = True,
    ) -> None:
        super().__init__()
        self.shards = without_classes(manifest.shards(split), exclude or set())
        self.root = manifest.root
        self.sampler = sampler
        self.augment = augment
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.mode, self.m, self.P = sampler.epoch, sampler.images_per_class, sampler.classes_per_batch
        self.pad = sampler.remainder == "pad"
        self.loader_workers = (loader_workers if loader_workers is not None
                               else (0 if sampler.loader_workers == "auto" else int(sampler.loader_workers)))
        self.min_area = min_area
        self.verify = verify
        self.sha256 = {sh["file"]: sh.get("sha256") for sh in manifest.shards(split)}
        self.counts = {cls: n for sh in self.shards for cls, n in sh["groups"]}
        ids = manifest.class_ids(split)
        self.label_of = {cid: i for i, cid in enumerate(ids)}
        # Shared with loader worker processes (forked), so persistent workers see each new epoch.
        self._epoch = multiprocessing.get_context("fork").Value("i", 0, lock=False)
        self.stats = StreamStats()

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = epoch

    def _slot(self) -> Slot:
        info = get_worker_info()
        workers = max(1, self.loader_workers)
        return Slot(self.rank, self.world_size, info.id if info else 0, workers if info else 1)

    def units_per_epoch(self) -> int:
        return epoch_units(self.shards, self.mode, self.m)

    def steps_per_epoch(self) -> int:
        """Batches each rank yields per epoch; identical on every rank."""
        workers = max(1, self.loader_workers)
        per_slot = batches_per_slot(self.units_per_epoch(), self.world_size * workers, self.P, self.pad)
        return per_slot * workers

    def _units(self, plan: EpochPlan) -> Iterator[_Unit]:
        """The slot's units in reading order, each with the encoded bytes of its images only."""
        epoch = self.epoch
        wanted: dict[int, dict[int, list[int]]] = {}  # class -> position -> indices of its draws that use it
        images: dict[int, list[list[int]]] = {}
        for cls, units in plan.draws.items():
            images[cls] = [unit_images(self.counts[cls], self.m, self.seed, epoch, cls, unit, cycle, self.mode)
                           for unit, cycle in units]
            for d, positions in enumerate(images[cls]):
                for p in positions:
                    wanted.setdefault(cls, {}).setdefault(p, []).append(d)

        def skip(exn: Exception) -> None:
            if isinstance(exn, ShardChecksumError):
                raise exn
            self.stats.skipped += 1
            log.warning("skipped a bad sample or shard: %s", exn)

        def finish(cls: int, kept: dict[int, bytes]) -> Iterator[_Unit]:
            for positions in images[cls]:
                blobs = [kept[p] for p in positions if p in kept]
                if blobs:
                    yield _Unit(cls, blobs)

        current, position, kept = None, 0, {}
        shards = [(shard_url(self.root, f), self.sha256.get(f) if self.verify else None) for f in plan.files]
        for sample in raw_samples(shards, skip):
            try:
                cls = int(sample["cls"])
            except (KeyError, ValueError) as exn:
                skip(exn)
                continue
            if cls != current:
                if current in wanted:
                    yield from finish(current, kept)
                current, position, kept = cls, 0, {}
            if cls in wanted and position in wanted[cls]:
                try:
                    kept[position] = image_bytes(sample)
                except ValueError as exn:
                    skip(exn)
            position += 1
        if current in wanted:
            yield from finish(current, kept)

    def _decoded(self, unit: _Unit, rng: random.Random) -> list[torch.Tensor]:
        """The unit's m images, decoded and augmented; an image that does not decode is replaced by another."""
        good = []
        for data in unit.images:
            try:
                good.append(decode_rgb(data, self.min_area))
            except Exception as exn:  # noqa: BLE001 - one corrupt image must not stop training
                self.stats.skipped += 1
                log.warning("skipped an image of class %d that does not decode: %s", unit.cls, exn)
        if not good:
            return []
        while len(good) < self.m:
            good.append(rng.choice(good))
        return [self.augment(img) for img in good[:self.m]]

    def _pick(self, buffer: list[_Unit], rng: random.Random) -> list[_Unit]:
        """P units of distinct classes where the buffer has them: the classes it holds most units of first."""
        by_class: dict[int, list[int]] = {}
        for i, unit in enumerate(buffer):
            by_class.setdefault(unit.cls, []).append(i)
        classes = sorted(by_class, key=lambda c: (-len(by_class[c]), rng.random()))
        chosen = [rng.choice(by_class[c]) for c in classes[:self.P]]
        while len(chosen) < self.P:  # fewer classes left than P (the epoch's tail): a class twice
            extra = rng.randrange(len(buffer))
            if extra not in chosen:
                chosen.append(extra)
        return [buffer.pop(i) for i in sorted(chosen, reverse=True)]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        slot = self._slot()
        epoch = self.epoch
        plan = plan_epoch(self.shards, slot, self.P, self.seed, epoch, self.pad, self.mode, self.m)
        rng = random.Random(f"{self.seed}/{epoch}/{slot.index}/batches")
        # Augmentation draws from its own seeded generator state, never from the training loop's.
        augment_state = torch.Generator().manual_seed(
            random.Random(f"{self.seed}/{epoch}/{slot.index}/augment").getrandbits(63)).get_state()
        buffer: list[_Unit] = []
        in_buffer: dict[int, int] = {}  # class -> units of it in the buffer
        held = 0  # encoded bytes in the buffer
        seen: list[_Unit] = []
        source = self._units(plan)
        exhausted = False
        emitted = 0
        while emitted < plan.n_batches:
            while not exhausted and (len(buffer) < self.sampler.shuffle_buffer or len(in_buffer) < self.P):
                unit = next(source, None)
                if unit is None:
                    exhausted = True
                else:
                    buffer.append(unit)
                    in_buffer[unit.cls] = in_buffer.get(unit.cls, 0) + 1
                    held += sum(map(len, unit.images))
                    self.stats.peak_bytes = max(self.stats.peak_bytes, held)
            while len(buffer) < self.P:
                if not seen and not buffer:
                    raise RuntimeError(f"slot {slot} read no usable sample from {plan.files}")
                # The piece came up short (bad data): re-use units so every rank takes the same steps.
                unit = rng.choice(seen or buffer)
                buffer.append(unit)
                in_buffer[unit.cls] = in_buffer.get(unit.cls, 0) + 1
                self.stats.reused_units += 1
            picked = self._pick(buffer, rng)
            held -= sum(len(data) for unit in picked for data in unit.images)
            for unit in picked:
                in_buffer[unit.cls] -= 1
                if not in_buffer[unit.cls]:
                    del in_buffer[unit.cls]
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(augment_state)
                images, labels = [], []
                for unit in picked:
                    decoded = self._decoded(unit, rng)
                    for _ in range(8):  # none of its images decode: another unit of the slot takes its place
                        if decoded:
                            break
                        unit = rng.choice(seen or buffer or picked)
                        self.stats.reused_units += 1
                        decoded = self._decoded(unit, rng)
                    if not decoded:
                        raise RuntimeError(f"slot {slot}: no image of {len(picked)} units decodes in {plan.files}")
                    images += decoded
                    labels += [self.label_of[unit.cls]] * self.m
                augment_state = torch.get_rng_state()
            seen = (seen + picked)[-4 * self.P:]
            yield torch.stack(images), torch.tensor(labels, dtype=torch.long)
            emitted += 1


def train_loader(stream: BalancedStream, pin_memory: bool = False) -> DataLoader:
    """The rank's batches, decoded in ``stream.loader_workers`` processes (kept alive across epochs)."""
    workers = stream.loader_workers
    # Persistent workers take their base seed once per process (the stream seeds itself; the seed goes unused):
    # drawn from the global RNG it would shift a resumed run's later draws (dropout) against a straight run's, so
    # it comes from a generator of its own. (Without workers the draw is once per epoch either way.)
    generator = torch.Generator().manual_seed(stream.seed) if workers else None
    return DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                      pin_memory=pin_memory, multiprocessing_context="fork" if workers else None, generator=generator)
