import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import config as config_mod
from pipeline.config import Config, ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_and_demo_config_are_valid():
    assert Config().sampler.batch_size == Config().sampler.classes_per_batch * Config().sampler.images_per_class
    cfg = config_mod.load(ROOT / "configs" / "demo.yaml")
    assert cfg.data.source == "emoji"


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
        (["train", "--set", "model.attention.taps=[layer9]"], "model.attention.taps: 'layer9' is not a layer of resnet18"),
        (["train", "--set", "data.imagesize=3"], "data.imagesize: unknown key; allowed: source, path, root, image_size"),
        (["train", "--set", "loss.params={margin: 0.2}"], "loss.params: 'margin' is not a parameter of multi_similarity"),
    ],
)
def test_cli_config_errors_exit_2_with_one_line(args, expected, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"gdml: config error: {expected}")
    assert not (tmp_path / "mlflow.db").exists()  # failed before any work


def test_gdml_backbones_lists_taps_with_channels_and_stride(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "backbones", "--image-size", "64"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "bninception  (default taps: inception_4d, inception_4e, inception_5a)" in proc.stdout
    assert any(line.split()[:5] == ["inception_4e", "channels", "1056", "stride", "32"] for line in proc.stdout.splitlines())


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    import yaml

    if "search" in yaml.safe_load(path.read_text()):
        from tuning import sweep

        spec, base = sweep.load_spec(path)
        assert spec.search.space
    else:
        config_mod.load(path)


def test_registries_are_the_one_list_of_names():
    from pipeline.data.sources import SOURCES
    from pipeline.model.attention import KINDS
    from pipeline.model.backbone import BACKBONES
    from pipeline.objectives import LOSSES

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
