"""Backbones with intermediate feature maps taken by node name; widths and strides read from the model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision import models
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names


@dataclass(frozen=True)
class BackboneSpec:
    build: Callable[[], nn.Module]
    last: str
    """Node whose output is the final feature map."""
    blocks: tuple[str, ...]
    """The block names offered as taps (any traced node name is accepted too)."""


_RESNET_BLOCKS = ("conv1", "layer1", "layer2", "layer3", "layer4")
BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec(lambda: models.resnet18(weights=None), "layer4", _RESNET_BLOCKS),
    "resnet50": BackboneSpec(lambda: models.resnet50(weights=None), "layer4", _RESNET_BLOCKS),
}


def valid_taps(name: str) -> list[str]:
    return list(BACKBONES[name].blocks)


def check_taps(name: str, taps: list[str], last: str | None = None) -> str | None:
    """None when every tap is a node of the backbone, else a message listing the valid ones."""
    spec = BACKBONES[name]
    nodes = set(get_graph_node_names(spec.build())[1])
    for tap in [*taps, *([last] if last else [])]:
        # A module name stands for its last node, as create_feature_extractor takes it.
        if tap not in nodes and not any(n.startswith(tap + ".") for n in nodes):
            return f"{tap!r} is not a layer of {name}; valid: {', '.join(spec.blocks)} (or any traced node name)"
    if len(set(taps)) != len(taps):
        return f"taps repeat a layer: {taps}"
    return None


@dataclass(frozen=True)
class TapInfo:
    name: str
    channels: int
    reduction: int


class Backbone(nn.Module):
    """Returns ``{tap: map, ..., 'last': map}`` for the named taps and the last layer."""

    def __init__(self, name: str, taps: list[str], last: str | None = None, pretrained: str | None = None,
                 probe_size: int = 64) -> None:
        super().__init__()
        spec = BACKBONES[name]
        net = spec.build()
        if pretrained:
            load_weights(net, pretrained)
        self.last_name = last or spec.last
        nodes = {t: t for t in taps}
        nodes[self.last_name] = "last"
        self.body = create_feature_extractor(net, return_nodes=nodes)
        self.taps = list(taps)
        self.info = self._probe(probe_size)

    @torch.no_grad()
    def _probe(self, size: int) -> dict[str, TapInfo]:
        was_training = self.body.training
        self.body.eval()
        out = self.body(torch.zeros(1, 3, size, size))
        self.body.train(was_training)
        return {k: TapInfo(k, v.shape[1], size // v.shape[-1]) for k, v in out.items()}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.body(x)


def load_weights(net: nn.Module, path: str) -> None:
    """Load a local state_dict (the classifier may be missing or differ); nothing is downloaded."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model.pretrained: {p} does not exist")
    state = torch.load(p, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    own = net.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in usable and not k.startswith("fc.")]
    if missing:
        raise ValueError(f"model.pretrained: {p} lacks {len(missing)} backbone weights, e.g. {missing[:3]}")
    net.load_state_dict(usable, strict=False)
