"""Pooling intermediate feature maps into descriptors: additive spatial attention, or plain averaging.

The additive kind follows "Learn to Pay Attention" (Jetley et al., 2018): each tap's map is projected by
a 1x1 convolution to a common width; the query is the global-pooled last map, projected to that width;
the score of a position is a 1x1 convolution of (map + query), shared across taps; a softmax over
positions weighs the sum that becomes the tap's descriptor.
"""

from __future__ import annotations

import torch
from torch import nn


class TapPooling(nn.Module):
    """Maps ``{tap: (B, C_t, H, W)}`` plus the last map to ``(B, len(taps) * width)`` descriptors."""

    def __init__(self, tap_channels: dict[str, int], last_channels: int, width: int, kind: str = "additive") -> None:
        super().__init__()
        self.kind = kind
        self.taps = list(tap_channels)
        self.project = nn.ModuleDict({t: nn.Conv2d(c, width, 1, bias=False) for t, c in tap_channels.items()})
        if kind == "additive":
            self.query = nn.Linear(last_channels, width)
            self.score = nn.Conv2d(width, 1, 1)
        self.out_features = width * len(self.taps)
        self.last_weights: dict[str, torch.Tensor] = {}

    def forward(self, maps: dict[str, torch.Tensor], last: torch.Tensor) -> torch.Tensor:
        out = []
        query = self.query(last.mean(dim=(2, 3)))[:, :, None, None] if self.kind == "additive" else None
        for tap in self.taps:
            local = self.project[tap](maps[tap])
            if query is None:
                out.append(local.mean(dim=(2, 3)))
                continue
            scores = self.score(local + query).flatten(1)  # (B, H*W)
            weights = scores.softmax(dim=1)
            self.last_weights[tap] = weights.detach()
            out.append(torch.einsum("bn,bcn->bc", weights, local.flatten(2)))
        return torch.cat(out, dim=1)
