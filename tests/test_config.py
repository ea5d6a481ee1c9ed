from pathlib import Path

import pytest

from pipeline import config as config_mod
from pipeline.config import Config, ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_the_demo_config_loads_what_its_file_says():
    cfg = config_mod.load(ROOT / "configs" / "demo.yaml")
    assert cfg.data.source == "emoji" and cfg.model.backbone == "efficientnet_lite0"
    assert cfg.model.pretrained == "imagenet" and cfg.train.epochs != Config().train.epochs


def test_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 5\n")
    cfg = config_mod.load(path, ["model.adversary.weight=0.3", "model.attention.taps=[layer1,layer3]",
                                 "model.pretrained=null", "train.device=cpu"])
    assert cfg.train.epochs == 5
    assert cfg.model.adversary.weight == 0.3
    assert cfg.model.attention.taps == ["layer1", "layer3"]
    assert cfg.train.device == "cpu"
    assert cfg.flat()["model.adversary.weight"] == 0.3


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.adversry.weight=1"], "model.adversry: unknown key; allowed: backbone, pretrained"),
        (["train.epochs=many"], "train.epochs: Input should be a valid integer"),
        (["train.epochs=0"], "train.epochs: Input should be greater than or equal to 1"),
        (["loss.name=arcface"], "loss.name: Input should be 'multi_similarity', 'contrastive', 'triplet', 'margin'"),
        (["sampler.batch_size=10"], "sampler: batch_size (10) must equal classes_per_batch x images_per_class"),
        (["epochs"], "--set 'epochs': expected key=value"),
    ],
)
def test_bad_values_name_the_key(overrides, expected):
    with pytest.raises(ConfigError) as err:
        config_mod.load(None, overrides)
    assert str(err.value).startswith(expected)
    assert "\n" not in str(err.value)


def test_missing_file_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config_mod.load(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train", "--set", "model.attention.taps=[layer9]"],
         "model.attention.taps: 'layer9' is not a layer of resnet18"),
        (["train", "--set", "data.imagesize=3"],
         "data.imagesize: unknown key; allowed: source, path, root, image_size"),
        (["train", "--set", "loss.params={margin: 0.2}"],
         "loss.params: 'margin' is not a parameter of multi_similarity"),
    ],
)
def test_cli_config_errors_exit_2_with_one_line(args, expected, tmp_path, gdml):
    places = ["--set", f"data.root={tmp_path / 'shards'}", "--set", f"train.storage_path={tmp_path / 'ray'}"]
    proc = gdml(*args, *places, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"gdml: config error: {expected}")
    # failed before any work: no shards built, no checkpoint folder, no MLflow store
    assert not (tmp_path / "shards").exists() and not (tmp_path / "ray").exists()
    assert not (tmp_path / "mlflow.db").exists()


def test_gdml_backbones_lists_taps_with_channels_and_stride(tmp_path, gdml):
    proc = gdml("backbones", "--image-size", "64", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "bninception  (default taps: inception_4d, inception_4e, inception_5a)" in proc.stdout
    assert any(line.split()[:5] == ["inception_4e", "channels", "1056", "stride", "32"]
               for line in proc.stdout.splitlines())


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path, monkeypatch):
    """The files themselves: ImageNet weights that this offline machine cannot download are taken as available."""
    import dataclasses

    import yaml

    from pipeline.model.backbone import BACKBONES

    for name, spec in BACKBONES.items():
        monkeypatch.setitem(BACKBONES, name, dataclasses.replace(spec, imagenet_problem=lambda: None))

    if "search" in yaml.safe_load(path.read_text()):
        from tuning import sweep

        spec, base = sweep.load_spec(path)
        assert spec.search.space
    else:
        config_mod.load(path)


