"""Training objectives: a pytorch-metric-learning DML loss (pairs formed across ranks) + the adversarial loss;
``TrainModule`` holds the loss's proxies inside the DDP module, synchronised like every weight.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.config import LossConfig


@dataclass(frozen=True)
class LossSpec:
    """A pytorch-metric-learning loss by class name, and the miner that makes it useful (if any)."""

    loss: str
    miner: str | None = None
    miner_args: dict[str, Any] = field(default_factory=dict)


LOSSES: dict[str, LossSpec] = {
    "multi_similarity": LossSpec("MultiSimilarityLoss"),
    "contrastive": LossSpec("ContrastiveLoss"),
    "triplet": LossSpec("TripletMarginLoss", "TripletMarginMiner", {"type_of_triplets": "semihard"}),
    "margin": LossSpec("MarginLoss", "DistanceWeightedMiner"),
    "ntxent": LossSpec("NTXentLoss"),
    "npairs": LossSpec("NPairsLoss"),
    "proxy_nca": LossSpec("ProxyNCALoss"),
    "proxy_anchor": LossSpec("ProxyAnchorLoss"),
}
"""``loss.name`` -> loss; the config accepts exactly these names. Classes are resolved when used, so that
reading a config (the served model does) never imports pytorch-metric-learning."""
# Arguments gdml fills in itself.
_AUTOMATIC = ("num_classes", "embedding_size")


def loss_class(name: str) -> type:
    from pytorch_metric_learning import losses

    return getattr(losses, LOSSES[name].loss)


def loss_param_names(name: str) -> list[str]:
    sig = inspect.signature(loss_class(name).__init__)
    return [p for p in sig.parameters if p not in ("self", "args", "kwargs", *_AUTOMATIC)]


def check_params(cfg: LossConfig) -> str | None:
    """None when every ``loss.params`` key is an argument of the loss, else a message listing them."""
    allowed = loss_param_names(cfg.name)
    for key in cfg.params:
        if key not in allowed:
            return f"{key!r} is not a parameter of {cfg.name}; allowed: {', '.join(allowed)}"
    return None


class MetricLoss(nn.Module):
    """A metric loss with its optional miner; both see every rank's batch when ``world_size > 1``."""

    def __init__(self, cfg: LossConfig, num_classes: int, embedding_size: int, world_size: int = 1) -> None:
        super().__init__()
        from pytorch_metric_learning import miners
        from pytorch_metric_learning.utils import distributed as pml_dist

        cls, spec = loss_class(cfg.name), LOSSES[cfg.name]
        accepted = inspect.signature(cls.__init__).parameters
        auto = {"num_classes": num_classes, "embedding_size": embedding_size}
        loss = cls(**{k: v for k, v in auto.items() if k in accepted}, **cfg.params)
        miner = getattr(miners, spec.miner)(**spec.miner_args) if spec.miner else None
        self.inner = loss  # the one registered submodule: owns the parameters (proxies), same keys at any world size
        if world_size > 1:
            # efficient=False: the loss sees all ranks' embeddings as one batch (own ones carry gradients).
            loss = pml_dist.DistributedLossWrapper(loss, efficient=False)
            miner = pml_dist.DistributedMinerWrapper(miner, efficient=False) if miner is not None else None
            # Each rank computes the whole-batch loss times world_size, so a loss parameter's gradient is
            # world_size x the whole-batch one on every rank; DDP averages; scale back to match one process.
            for p in self.inner.parameters():
                p.register_hook(lambda g, w=world_size: g / w)
        self._compute = (loss, miner)  # a tuple: not registered again as submodules

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss, miner = self._compute
        indices = miner(embeddings, labels) if miner is not None else None
        return loss(embeddings, labels, indices)


class TrainModule(nn.Module):
    """Embedder + metric loss: the one module that DDP wraps. ``forward`` returns the loss terms."""

    def __init__(self, embedder: nn.Module, metric_loss: MetricLoss) -> None:
        super().__init__()
        self.embedder = embedder
        self.metric_loss = metric_loss

    def forward(self, images: torch.Tensor, labels: torch.Tensor, lam: float = 0.0
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(DML loss, adversarial loss or None, adversary logits or None)."""
        emb, adversarial = self.embedder(images, lam)
        with torch.autocast(emb.device.type, enabled=False):  # the metric loss in float32, outside mixed precision:
            loss_dml = self.metric_loss(emb.float(), labels)  # its similarities go through exp(50 x ...)
        if adversarial is None:
            return loss_dml, None, None
        loss_adv = adversarial_loss(adversarial.logits, labels)
        if adversarial.feature_loss is not None:
            loss_adv = loss_adv + adversarial.feature_loss
        return loss_dml, loss_adv, adversarial.logits


def adversarial_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)
