"""Pooling intermediate feature maps into descriptors: additive spatial attention ("Learn to Pay Attention"),
CBAM, or plain averaging (the ablation). Details: docs/internals.md.
"""

from __future__ import annotations

import torch
from torch import nn

KINDS = {
    "additive": "Learn-to-Pay-Attention style spatial attention, queried by the last block",
    "cbam": "channel then spatial attention (CBAM)",
    "avg": "plain global average pooling of each projected tap (the ablation)",
}
"""``model.attention.kind`` -> what it is; the config accepts exactly these names."""


class AdditiveScore(nn.Module):
    """Softmax weights over positions from tanh(local + query)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.score = nn.Conv2d(width, 1, 1)

    def forward(self, local: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        return self.score(torch.tanh(local + query[:, :, None, None])).flatten(1).softmax(dim=1)


class CBAM(nn.Module):
    def __init__(self, width: int, reduction: int = 8) -> None:
        super().__init__()
        hidden = max(4, width // reduction)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, width))
        self.spatial = nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        channel = torch.sigmoid(self.mlp(x.mean(dim=(2, 3))) + self.mlp(x.amax(dim=(2, 3))))
        x = x * channel[:, :, None, None]
        spatial = torch.sigmoid(self.spatial(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)))
        x = x * spatial
        return x.mean(dim=(2, 3)), spatial.flatten(1)


class TapPooling(nn.Module):
    """Maps ``{tap: (B, C_t, H, W)}`` plus the last map to ``(B, len(taps), width)`` descriptors."""

    def __init__(self, tap_channels: dict[str, int], last_channels: int, width: int, kind: str = "additive",
                 shared: bool = True) -> None:
        super().__init__()
        self.kind = kind
        self.taps = list(tap_channels)
        self.width = width
        # A list in tap order: tap names may hold dots ('_blocks.5'), which module names may not.
        self.project = nn.ModuleList(nn.Conv2d(c, width, 1, bias=False) for c in tap_channels.values())
        count = 1 if shared else len(self.taps)
        if kind == "additive":
            self.query = nn.Linear(last_channels, width)
            self.attend = nn.ModuleList(AdditiveScore(width) for _ in range(count))
        elif kind == "cbam":
            self.attend = nn.ModuleList(CBAM(width) for _ in range(count))
        self.shared = shared
        self.last_weights: dict[str, torch.Tensor] = {}
        """The attention weights over positions of the latest forward pass, per tap, shaped like the tap's map
        (B, H, W): the attention-map plots read them."""

    def _module(self, i: int) -> nn.Module:
        return self.attend[0 if self.shared else i]

    def forward(self, maps: dict[str, torch.Tensor], query_from: torch.Tensor,
                detached_query: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Descriptors (B, taps, width); ``query_from``: the pooled last-layer feature (B, C) that queries additive
        attention. ``detached_query``: also return the descriptors pooled with the query cut from the gradient,
        so that a loss on them sends nothing back to the last layer."""
        out, cut = [], []
        query = self.query(query_from) if self.kind == "additive" else None
        for i, tap in enumerate(self.taps):
            local = self.project[i](maps[tap])
            h, w = local.shape[-2:]
            if self.kind == "avg":
                out.append(local.mean(dim=(2, 3)))
                cut.append(out[-1])
                continue
            if self.kind == "additive":
                weights = self._module(i)(local, query)
                out.append(torch.einsum("bn,bcn->bc", weights, local.flatten(2)))
                if detached_query:
                    cut.append(torch.einsum("bn,bcn->bc", self._module(i)(local, query.detach()), local.flatten(2)))
            else:
                pooled, weights = self._module(i)(local)
                out.append(pooled)
                cut.append(pooled)
            self.last_weights[tap] = weights.detach().view(-1, h, w)
        if detached_query:
            return torch.stack(out, dim=1), torch.stack(cut, dim=1)
        return torch.stack(out, dim=1)
