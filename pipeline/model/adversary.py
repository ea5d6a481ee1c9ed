"""The class-adversarial network: a gradient-reversal layer and an MLP that predicts the training class.

The head learns to predict the class (it minimises cross-entropy); the reversal multiplies the gradient
flowing back into the features by -lambda, so the backbone learns features the head cannot classify:
class-invariant, more general ones.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class GradReverse(torch.autograd.Function):
    """Identity forward; gradient times ``-lam`` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:  # noqa: ANN001 - autograd signature
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        return -ctx.lam * grad, None


def grad_reverse(x: torch.Tensor, lam: float) -> torch.Tensor:
    return GradReverse.apply(x, lam)


def adversary_lambda(weight: float, schedule: str, progress: float) -> float:
    """lambda at a point of training; ``progress`` in [0, 1]. dann: the ramp of Ganin & Lempitsky (2015)."""
    if schedule == "constant":
        return weight
    p = min(max(progress, 0.0), 1.0)
    return weight * (2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0)


class ClassAdversary(nn.Module):
    """Gradient reversal followed by an MLP classifier over the training classes."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 512, dropout: float = 0.2) -> None:
        super().__init__()
        self.head = nn.Sequential(
            # No BatchNorm: its per-rank statistics would make a DDP step differ from one on the whole batch.
            nn.Linear(in_features, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, features: torch.Tensor, lam: float) -> torch.Tensor:
        return self.head(grad_reverse(features, lam))
