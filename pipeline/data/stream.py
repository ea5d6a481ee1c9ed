"""Shards -> decoded, augmented, class-balanced batches of P classes x m images.

Splitting (the distributed invariant): every epoch, the split's class groups (in a seeded shard order,
rotated by a seeded offset) are cut into ``ranks x loader_workers`` equal contiguous pieces, each a
whole number of batches; the remainder (fewer than slots x P groups) waits for another epoch. So every
rank takes exactly the same number of steps with the same batch shape, by construction, from the
manifest alone, and a slot only opens the shards its piece lies in. Within a piece, groups pass a
seeded shuffle buffer; each batch takes P groups and m images of each (with replacement, augmented,
when a class has fewer than m images). A sample that fails to decode is skipped and counted; a piece
that comes up short re-uses groups it has already seen rather than take fewer steps.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms import v2 as T

from pipeline.config import SamplerConfig
from pipeline.data.samples import decode, raw_samples, shard_url

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


def validation_classes(manifest: dict, fraction: float, seed: int) -> set[int]:
    """A seeded, class-disjoint share of the training classes held out for validation (empty for 0)."""
    train = sorted(c["id"] for c in manifest["classes"] if c["split"] == "train")
    n = round(len(train) * fraction)
    if fraction > 0 and not 2 <= n < len(train):
        raise ValueError(f"train.val_fraction={fraction} holds out {n} of {len(train)} training classes; "
                         "need at least 2 and fewer than all")
    return set(random.Random(f"{seed}/validation").sample(train, n)) if n else set()


def without_classes(shards: list[dict], exclude: set[int]) -> list[dict]:
    """The shards' entries with the given classes' groups removed (their images are skipped when read)."""
    if not exclude:
        return shards
    return [{**sh, "groups": [g for g in sh["groups"] if g[0] not in exclude]} for sh in shards]


def batches_per_slot(n_groups: int, slots: int, classes_per_batch: int, pad: bool = True) -> int:
    per_batch = slots * classes_per_batch
    return -(-n_groups // per_batch) if pad else n_groups // per_batch


def plan_epoch(shards: list[dict], slot: Slot, classes_per_batch: int, seed: int, epoch: int,
               pad: bool = True) -> tuple[list[str], dict[int, int], int]:
    """The shard files, class ids (with how often each is drawn) and batches of one slot in one epoch.

    ``pad``: the epoch's last batches are filled up with the first groups again, so every class is seen in
    every epoch; otherwise the remainder (fewer than slots x P groups) waits for a later epoch and no group
    is drawn twice. The plan is the same on every rank: it depends on the manifest, seed and epoch only.
    """
    rng = random.Random(f"{seed}/{epoch}/plan")  # str seeds are hashed stably across processes
    order = list(range(len(shards)))
    rng.shuffle(order)
    flat = [(i, g[0]) for i in order for g in shards[i]["groups"]]
    if flat:
        offset = rng.randrange(len(flat))
        flat = flat[offset:] + flat[:offset]
    n_batches = batches_per_slot(len(flat), slot.count, classes_per_batch, pad)
    per_slot = n_batches * classes_per_batch
    needed = per_slot * slot.count
    while pad and flat and len(flat) < needed:
        flat += flat[:needed - len(flat)]
    piece = flat[slot.index * per_slot:(slot.index + 1) * per_slot]
    files = []
    for shard_index, _ in piece:
        if shards[shard_index]["file"] not in files:
            files.append(shards[shard_index]["file"])
    draws: dict[int, int] = {}
    for _, cls in piece:
        draws[cls] = draws.get(cls, 0) + 1
    return files, draws, n_batches


@dataclass
class StreamStats:
    skipped: int = 0
    reused_groups: int = 0


class BalancedStream(IterableDataset):
    """Class-balanced P x m batches of one split for one rank (loader workers split it further)."""

    def __init__(
        self,
        manifest: dict,
        root: str,
        sampler: SamplerConfig,
        transform: T.Compose,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        split: str = "train",
        exclude: set[int] | None = None,
    ) -> None:
        super().__init__()
        self.shards = without_classes(manifest["splits"][split]["shards"], exclude or set())
        self.root = root
        self.sampler = sampler
        self.transform = transform
        self.rank, self.world_size, self.seed = rank, world_size, seed
        ids = sorted(c["id"] for c in manifest["classes"] if c["split"] == split)
        self.label_of = {cid: i for i, cid in enumerate(ids)}
        self.epoch = 0
        self.stats = StreamStats()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _slot(self) -> Slot:
        info = get_worker_info()
        workers = max(1, self.sampler.loader_workers)
        return Slot(self.rank, self.world_size, info.id if info else 0, workers if info else 1)

    def steps_per_epoch(self) -> int:
        """Batches each rank yields per epoch; identical on every rank."""
        workers = max(1, self.sampler.loader_workers)
        n_groups = sum(len(s["groups"]) for s in self.shards)
        per_slot = batches_per_slot(n_groups, self.world_size * workers, self.sampler.classes_per_batch,
                                    self.sampler.remainder == "pad")
        return per_slot * workers

    def _groups(self, files: list[str], wanted: dict[int, int]) -> Iterator[tuple[int, list[Image.Image]]]:
        """Consecutive samples of a wanted class, as (class id, images); bad samples skipped and counted."""
        urls = [shard_url(self.root, f) for f in files]

        def skip(exn: Exception) -> bool:
            self.stats.skipped += 1
            log.warning("skipped a bad sample or shard: %s", exn)
            return True

        current, images = None, []
        for sample in raw_samples(urls, skip):
            try:
                img, cls = decode(sample)
            except Exception as exn:  # noqa: BLE001 - one corrupt image must not stop training
                skip(exn)
                continue
            if cls not in wanted:
                continue
            if cls != current and images:
                yield current, images
                images = []
            current = cls
            images.append(img)
        if images:
            yield current, images

    def _draws(self, files: list[str], draws: dict[int, int]) -> Iterator[tuple[int, list[Image.Image]]]:
        """Each planned class group, as often as the plan draws it."""
        for cls, images in self._groups(files, draws):
            for _ in range(draws[cls]):
                yield cls, images

    def _batch(self, groups: list[tuple[int, list[Image.Image]]], rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.sampler.images_per_class
        pics, labels = [], []
        for cls, images in groups:
            chosen = rng.sample(images, m) if len(images) >= m else images + rng.choices(images, k=m - len(images))
            pics += [self.transform(im) for im in chosen]
            labels += [self.label_of[cls]] * m
        return torch.stack(pics), torch.tensor(labels, dtype=torch.long)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        slot = self._slot()
        files, draws, n_batches = plan_epoch(self.shards, slot, self.sampler.classes_per_batch, self.seed, self.epoch,
                                             self.sampler.remainder == "pad")
        rng = random.Random(f"{self.seed}/{self.epoch}/{slot.index}/batches")
        torch.manual_seed(random.Random(f"{self.seed}/{self.epoch}/{slot.index}/augment").getrandbits(63))
        P = self.sampler.classes_per_batch
        buffer: list[tuple[int, list[Image.Image]]] = []
        seen: list[tuple[int, list[Image.Image]]] = []
        emitted = 0
        source = self._draws(files, draws)
        while emitted < n_batches:
            for group in source:
                buffer.append(group)
                if len(buffer) >= self.sampler.shuffle_buffer:
                    break
            if len(buffer) < P:
                if not seen and not buffer:
                    raise RuntimeError(f"slot {slot} read no usable sample from {files}")
                # The piece came up short (bad samples): re-use seen groups so every rank takes the same steps.
                while len(buffer) < P:
                    buffer.append(rng.choice(seen or buffer))
                    self.stats.reused_groups += 1
            picked = [buffer.pop(rng.randrange(len(buffer))) for _ in range(P)]
            seen = (seen + picked)[-4 * P:]
            yield self._batch(picked, rng)
            emitted += 1


def train_loader(stream: BalancedStream, pin_memory: bool = False) -> DataLoader:
    workers = stream.sampler.loader_workers
    return DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=False, pin_memory=pin_memory)
