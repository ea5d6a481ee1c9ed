import io
import shutil
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from pipeline import config as config_mod
from pipeline.data import shards
from pipeline.data import stream as stream_mod
from pipeline.data.stream import BalancedStream, Slot, epoch_units, plan_epoch, train_loader, unit_images
from pipeline.data.transforms import train_augment
from tests.conftest import tiny_config
from tests.data.test_readers import _jpeg

# A folder source whose classes hold 1 to 9 images (CUB-like: many images per class, none divisible by m alike)
SIZES = [1, 2, 3, 4, 5, 6, 7, 8, 9, 5, 4, 3, 7, 9, 2, 6]


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory):
    raw = tmp_path_factory.mktemp("uneven")
    for c, n in enumerate(SIZES):
        for i in range(n):
            _jpeg(raw / "photos" / f"c{c:02d}" / f"{i}.jpg", c * 100 + i, (48, 36))
    cfg = config_mod.load(None, ["data.source=folder", f"data.path={raw / 'photos'}", f"data.root={raw / 'shards'}",
                                 "data.train_classes=16", "data.shard_max_samples=12", "data.build_workers=1"])
    shards.build(cfg.data)
    return raw / "shards"


def _sampler(**values):
    base = {"classes_per_batch": 4, "images_per_class": 3, "batch_size": 12, "loader_workers": 0}
    return config_mod.SamplerConfig(**{**base, **values})


def _stream(cfg, rank=0, world=1, root=None, sampler=None, **kwargs):
    root = root or cfg.data.root
    return BalancedStream(shards.load_manifest(root), sampler or cfg.sampler,
                          train_augment(cfg.augment, cfg.data.image_size), rank=rank, world_size=world, seed=3,
                          **kwargs)


