"""The full model: backbone taps -> attention pooling -> fusion -> L2-normalised embedding (+ adversary)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.config import ModelConfig
from pipeline.model.adversary import ClassAdversary
from pipeline.model.attention import TapPooling
from pipeline.model.backbone import Backbone, default_taps


def resolved_taps(cfg: ModelConfig, image_size: int = 64) -> list[str]:
    """The taps a model config uses: none without attention, else the configured or the backbone's default."""
    att = cfg.attention
    if not att.enabled:
        return []
    return list(att.taps) if att.taps is not None else default_taps(cfg.backbone, image_size)


@dataclass
class Adversarial:
    """What the class adversary produced in a training forward pass."""

    logits: torch.Tensor
    """Its class predictions: their cross-entropy trains the head."""
    feature_loss: torch.Tensor | None
    """The features' own loss (confusion mode), None under gradient reversal."""


class Embedder(nn.Module):
    """``forward(x, lam)`` returns ``(embedding, Adversarial or None)``; the adversary runs in training only.

    The adversary reads (``model.adversary.input``) the fused features (pooled last layer and tap descriptors),
    the embedding, or the tap descriptors alone (pooled with the attention query cut from its gradient, so that
    nothing it sends back reaches the last layer). With ``measure_gradients`` on, each training forward records in
    ``grad_norms`` the norm of the gradient that the metric loss (``dml``) and the adversary (``adv``) send to
    that input: whether the adversary's gradient is noise, balanced, or dominating.
    """

    def __init__(self, cfg: ModelConfig, num_train_classes: int, image_size: int = 64) -> None:
        super().__init__()
        att = cfg.attention
        taps = resolved_taps(cfg, image_size)
        self.backbone = Backbone(cfg.backbone, taps, cfg.pretrained, cfg.freeze_bn, probe_size=image_size)
        last_channels = self.backbone.info["pooled"].channels
        self.pool = (
            TapPooling({t: self.backbone.info[t].channels for t in taps}, last_channels, att.width, att.kind,
                       att.shared)
            if taps else None
        )
        self.fusion = cfg.fusion
        self.last_channels, self.n_taps, self.width = last_channels, len(taps), att.width
        features = last_channels + len(taps) * att.width
        if cfg.fusion == "concat":
            self.embed = nn.Linear(features, cfg.embedding_size)
        else:
            self.embed_last = nn.Linear(last_channels, cfg.embedding_size)
            self.embed_taps = nn.ModuleList(nn.Linear(att.width, cfg.embedding_size) for _ in range(len(taps)))
        adv = cfg.adversary
        self.adversary_input = adv.input
        inputs = {"features": features, "embedding": cfg.embedding_size, "taps": len(taps) * att.width}
        self.adversary = (
            ClassAdversary(inputs[adv.input], num_train_classes, adv.hidden, adv.dropout, adv.mode)
            if adv.enabled else None
        )
        self.measure_gradients = False
        self.grad_norms: dict[str, torch.Tensor] = {}

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by learning-rate group: backbone, heads (attention + embedding), adversary."""
        groups: dict[str, list[nn.Parameter]] = {"backbone": [], "heads": [], "adversary": []}
        for name, p in self.named_parameters():
            if p.requires_grad:
                groups[name.split(".")[0] if name.startswith(("backbone.", "adversary.")) else "heads"].append(p)
        return groups

    def forward_features(self, x: torch.Tensor, detached_query: bool = False):
        """(pooled last-layer feature (B, C), tap descriptors (B, taps, width) or None[, descriptors pooled with the
        attention query cut from the gradient])."""
        maps = self.backbone(x)
        last = maps["pooled"]
        if self.pool is None:
            return (last, None, None) if detached_query else (last, None)
        pooled = self.pool(maps, last, detached_query)
        return (last, *pooled) if detached_query else (last, pooled)

    def _embed(self, fused: torch.Tensor) -> torch.Tensor:
        """The embedding (before normalisation) of the fused vector [last feature, tap descriptors...]."""
        if self.fusion == "concat":
            return self.embed(fused)
        out = self.embed_last(fused[:, :self.last_channels])
        taps = fused[:, self.last_channels:].view(len(fused), self.n_taps, self.width)
        for i, layer in enumerate(self.embed_taps):
            out = out + layer(taps[:, i])
        return out

    def _probe(self, t: torch.Tensor, name: str) -> torch.Tensor:
        """A view of ``t`` whose incoming gradient's norm is recorded as ``grad_norms[name]``."""
        view = t.view_as(t)
        if self.measure_gradients and view.requires_grad:
            view.register_hook(lambda g: self.grad_norms.__setitem__(name, g.detach().float().norm()))
        return view

    def forward(self, x: torch.Tensor, lam: float = 0.0) -> tuple[torch.Tensor, Adversarial | None]:
        with_adversary = self.adversary is not None and self.training
        taps_only = with_adversary and self.adversary_input == "taps"
        last, desc, *cut = self.forward_features(x, detached_query=taps_only)
        fused = last if desc is None else torch.cat([last, desc.flatten(1)], dim=1)
        if not with_adversary:
            return F.normalize(self._embed(fused), dim=1), None
        self.grad_norms = {}
        if self.adversary_input == "features":
            emb = F.normalize(self._embed(self._probe(fused, "dml")), dim=1)
            source = self._probe(fused, "adv")
        elif self.adversary_input == "embedding":
            full = F.normalize(self._embed(fused), dim=1)
            emb, source = self._probe(full, "dml"), self._probe(full, "adv")
        else:
            flat = self._probe(desc.flatten(1), "dml")
            emb = F.normalize(self._embed(torch.cat([last, flat], dim=1)), dim=1)
            source = self._probe(cut[0].flatten(1), "adv")
        return emb, Adversarial(*self.adversary(source, lam))