def test_registries_are_the_one_list_of_names():
    from pipeline import names
    from pipeline.data.sources import SOURCES
    from pipeline.evaluation.metrics import ENGINES
    from pipeline.model.adversary import MODES
    from pipeline.model.attention import KINDS
    from pipeline.model.backbone import BACKBONES
    from pipeline.objectives import LOSSES
    from pipeline.runtime import DEVICES

    # each implementation's registry holds exactly the names the config checks against
    assert (list(SOURCES), list(BACKBONES), list(LOSSES), list(KINDS), MODES, DEVICES, ENGINES) == (
        list(names.SOURCES), list(names.BACKBONES), list(names.LOSSES), list(names.ATTENTION_KINDS),
        names.ADVERSARY_MODES, names.DEVICES, names.ENGINES)
    for key, registry in (("data.source", SOURCES), ("model.backbone", BACKBONES), ("loss.name", LOSSES),
                          ("model.attention.kind", KINDS)):
        for name in registry:
            assert config_mod.load(None, [f"{key}={name}"]).flat()[key] == name
        with pytest.raises(ConfigError, match=f"{key}: Input should be .*{list(registry)[-1]!r}"):
            config_mod.load(None, [f"{key}=not-one-of-them"])


def test_metric_order_keeps_every_key():
    from pipeline.evaluation.metrics import ordered

    keys = ["nmi", "recall_at_10", "map_at_r", "new_metric", "recall_at_2", "precision_at_1", "r_precision"]
    assert ordered(keys) == ["recall_at_2", "recall_at_10", "map_at_r", "r_precision", "precision_at_1", "nmi",
                             "new_metric"]


@pytest.mark.parametrize("value", ["[]", "[0, 1]", "[-4]"])
def test_recall_at_needs_positive_ks(value):
    with pytest.raises(ConfigError, match="eval.recall_at: expected at least one K"):
        config_mod.load(None, [f"eval.recall_at={value}"])


def test_imagenet_weights_that_cannot_be_had_stop_before_any_work(tmp_path, gdml):
    proc = gdml("train", "--set", "model.backbone=bninception", "--set", "model.pretrained=imagenet",
                "--set", f"data.root={tmp_path / 'shards'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "gdml: config error: model.pretrained: imagenet for bninception: BN-Inception's ImageNet weights do not ship "
        "in a package; download bn_inception-52deb4733.pth and set model.pretrained to its path"]
    assert not (tmp_path / "shards").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(("args", "expected"), [
    (["--local", "--set", "train.storage_path=s3://bucket/ray"],
     "gdml: config error: train.storage_path: local mode keeps checkpoints on a local path, got s3://bucket/ray"),
    (["--set", "train.val_fraction=0.9999"],
     "gdml: config error: train.val_fraction=0.9999 holds out 712 of 712 training classes"),
    (["--set", "train.val_fraction=0.99"],
     "gdml: config error: sampler.classes_per_batch: 16 classes per batch, but"),
    (["--set", "sampler.classes_per_batch=400", "--set", "sampler.batch_size=1600"],
     "gdml: config error: sampler.classes_per_batch: 400 per batch x 2 ranks x 1 loader workers needs at least 800"),
])
def test_data_checks_run_on_the_plan_before_shards_are_built(args, expected, tmp_path, gdml):
    proc = gdml("train", "--set", f"data.root={tmp_path / 'shards'}", "--set", f"train.storage_path={tmp_path / 'ray'}",
                *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith(expected), proc.stderr
    assert not (tmp_path / "shards").exists() and not (tmp_path / "ray").exists()  # no shards, no checkpoints
    assert not (tmp_path / "mlflow.db").exists()  # nor an MLflow run


def test_a_folder_with_one_class_is_one_line_not_a_traceback(tmp_path, gdml):
    from tests.data.test_readers import _jpeg

    _jpeg(tmp_path / "raw" / "only" / "a.jpg", 1)
    _jpeg(tmp_path / "raw" / "only" / "b.jpg", 2)
    proc = gdml("shards", "build", "--source", "folder", "--path", tmp_path / "raw", "--out", tmp_path / "s")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "gdml: config error: data.train_fraction: 0.5 of 1 classes leaves no class for the training or the test "
        "split (a data set needs at least 2 classes)"]