@pytest.mark.parametrize("world,workers,p", [(1, 1, 2), (2, 1, 2), (2, 2, 2), (3, 2, 2), (2, 1, 5), (3, 1, 7)])
def test_epoch_plan_gives_every_slot_equal_pieces_covering_every_class(tiny_shards, world, workers, p):
    train = shards.load_manifest(tiny_shards).shards("train")
    slots = world * workers
    for epoch in range(3):
        padded = [plan_epoch(train, Slot(r, world, w, workers), p, seed=1, epoch=epoch)
                  for r in range(world) for w in range(workers)]
        batches = -(-24 // (slots * p))
        assert {plan.n_batches for plan in padded} == {batches}  # the same number of batches in every slot
        assert all(sum(len(u) for u in plan.draws.values()) == batches * p for plan in padded)
        assert set().union(*(plan.draws for plan in padded)) == set(range(24))  # every class, every epoch
        strict = [plan_epoch(train, Slot(r, world, w, workers), p, seed=1, epoch=epoch, pad=False)
                  for r in range(world) for w in range(workers)]
        owned = [c for plan in strict for c, units in plan.draws.items() for _ in units]
        assert len(owned) == len(set(owned)) == (24 // (slots * p)) * slots * p  # one pass: nothing twice


@pytest.mark.parametrize("m", [2, 3, 4])
def test_images_epoch_covers_every_image_once_in_m_image_units(uneven_shards, m):
    train = shards.load_manifest(uneven_shards).shards("train")
    counts = {cls: n for sh in train for cls, n in sh["groups"]}
    assert sorted(counts.values()) == sorted(SIZES)
    units = epoch_units(train, "images", m)
    assert units == sum(-(-n // m) for n in SIZES)
    for world, workers in ((1, 1), (2, 2)):
        plans = [plan_epoch(train, Slot(r, world, w, workers), 2, seed=5, epoch=1, pad=True, epoch_mode="images", m=m)
                 for r in range(world) for w in range(workers)]
        assert len({plan.n_batches for plan in plans}) == 1
        drawn = Counter((cls, unit) for plan in plans for cls, us in plan.draws.items() for unit, cycle in us
                        if cycle == 0)
        assert set(drawn) == {(cls, u) for cls, n in counts.items() for u in range(-(-n // m))}  # every unit once
        assert max(drawn.values()) == 1
    for cls, n in counts.items():
        images = [unit_images(n, m, 5, 1, cls, u, 0, "images") for u in range(-(-n // m))]
        assert all(len(positions) == m for positions in images)
        assert set().union(*map(set, images)) == set(range(n))  # every image of the class
        firsts = [p for positions in images[:-1] for p in positions]
        assert len(firsts) == len(set(firsts))  # once, apart from the last unit's top-up
        if n >= m:
            assert len(set(images[-1])) == m  # topped up with other images of the class, no duplicate


def test_batches_are_p_classes_by_m_uint8_images(tiny_cfg):
    stream = _stream(tiny_cfg)
    batches = list(stream)
    assert len(batches) == stream.steps_per_epoch() == 24 // 4
    for images, labels in batches:
        assert images.shape == (12, 3, 32, 32) and images.dtype == torch.uint8
        assert sorted(Counter(labels.tolist()).values()) == [3, 3, 3, 3]
    seen = [c for _, labels in batches for c in set(labels.tolist())]
    assert sorted(seen) == list(range(24))  # one pass: every training class once


def test_only_the_drawn_images_are_decoded(uneven_shards, monkeypatch):
    calls = []
    real = stream_mod.decode_rgb
    monkeypatch.setattr(stream_mod, "decode_rgb", lambda data, min_area=0.0: calls.append(1) or real(data, min_area))
    cfg = tiny_config(uneven_shards.parent, **{"data.root": str(uneven_shards)})
    for mode in ("classes", "images"):
        calls.clear()
        stream = _stream(cfg, sampler=_sampler(images_per_class=2, batch_size=8, epoch=mode))
        batches = list(stream)
        assert len(calls) == len(batches) * 8  # P x m per batch: nothing else is decoded
        if mode == "classes":  # m images of each class: fewer decodes than images in the shards
            assert len(calls) < sum(SIZES)
    assert len(batches) == stream.steps_per_epoch() == -(-sum(-(-n // 2) for n in SIZES) // 4)


def test_two_ranks_take_equal_steps_on_disjoint_classes(tiny_cfg):
    per_rank = []
    for rank in range(2):
        stream = _stream(tiny_cfg, rank, 2)
        batches = list(stream)
        assert len(batches) == stream.steps_per_epoch() == 3
        per_rank.append({c for _, labels in batches for c in labels.tolist()})
    assert not per_rank[0] & per_rank[1]
    assert len(per_rank[0] | per_rank[1]) == 24


def test_epochs_reshuffle_seed_repeats_and_the_training_rng_is_untouched(tiny_cfg):
    def order(epoch):
        stream = _stream(tiny_cfg)
        stream.set_epoch(epoch)
        torch.manual_seed(123)
        before = torch.get_rng_state()
        out = [(labels[0].item(), images.float().mean().item()) for images, labels in stream]
        assert torch.equal(before, torch.get_rng_state())  # augmentation draws from its own generator
        return out

    assert order(0) == order(0)
    assert order(0) != order(1)


def test_persistent_loader_workers_split_the_rank_and_follow_the_epoch(tiny_cfg):
    stream = _stream(tiny_cfg, loader_workers=2)
    loader = train_loader(stream)
    epochs = []
    for epoch in range(2):
        stream.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == stream.steps_per_epoch() == 2 * (24 // (2 * 4))
        classes = [c for _, labels in batches for c in set(labels.tolist())]
        assert len(classes) == len(set(classes))
        epochs.append([labels.tolist() for _, labels in batches])
    assert loader._iterator is not None and loader.persistent_workers
    fresh = _stream(tiny_cfg, loader_workers=2)
    fresh.set_epoch(1)
    assert [labels.tolist() for _, labels in train_loader(fresh)] == epochs[1] != epochs[0]


def test_corrupt_images_and_a_truncated_shard_are_skipped_and_no_class_is_dropped(tmp_path, uneven_shards):
    root = tmp_path / "broken"
    shutil.copytree(uneven_shards, root)
    manifest = shards.load_manifest(root)
    files = [s["file"] for s in manifest.shards("train")]
    # 1) two images of the first shard's largest class replaced by garbage
    first = root / files[0]
    groups = manifest.shards("train")[0]["groups"]
    victim, _ = max(groups, key=lambda g: g[1])
    with tarfile.open(first) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    broken, out = 0, []
    for member, data in members:
        if member.name.endswith(".jpg") and broken < 2 and any(
                m2.name == member.name.replace(".jpg", ".cls") and d2 == str(victim).encode() for m2, d2 in members):
            data, broken = b"not an image", broken + 1
            member.size = len(data)
        out.append((member, data))
    with tarfile.open(first, "w") as tar:
        for member, data in out:
            tar.addfile(member, io.BytesIO(data))
    # 2) the last shard cut in half
    last = root / files[-1]
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])

    cfg = tiny_config(tmp_path, **{"data.root": str(root)})
    label = manifest.class_ids("train").index(victim)
    for mode in ("classes", "images"):
        stream = _stream(cfg, root=root, sampler=_sampler(images_per_class=2, batch_size=8, epoch=mode), verify=False)
        batches = list(stream)
        assert len(batches) == stream.steps_per_epoch()  # the same number of steps as intact data
        # the cut shard is read in every epoch (one skip); an images epoch draws every image, the two corrupt ones too
        assert stream.stats.skipped >= (3 if mode == "images" else 1), (mode, stream.stats)
        assert stream.stats.reused_units >= 1  # the cut shard's lost units were made up for
        assert all(images.shape[0] == 8 for images, _ in batches)
        counts = Counter(c for _, labels in batches for c in labels.tolist())
        assert counts[label] >= 2  # the class with broken images is still drawn, m images a unit


def test_one_pass_epoch_sees_no_image_twice(tiny_cfg):
    """m <= images per class and remainder=drop: every drawn image is distinct within the epoch."""
    sampler = tiny_cfg.sampler.model_copy(update={"images_per_class": 2, "batch_size": 8, "remainder": "drop"})
    cfg = tiny_cfg.model_copy(update={"sampler": sampler, "augment": tiny_cfg.augment.model_copy(
        update={"crop_scale": (1.0, 1.0), "flip": False, "color_jitter": 0.0})})
    stream = _stream(cfg)
    images = torch.cat([b[0] for b in stream])
    flat = images.flatten(1)
    assert len(flat) == 24 * 2
    assert len({tuple(row.tolist()) for row in flat}) == len(flat)


def test_a_shard_altered_in_place_stops_the_stream_and_evaluation_reads(tmp_path, tiny_shards):
    from pipeline.data.samples import ShardChecksumError, SplitImages

    root = tmp_path / "altered"
    shutil.copytree(tiny_shards, root)
    manifest = shards.load_manifest(root)
    for split in ("train", "test"):
        path = root / manifest.shards(split)[0]["file"]
        data = bytearray(path.read_bytes())
        data[700] ^= 0xFF  # same size, one byte changed (inside the first image)
        path.write_bytes(bytes(data))
    assert len(shards.verify(root)) == 2  # what `gdml shards verify` reports
    cfg = tiny_config(tmp_path, **{"data.root": str(root)})
    with pytest.raises(ShardChecksumError, match="does not match the sha256 its manifest recorded"):
        list(_stream(cfg, root=root))
    with pytest.raises(ShardChecksumError):
        list(SplitImages(manifest.split("test"), image_size=32))
    assert len(list(SplitImages(manifest.split("test", verify=False), image_size=32))) >= 47
    # embedded with loader workers: the worker's error reaches the caller as the same one line
    from pipeline.config import EvalConfig
    from pipeline.evaluation.embed import embed_split

    with pytest.raises(ShardChecksumError) as err:
        embed_split(_Pixels(), manifest.split("test"), EvalConfig(loader_workers=2), 32, progress=False)
    assert _forked_children() == []  # the loader's worker processes ended with the error
    assert "\n" not in str(err.value) and str(err.value).endswith("(rebuild it: gdml shards build --force; or "
                                                                   "check: gdml shards verify)")
    assert str(err.value).startswith(str(root))


def _forked_children() -> list:
    """This process's forked children that are alive (a fork shares its parent's command line)."""
    import psutil

    me, out = psutil.Process(), []
    for child in me.children():
        try:
            if child.cmdline() == me.cmdline():
                out.append(child)
        except psutil.Error:  # (ended meanwhile, or a zombie)
            pass
    return out


class _Pixels(torch.nn.Module):
    """A stand-in embedder: an image's first pixels, so that every image has its own embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor):
        return x.flatten(1)[:, :64] * self.scale, None


@pytest.mark.parametrize("split", ["test", "train"])
def test_loader_workers_embed_a_split_as_one_process_does_and_count_what_they_skip(tmp_path, tiny_shards, split):
    """Loader workers each read every n-th shard; the embeddings come back in manifest order, identical to one
    process's, and an image that does not decode is counted as skipped whichever worker met it."""
    from pipeline.config import EvalConfig
    from pipeline.evaluation.embed import embed_split

    manifest = shards.load_manifest(tiny_shards)
    classes = None if split == "test" else set(manifest.class_ids("train"))
    one = embed_split(_Pixels(), manifest.split(split, classes), EvalConfig(batch_size=5, loader_workers=0), 32,
                      progress=False)
    assert len(manifest.shards(split)) >= 3  # so that 3 workers each get shards
    stats: dict = {}
    three = embed_split(_Pixels(), manifest.split(split, classes), EvalConfig(batch_size=5, loader_workers=3), 32,
                        progress=False, stats=stats)
    assert np.array_equal(one[0], three[0]) and np.array_equal(one[1], three[1]) and one[2] == three[2]
    assert stats["skipped"] == 0 and len(set(one[2])) == len(one[2])

    root = tmp_path / "broken"
    shutil.copytree(tiny_shards, root)
    last = root / manifest.shards(split)[-1]["file"]  # (read by the last worker)
    with tarfile.open(last) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(last, "w") as tar:
        broken = False
        for member, data in members:
            if member.name.endswith(".png") and not broken:
                data, broken = b"not an image", True
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    stats = {}
    broken = shards.load_manifest(root).split(split, classes, verify=False)
    emb, labels, keys = embed_split(_Pixels(), broken, EvalConfig(loader_workers=3), 32, progress=False, stats=stats)
    assert stats["skipped"] == 1 and len(keys) == len(one[2]) - 1
    assert keys == [k for k in one[2] if k in set(keys)]  # still in manifest order


def test_the_tar_reader_reads_what_tarfile_writes(tmp_path):
    """Long names (GNU and pax), nested folders and empty members, as WebDataset groups them into samples."""
    from pipeline.data.samples import read_shard

    members = {"a/short.jpg": b"1" * 10, "a/short.cls": b"3", "x" * 150 + ".jpg": b"2" * 600,
               "x" * 150 + ".cls": b"", "b.json": b"{}"}
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT):
        if fmt == tarfile.USTAR_FORMAT:
            members = {k: v for k, v in members.items() if len(k) < 100}
        path = tmp_path / f"{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        samples = list(read_shard(str(path)))
        flat = {f"{s['__key__']}.{ext}": v for s in samples for ext, v in s.items() if ext != "__key__"}
        assert flat == members, fmt
