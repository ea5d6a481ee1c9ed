"""Readers of the standard benchmarks, on tiny fake trees in their published layouts."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import config as config_mod
from pipeline.data import shards
from pipeline.data.sources import iter_source


def _jpeg(path: Path, seed: int, size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)


def make_cub(root: Path, per_class: int = 2) -> None:
    images, labels, classes = [], [], []
    n = 0
    for c in range(1, 201):
        classes.append(f"{c} {c:03d}.Bird_{c}")
        for k in range(per_class):
            n += 1
            rel = f"{c:03d}.Bird_{c}/Bird_{c}_{k}.jpg"
            images.append(f"{n} {rel}")
            labels.append(f"{n} {c}")
            _jpeg(root / "images" / rel, n, (24, 20))
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "classes.txt").write_text("\n".join(classes) + "\n")


def make_cars(root: Path) -> None:
    from scipy.io import savemat

    dtype = [("relative_im_path", object), ("bbox_x1", object), ("bbox_y1", object), ("bbox_x2", object),
             ("bbox_y2", object), ("class", object), ("test", object)]
    rows = []
    for c in range(1, 197):
        for k in range(2):
            rel = f"car_ims/{(c - 1) * 2 + k + 1:06d}.jpg"
            _jpeg(root / rel, c * 10 + k, (24, 16))
            rows.append((rel, 1, 1, 10, 10, c, k))
    annotations = np.array(rows, dtype=dtype).reshape(1, -1)
    names = np.array([f"Car {c}" for c in range(1, 197)], dtype=object).reshape(1, -1)
    savemat(root / "cars_annos.mat", {"annotations": annotations, "class_names": names})


def make_sop(root: Path) -> None:
    lines = {"train": ["image_id class_id super_class_id path"], "test": ["image_id class_id super_class_id path"]}
    n = 0
    for c in range(1, 9):
        split = "train" if c <= 4 else "test"
        for k in range(3):
            n += 1
            rel = f"bicycle_final/{c}_{k}.JPG"
            _jpeg(root / rel, n)
            lines[split].append(f"{n} {c} 1 {rel}")
    (root / "Ebay_train.txt").write_text("\n".join(lines["train"]) + "\n")
    (root / "Ebay_test.txt").write_text("\n".join(lines["test"]) + "\n")


def make_inshop(root: Path) -> None:
    rows = []
    for item in range(1, 7):
        for k in range(3):
            rel = f"img/WOMEN/Dresses/id_{item:08d}/{k:02d}_1_front.jpg"
            _jpeg(root / rel, item * 10 + k)
            status = "train" if item <= 3 else ("query" if k == 0 else "gallery")
            rows.append(f"{rel} id_{item:08d} {status}")
    (root / "list_eval_partition.txt").write_text(f"{len(rows)}\nimage_name item_id evaluation_status\n"
                                                  + "\n".join(rows) + "\n")


def make_folder(root: Path) -> None:
    for c in ["ant", "bee", "cat", "dog", "eel"]:
        for k in range(2):
            _jpeg(root / c / f"{k}.png".replace(".png", ".jpg"), hash(c) % 1000 + k)


def _cfg(tmp_path: Path, source: str, **extra):
    overrides = [f"data.source={source}", f"data.path={tmp_path / 'raw'}", f"data.root={tmp_path / 'shards'}",
                 "data.build_workers=1", *[f"{k}={v}" for k, v in extra.items()]]
    return config_mod.load(None, overrides)


def test_cub_splits_classes_1_to_100_for_training(tmp_path):
    make_cub(tmp_path / "raw")
    manifest = shards.build(_cfg(tmp_path, "cub").data)
    assert {s: (v["classes"], v["samples"]) for s, v in manifest.data["splits"].items()} == \
        {"train": (100, 200), "test": (100, 200)}
    first_test = manifest.classes("test")[0]
    assert first_test["key"] == "101" and first_test["name"] == "101.Bird_101"


def test_cars196_reads_the_mat_file_and_splits_at_98(tmp_path):
    make_cars(tmp_path / "raw")
    classes = iter_source("cars196", path=str(tmp_path / "raw"))
    assert len(classes) == 196 and classes[0].name == "Car 1"
    assert [c.split for c in classes].count("train") == 98
    assert classes[97].split == "train" and classes[98].split == "test"
    assert all(len(c.images) == 2 for c in classes)


def test_sop_uses_its_train_and_test_lists(tmp_path):
    make_sop(tmp_path / "raw")
    manifest = shards.build(_cfg(tmp_path, "sop").data)
    assert {s: (v["classes"], v["samples"]) for s, v in manifest.data["splits"].items()} == \
        {"train": (4, 12), "test": (4, 12)}


def test_inshop_has_train_query_and_gallery(tmp_path):
    make_inshop(tmp_path / "raw")
    manifest = shards.build(_cfg(tmp_path, "inshop").data)
    assert {s: (v["classes"], v["samples"]) for s, v in manifest.data["splits"].items()} == \
        {"train": (3, 9), "query": (3, 3), "gallery": (3, 6)}
    assert manifest.protocol("test") == ("query", "gallery")


@pytest.mark.parametrize(("rule", "expected"), [(None, 2), (3, 3), ("[bee,eel]", 2)])
def test_image_folder_split_rules(tmp_path, rule, expected):
    make_folder(tmp_path / "raw")
    extra = {} if rule is None else {"data.train_classes": rule}
    manifest = shards.build(_cfg(tmp_path, "folder", **{"data.train_fraction": 0.4, **extra}).data)
    train = [c["key"] for c in manifest.classes("train")]
    assert len(train) == expected
    if rule == "[bee,eel]":
        assert train == ["bee", "eel"]


def test_missing_layout_file_is_named(tmp_path):
    (tmp_path / "raw").mkdir()
    with pytest.raises(FileNotFoundError, match="has no images.txt"):
        iter_source("cub", path=str(tmp_path / "raw"))


def test_inshop_is_evaluated_query_against_gallery(tmp_path):
    import torch

    from pipeline.config import EvalConfig
    from pipeline.evaluation.embed import embed_split
    from pipeline.evaluation.metrics import retrieval_metrics
    from pipeline.evaluation.run import evaluate_model
    from pipeline.model.embedder import Embedder
    from tests.model.test_embedder import model_cfg

    make_inshop(tmp_path / "raw")
    manifest = shards.build(_cfg(tmp_path, "inshop").data)
    torch.manual_seed(0)
    model = Embedder(model_cfg(adversary=False), 3, image_size=32).eval()
    ev = evaluate_model(model, manifest, "test", EvalConfig(recall_at=[1, 2]), 32, progress=False)
    assert (ev.query_split, ev.ref_split) == ("query", "gallery")
    assert len(ev.labels) == 3 and len(ev.ref_labels) == 6
    q, ql, _ = embed_split(model, manifest.split("query"), image_size=32, progress=False)
    g, gl, _ = embed_split(model, manifest.split("gallery"), image_size=32, progress=False)
    assert ev.metrics == retrieval_metrics(q, ql, (1, 2), gallery=g, gallery_labels=gl)  # query vs gallery
    assert ev.metrics["recall_at_2"] >= ev.metrics["recall_at_1"]


def test_inshop_query_and_gallery_know_their_classes_for_the_gap_curve_and_mlflow(tmp_path):
    """In-Shop's query and gallery splits hold the test classes (whose own split is 'test'): the gap curve's unseen
    side samples gallery classes, and each split's MLflow data set counts its own classes and images."""
    import json

    import torch

    from pipeline.config import EvalConfig
    from pipeline.evaluation.diagnostics import gap_metrics, sample_classes, unseen_split
    from pipeline.model.embedder import Embedder
    from tests.model.test_embedder import model_cfg

    make_inshop(tmp_path / "raw")
    manifest = shards.build(_cfg(tmp_path, "inshop").data)
    assert [(c["id"], c["count"]) for c in manifest.classes("query")] == [(3, 1), (4, 1), (5, 1)]
    assert [(c["id"], c["count"]) for c in manifest.classes("gallery")] == [(3, 2), (4, 2), (5, 2)]
    assert manifest.class_ids("test") == [3, 4, 5] and manifest.class_ids("gallery") == []
    profiles = {s: json.loads(manifest.split(s).dataset_input("test")["profile"]) for s in ("query", "gallery")}
    assert [(p["classes"], p["images"]) for p in profiles.values()] == [(3, 3), (3, 6)]
    assert unseen_split(manifest) == "gallery" and sample_classes(manifest, "gallery", set(), 512, 0) == {3, 4, 5}
    torch.manual_seed(0)
    model = Embedder(model_cfg(adversary=False), 3, image_size=32).eval()
    gap = gap_metrics(model, manifest, EvalConfig(recall_at=[1]), 32, 0, set(), {})
    assert set(gap) == {f"gap/{side}{k}" for side in ("", "seen_", "unseen_") for k in ("recall_at_1", "map_at_r")}
