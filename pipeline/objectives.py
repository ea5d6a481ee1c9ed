"""Training objectives: a pytorch-metric-learning DML loss (pairs formed across ranks) + the adversarial loss."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from pytorch_metric_learning import losses, miners
from pytorch_metric_learning.utils import distributed as pml_dist
from torch import nn
from torch.nn import functional as F

from pipeline.config import LossConfig

LOSS_CLASSES: dict[str, type] = {
    "multi_similarity": losses.MultiSimilarityLoss,
    "contrastive": losses.ContrastiveLoss,
    "triplet": losses.TripletMarginLoss,
}
# Losses that need a miner to be useful, and the miner that goes with them.
MINERS = {"triplet": lambda: miners.TripletMarginMiner(type_of_triplets="semihard")}


def loss_param_names(name: str) -> list[str]:
    sig = inspect.signature(LOSS_CLASSES[name].__init__)
    return [p for p in sig.parameters if p not in ("self", "args", "kwargs")]


def check_params(cfg: LossConfig) -> str | None:
    """None when every ``loss.params`` key is an argument of the loss, else a message listing them."""
    allowed = loss_param_names(cfg.name)
    for key in cfg.params:
        if key not in allowed:
            return f"{key!r} is not a parameter of {cfg.name}; allowed: {', '.join(allowed)}"
    return None


@dataclass
class DMLObjective:
    """A metric loss with its optional miner; both gather embeddings across ranks when distributed."""

    loss: nn.Module
    miner: nn.Module | None

    def __call__(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        indices = self.miner(embeddings, labels) if self.miner is not None else None
        return self.loss(embeddings, labels, indices)


def build_objective(cfg: LossConfig, distributed: bool) -> DMLObjective:
    loss = LOSS_CLASSES[cfg.name](**cfg.params)
    miner = MINERS[cfg.name]() if cfg.name in MINERS else None
    if distributed:
        # efficient=False: the loss sees every rank's batch as one (gathered) batch.
        loss = pml_dist.DistributedLossWrapper(loss, efficient=False)
        miner = pml_dist.DistributedMinerWrapper(miner, efficient=False) if miner is not None else None
    return DMLObjective(loss, miner)


def adversarial_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)
