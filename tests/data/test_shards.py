import json
import tarfile

from pipeline.data import shards
from tests.conftest import tiny_config


def test_manifest_splits_classes_in_code_point_order(tiny_shards):
    manifest = shards.load_manifest(tiny_shards)
    classes = manifest.data["classes"]
    assert len(classes) == 48
    assert [c["split"] for c in classes] == ["train"] * 24 + ["test"] * 24
    for split in ("train", "test"):
        info = manifest.data["splits"][split]
        assert info["classes"] == 24
        assert info["samples"] == sum(s["samples"] for s in info["shards"]) >= 48
        assert len(info["shards"]) > 1
        ids = [g[0] for s in info["shards"] for g in s["groups"]]
        assert ids == sorted(ids) and len(set(ids)) == 24
    assert shards.verify(tiny_shards) == []


def test_shard_holds_whole_classes_with_label_and_image(tiny_shards):
    manifest = shards.load_manifest(tiny_shards)
    first = manifest.shards("train")[0]
    with tarfile.open(tiny_shards / first["file"]) as tar:
        names = tar.getnames()
        assert len(names) == 3 * first["samples"]
        sample = json.load(tar.extractfile([n for n in names if n.endswith(".json")][0]))
        cls = int(tar.extractfile([n for n in names if n.endswith(".cls")][0]).read())
    assert cls == first["groups"][0][0]
    assert manifest.data["classes"][cls]["key"] == sample["class"]


def test_build_is_deterministic_and_reused(tmp_path, tiny_shards):
    cfg = tiny_config(tmp_path, **{"data.root": str(tmp_path / "again")})
    rebuilt = shards.build(cfg.data)
    original = shards.load_manifest(tiny_shards)
    assert [s["sha256"] for s in rebuilt.shards("train")] == \
        [s["sha256"] for s in original.shards("train")]
    stamp = (tmp_path / "again" / "manifest.json").stat().st_mtime_ns
    assert shards.is_current(cfg.data.root, cfg.data)
    shards.ensure(cfg.data)
    assert (tmp_path / "again" / "manifest.json").stat().st_mtime_ns == stamp
    other = cfg.data.model_copy(update={"image_size": 40})
    assert not shards.is_current(cfg.data.root, other)


def test_missing_shard_file_triggers_rebuild(tmp_path):
    cfg = tiny_config(tmp_path, **{"data.root": str(tmp_path / "s"), "data.max_classes": 8})
    manifest = shards.build(cfg.data)
    (tmp_path / "s" / manifest.shards("test")[0]["file"]).unlink()
    assert not shards.is_current(cfg.data.root, cfg.data)
