"""The full model: backbone taps -> attention pooling -> fusion -> L2-normalised embedding (+ adversary)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.config import ModelConfig
from pipeline.model.adversary import ClassAdversary
from pipeline.model.attention import TapPooling
from pipeline.model.backbone import Backbone


class Embedder(nn.Module):
    """``forward(x, lam)`` returns ``(embedding, adversary_logits or None)``."""

    def __init__(self, cfg: ModelConfig, num_train_classes: int, image_size: int = 64) -> None:
        super().__init__()
        att = cfg.attention
        taps = list(att.taps) if att.enabled else []
        self.backbone = Backbone(cfg.backbone, taps, cfg.last_layer, cfg.pretrained, probe_size=image_size)
        last_channels = self.backbone.info["last"].channels
        self.pool = (
            TapPooling({t: self.backbone.info[t].channels for t in taps}, last_channels, att.width, att.kind)
            if taps else None
        )
        features = last_channels + (self.pool.out_features if self.pool else 0)
        self.embed = nn.Linear(features, cfg.embedding_size)
        adv = cfg.adversary
        self.adversary_input = adv.input
        self.adversary = (
            ClassAdversary(features if adv.input == "features" else cfg.embedding_size, num_train_classes,
                           adv.hidden, adv.dropout)
            if adv.enabled else None
        )

    def head_parameters(self) -> list[nn.Parameter]:
        """Everything but the backbone (trained at ``train.lr_heads``)."""
        return [p for n, p in self.named_parameters() if not n.startswith("backbone.")]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.backbone(x)
        last = maps["last"]
        parts = [last.mean(dim=(2, 3))]
        if self.pool is not None:
            parts.append(self.pool(maps, last))
        return torch.cat(parts, dim=1)

    def forward(self, x: torch.Tensor, lam: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        feats = self.features(x)
        emb = F.normalize(self.embed(feats), dim=1)
        logits = None
        if self.adversary is not None and self.training:
            logits = self.adversary(feats if self.adversary_input == "features" else emb, lam)
        return emb, logits
