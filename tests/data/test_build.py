"""gdml shards build: deterministic, parallel, resumable, re-encoding, and strict about unreadable images."""

import io
import tarfile

import pytest
from PIL import Image

from pipeline import config as config_mod
from pipeline.data import shards
from tests.data.test_readers import _jpeg, make_sop


def _cfg(tmp_path, out, **extra):
    return config_mod.load(None, ["data.source=sop", f"data.path={tmp_path / 'raw'}", f"data.root={tmp_path / out}",
                                  "data.shard_max_samples=4", *[f"{k}={v}" for k, v in extra.items()]])


def _shas(manifest):
    return [sh["sha256"] for s in sorted(manifest.splits) for sh in manifest.shards(s)]


def test_parallel_build_is_byte_identical_to_serial(tmp_path):
    make_sop(tmp_path / "raw")
    serial = shards.build(_cfg(tmp_path, "a", **{"data.build_workers": 1}).data)
    parallel = shards.build(_cfg(tmp_path, "b", **{"data.build_workers": 2}).data)
    assert len(_shas(serial)) == 4 and _shas(serial) == _shas(parallel)


def test_interrupted_build_resumes_and_rebuilds_only_what_is_missing(tmp_path):
    make_sop(tmp_path / "raw")
    cfg = _cfg(tmp_path, "s", **{"data.build_workers": 1})
    first = shards.build(cfg.data)
    out = tmp_path / "s"
    # An interruption: the manifest is not written yet, one shard never finished.
    (out / shards.MANIFEST).unlink()
    (out / "test-00001.tar").unlink()
    (out / "test-00001.tar.json").unlink()
    kept = (out / "train-00000.tar").stat().st_mtime_ns
    again = shards.build(cfg.data)
    assert (out / "train-00000.tar").stat().st_mtime_ns == kept  # finished shards are not redone
    assert _shas(again) == _shas(first)


def test_unreadable_images_are_listed_and_left_out_or_fail_the_build(tmp_path):
    make_sop(tmp_path / "raw")
    (tmp_path / "raw" / "bicycle_final" / "1_0.JPG").write_bytes(b"not a jpeg")
    good = tmp_path / "raw" / "bicycle_final" / "2_1.JPG"
    good.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])  # truncated
    manifest = shards.build(_cfg(tmp_path, "ok", **{"data.max_bad_fraction": 0.1}).data)
    assert len(manifest.bad) == 2 and any("1_0.JPG" in b for b in manifest.bad)
    assert manifest.images("train") == 10
    with pytest.raises(shards.ShardBuildError, match="2 of 24 images are unreadable"):
        shards.build(_cfg(tmp_path, "strict", **{"data.max_bad_fraction": 0.05}).data)


def test_max_side_reencodes_large_images(tmp_path):
    _jpeg(tmp_path / "raw" / "a" / "big.jpg", 1, (300, 200))
    _jpeg(tmp_path / "raw" / "b" / "big.jpg", 2, (200, 300))
    cfg = config_mod.load(None, ["data.source=folder", f"data.path={tmp_path / 'raw'}", f"data.root={tmp_path / 's'}",
                                 "data.max_side=64", "data.train_classes=1"])
    manifest = shards.build(cfg.data)
    with tarfile.open(tmp_path / "s" / manifest.shards("train")[0]["file"]) as tar:
        data = tar.extractfile([n for n in tar.getnames() if n.endswith(".jpg")][0]).read()
    assert max(Image.open(io.BytesIO(data)).size) == 64


def test_cli_builds_with_flags_and_reports(tmp_path, gdml):
    make_sop(tmp_path / "raw")
    proc = gdml("shards", "build", "--source", "sop", "--path", tmp_path / "raw", "--out", tmp_path / "cli",
                "--shard-size", "3")
    assert proc.returncode == 0, proc.stderr
    assert "train: 4 classes, 12 images, 4 shards" in proc.stdout
    proc = gdml("shards", "build", "--source", "cub", "--path", tmp_path / "nothing", "--out", tmp_path / "x")
    assert proc.returncode == 2 and proc.stderr.strip().startswith("gdml: data.path:")
