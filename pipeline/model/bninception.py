"""BN-Inception (Ioffe & Szegedy, 2015), named to load the Caffe-converted ImageNet weights
(``bn_inception-52deb4733.pth``); it converts gdml's normalised RGB input to that file's BGR space itself.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# Per block: 1x1, (3x3 reduce, 3x3), (double reduce, double 3x3), pool kind, pool projection, stride.
_BLOCKS: dict[str, tuple[int, tuple[int, int], tuple[int, int], str, int, int]] = {
    "inception_3a": (64, (64, 64), (64, 96), "avg", 32, 1),
    "inception_3b": (64, (64, 96), (64, 96), "avg", 64, 1),
    "inception_3c": (0, (128, 160), (64, 96), "max", 0, 2),
    "inception_4a": (224, (64, 96), (96, 128), "avg", 128, 1),
    "inception_4b": (192, (96, 128), (96, 128), "avg", 128, 1),
    "inception_4c": (160, (128, 160), (128, 160), "avg", 128, 1),
    "inception_4d": (96, (128, 192), (160, 192), "avg", 128, 1),
    "inception_4e": (0, (128, 192), (192, 256), "max", 0, 2),
    "inception_5a": (352, (192, 320), (160, 224), "avg", 128, 1),
    "inception_5b": (352, (192, 320), (192, 224), "max", 128, 1),
}
BLOCK_NAMES = tuple(_BLOCKS)
_BGR_MEAN = (104.0, 117.0, 128.0)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class InceptionBlock(nn.Module):
    def __init__(self, in_ch: int, one: int, red3: tuple[int, int], dbl: tuple[int, int], pool: str, proj: int,
                 stride: int) -> None:
        super().__init__()
        self.branches: list[list[str]] = []

        def conv(name: str, cin: int, cout: int, k: int, s: int = 1) -> None:
            self.add_module(name, nn.Conv2d(cin, cout, k, stride=s, padding=k // 2))
            self.add_module(f"{name}_bn", nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1))

        if one:
            conv("1x1", in_ch, one, 1)
            self.branches.append(["1x1"])
        conv("3x3_reduce", in_ch, red3[0], 1)
        conv("3x3", red3[0], red3[1], 3, stride)
        self.branches.append(["3x3_reduce", "3x3"])
        conv("double_3x3_reduce", in_ch, dbl[0], 1)
        conv("double_3x3_1", dbl[0], dbl[1], 3)
        conv("double_3x3_2", dbl[1], dbl[1], 3, stride)
        self.branches.append(["double_3x3_reduce", "double_3x3_1", "double_3x3_2"])
        if pool == "avg":
            self.pool = nn.AvgPool2d(3, stride=stride, padding=1, ceil_mode=True, count_include_pad=True)
        else:
            self.pool = nn.MaxPool2d(3, stride=stride, padding=0 if stride == 2 else 1, ceil_mode=True)
        if proj:
            conv("pool_proj", in_ch, proj, 1)
        self.proj = bool(proj)
        self.out_channels = one + red3[1] + dbl[1] + (proj or in_ch)

    def _run(self, names: list[str], x: torch.Tensor) -> torch.Tensor:
        for name in names:
            x = torch.relu(getattr(self, f"{name}_bn")(getattr(self, name)(x)))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [self._run(names, x) for names in self.branches]
        pooled = self.pool(x)
        outs.append(self._run(["pool_proj"], pooled) if self.proj else pooled)
        return torch.cat(outs, dim=1)


class BNInception(nn.Module):
    """BN-Inception up to ``inception_5b`` (1024 channels, stride 32) plus a classifier for completeness."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1_7x7_s2 = nn.Conv2d(3, 64, 7, stride=2, padding=3)
        self.conv1_7x7_s2_bn = nn.BatchNorm2d(64)
        self.pool1_3x3_s2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2_3x3_reduce = nn.Conv2d(64, 64, 1)
        self.conv2_3x3_reduce_bn = nn.BatchNorm2d(64)
        self.conv2_3x3 = nn.Conv2d(64, 192, 3, padding=1)
        self.conv2_3x3_bn = nn.BatchNorm2d(192)
        self.pool2_3x3_s2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        channels = 192
        for name, args in _BLOCKS.items():
            block = InceptionBlock(channels, *args)
            self.add_module(name, block)
            channels = block.out_channels
        self.out_channels = channels
        self.last_linear = nn.Linear(channels, num_classes)
        self.register_buffer("_rgb_mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_rgb_std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_bgr_mean", torch.tensor(_BGR_MEAN).view(1, 3, 1, 1), persistent=False)

    def to_caffe_space(self, x: torch.Tensor) -> torch.Tensor:
        rgb255 = (x * self._rgb_std + self._rgb_mean) * 255.0
        return rgb255.flip(1) - self._bgr_mean

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.to_caffe_space(x)
        x = self.pool1_3x3_s2(torch.relu(self.conv1_7x7_s2_bn(self.conv1_7x7_s2(x))))
        x = torch.relu(self.conv2_3x3_reduce_bn(self.conv2_3x3_reduce(x)))
        x = self.pool2_3x3_s2(torch.relu(self.conv2_3x3_bn(self.conv2_3x3(x))))
        for name in BLOCK_NAMES:
            x = getattr(self, name)(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_linear(self.features(x).mean(dim=(2, 3)))


def standard_key(key: str) -> str:
    """This model's state_dict key -> the standard weights file's flat key."""
    block, _, rest = key.partition(".")
    return f"{block}_{rest}" if block in _BLOCKS else key


def load_standard_weights(model: BNInception, path: str | Path) -> None:
    """Load the Caffe-converted ImageNet weights file (flat keys; the classifier may differ)."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    own = model.state_dict()
    mapped = {}
    for key, value in own.items():
        flat = standard_key(key)
        if flat in state and state[flat].shape == value.shape:
            mapped[key] = state[flat].reshape(value.shape)
    missing = [k for k in own if k not in mapped and not k.startswith("last_linear") and "num_batches" not in k]
    if missing:
        raise ValueError(f"model.pretrained: {path} is not a BN-Inception weights file "
                         f"({len(missing)} weights missing, e.g. {missing[:3]})")
    model.load_state_dict(mapped, strict=False)
