"""The full model: backbone taps -> attention pooling -> fusion -> L2-normalised embedding (+ adversary)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.config import ModelConfig
from pipeline.model.adversary import ClassAdversary
from pipeline.model.attention import TapPooling
from pipeline.model.backbone import Backbone, default_taps


def resolved_taps(cfg: ModelConfig) -> list[str]:
    """The taps a model config uses: none without attention, else the configured or the backbone's default."""
    att = cfg.attention
    if not att.enabled:
        return []
    return list(att.taps) if att.taps is not None else default_taps(cfg.backbone)


class Embedder(nn.Module):
    """``forward(x, lam)`` returns ``(embedding, adversary_logits or None)``."""

    def __init__(self, cfg: ModelConfig, num_train_classes: int, image_size: int = 64) -> None:
        super().__init__()
        att = cfg.attention
        taps = resolved_taps(cfg)
        self.backbone = Backbone(cfg.backbone, taps, cfg.pretrained, cfg.freeze_bn, probe_size=image_size)
        last_channels = self.backbone.info["last"].channels
        self.pool = (
            TapPooling({t: self.backbone.info[t].channels for t in taps}, last_channels, att.width, att.kind,
                       att.shared)
            if taps else None
        )
        self.fusion = cfg.fusion
        n_taps = len(taps)
        features = last_channels + n_taps * att.width
        if cfg.fusion == "concat":
            self.embed = nn.Linear(features, cfg.embedding_size)
        else:
            self.embed_last = nn.Linear(last_channels, cfg.embedding_size)
            self.embed_taps = nn.ModuleList(nn.Linear(att.width, cfg.embedding_size) for _ in range(n_taps))
        adv = cfg.adversary
        self.adversary_input = adv.input
        self.adversary = (
            ClassAdversary(features if adv.input == "features" else cfg.embedding_size, num_train_classes,
                           adv.hidden, adv.dropout)
            if adv.enabled else None
        )

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by learning-rate group: backbone, heads (attention + embedding), adversary."""
        groups: dict[str, list[nn.Parameter]] = {"backbone": [], "heads": [], "adversary": []}
        for name, p in self.named_parameters():
            if p.requires_grad:
                groups[name.split(".")[0] if name.startswith(("backbone.", "adversary.")) else "heads"].append(p)
        return groups

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(global-pooled last map, tap descriptors (B, taps, width) or None)."""
        maps = self.backbone(x)
        last = maps["last"]
        return last.mean(dim=(2, 3)), (self.pool(maps, last) if self.pool is not None else None)

    @staticmethod
    def _concat(last: torch.Tensor, desc: torch.Tensor | None) -> torch.Tensor:
        return last if desc is None else torch.cat([last, desc.flatten(1)], dim=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The fused feature vector the adversary reads: pooled last map and tap descriptors, concatenated."""
        return self._concat(*self.forward_features(x))

    def _embed(self, last: torch.Tensor, desc: torch.Tensor | None) -> torch.Tensor:
        if self.fusion == "concat":
            return self.embed(self._concat(last, desc))
        out = self.embed_last(last)
        for i, layer in enumerate(self.embed_taps):
            out = out + layer(desc[:, i])
        return out

    def forward(self, x: torch.Tensor, lam: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        last, desc = self.forward_features(x)
        emb = F.normalize(self._embed(last, desc), dim=1)
        logits = None
        if self.adversary is not None and self.training:
            source = self._concat(last, desc) if self.adversary_input == "features" else emb
            logits = self.adversary(source, lam)
        return emb, logits
