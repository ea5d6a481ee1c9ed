import io
import shutil
import tarfile
from collections import Counter

import pytest
import torch

from pipeline.data import shards
from pipeline.data.stream import BalancedStream, Slot, plan_epoch
from pipeline.data.transforms import train_transform
from tests.conftest import tiny_config


def _stream(cfg, rank=0, world=1, root=None):
    manifest = shards.load_manifest(root or cfg.data.root)
    return BalancedStream(manifest, str(root or cfg.data.root), cfg.sampler,
                          train_transform(cfg.augment, cfg.data.image_size), rank=rank, world_size=world, seed=3)


@pytest.mark.parametrize("world,workers,p", [(1, 1, 2), (2, 1, 2), (2, 2, 2), (3, 2, 2), (2, 1, 5), (3, 1, 7)])
def test_epoch_plan_gives_every_slot_equal_pieces_covering_every_class(tiny_shards, world, workers, p):
    train = shards.load_manifest(tiny_shards)["splits"]["train"]["shards"]
    slots = world * workers
    for epoch in range(3):
        padded = [plan_epoch(train, Slot(r, world, w, workers), p, seed=1, epoch=epoch)
                  for r in range(world) for w in range(workers)]
        batches = -(-24 // (slots * p))
        assert {n for _, _, n in padded} == {batches}  # the same number of batches in every slot
        draws = [d for _, d, _ in padded]
        assert all(sum(d.values()) == batches * p for d in draws)
        assert set().union(*draws) == set(range(24))  # every class, every epoch
        strict = [plan_epoch(train, Slot(r, world, w, workers), p, seed=1, epoch=epoch, pad=False)
                  for r in range(world) for w in range(workers)]
        owned = [c for _, d, _ in strict for c, n in d.items() for _ in range(n)]
        assert len(owned) == len(set(owned)) == (24 // (slots * p)) * slots * p  # one pass: nothing twice


def test_batches_are_p_classes_by_m_images(tiny_cfg):
    stream = _stream(tiny_cfg)
    batches = list(stream)
    assert len(batches) == stream.steps_per_epoch() == 24 // 4
    for images, labels in batches:
        assert images.shape == (12, 3, 32, 32)
        assert sorted(Counter(labels.tolist()).values()) == [3, 3, 3, 3]
    seen = [c for _, labels in batches for c in set(labels.tolist())]
    assert sorted(seen) == list(range(24))  # one pass: every training class once


def test_two_ranks_take_equal_steps_on_disjoint_classes(tiny_cfg):
    per_rank = []
    for rank in range(2):
        stream = _stream(tiny_cfg, rank, 2)
        batches = list(stream)
        assert len(batches) == stream.steps_per_epoch() == 3
        per_rank.append({c for _, labels in batches for c in labels.tolist()})
    assert not per_rank[0] & per_rank[1]
    assert len(per_rank[0] | per_rank[1]) == 24


def test_epochs_reshuffle_and_seed_repeats(tiny_cfg):
    def order(epoch):
        stream = _stream(tiny_cfg)
        stream.set_epoch(epoch)
        return [labels[0].item() for _, labels in stream]

    assert order(0) == order(0)
    assert order(0) != order(1)


def test_loader_workers_split_the_rank(tiny_cfg):
    from pipeline.data.stream import train_loader

    cfg = tiny_cfg.model_copy(update={"sampler": tiny_cfg.sampler.model_copy(update={"loader_workers": 2})})
    stream = _stream(cfg)
    batches = list(train_loader(stream))
    assert len(batches) == stream.steps_per_epoch() == 2 * (24 // (2 * 4))
    classes = [c for _, labels in batches for c in set(labels.tolist())]
    assert len(classes) == len(set(classes))


def test_corrupt_image_and_truncated_shard_are_skipped_not_fatal(tmp_path, tiny_shards):
    root = tmp_path / "broken"
    shutil.copytree(tiny_shards, root)
    manifest = shards.load_manifest(root)
    files = [s["file"] for s in manifest["splits"]["train"]["shards"]]
    # 1) one image's bytes replaced by garbage
    first = root / files[0]
    with tarfile.open(first) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(first, "w") as tar:
        for i, (m, data) in enumerate(members):
            if m.name.endswith(".png") and i < 3:
                data = b"not an image"
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    # 2) the last shard cut in half
    last = root / files[-1]
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])

    cfg = tiny_config(tmp_path, **{"data.root": str(root)})
    stream = _stream(cfg, root=root)
    batches = list(stream)
    assert len(batches) == stream.steps_per_epoch()  # the same number of steps as intact data
    assert stream.stats.skipped >= 2
    assert all(images.shape[0] == 12 for images, _ in batches)
    assert torch.isfinite(torch.stack([b[0] for b in batches])).all()


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
