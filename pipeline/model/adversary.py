"""The class-adversarial network: an MLP that predicts the training class, reached by the features through
gradient reversal or a confusion loss, with lambda on a schedule (constant, dann, warmup). Details:
docs/internals.md.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from pipeline import names

MODES = names.ADVERSARY_MODES


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


def dann_ramp(weight: float, progress: float) -> float:
    p = min(max(progress, 0.0), 1.0)
    return weight * (2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0)


def adversary_lambda(weight: float, schedule: str, progress: float, warmup_done_at: float | None = None) -> float:
    """lambda at a point of training; ``progress`` in [0, 1]. ``warmup_done_at``: the progress at which the head
    rose above chance (``warmup`` schedule; None while it has not)."""
    if schedule == "constant":
        return weight
    if schedule == "warmup":
        if warmup_done_at is None:
            return 0.0
        return dann_ramp(weight, (progress - warmup_done_at) / max(1e-9, 1.0 - warmup_done_at))
    return dann_ramp(weight, progress)


class Schedule:
    """lambda over a run (``model.adversary``: weight, schedule, warmup_factor): ``lam(step)``, ``observe(accuracy,
    step)`` after each step, and its state for checkpoints. The horizon (``ramp_steps``) is fixed when the run
    starts and kept when it is resumed with more epochs (lambda then stays at its final value), so that resuming
    never changes lambda for steps already planned."""

    def __init__(self, cfg, num_classes: int, ramp_steps: int) -> None:  # noqa: ANN001 - config.AdversaryConfig
        self.cfg, self.num_classes, self.ramp_steps = cfg, num_classes, ramp_steps
        self.acc_ema: float | None = None
        self.warmup_done_at: float | None = None
        """warmup: the training progress at which the head rose above chance (None while it has not)."""

    def lam(self, step: int) -> float:
        if not self.cfg.enabled:
            return 0.0
        progress = step / max(1, self.ramp_steps - 1)
        return adversary_lambda(self.cfg.weight, self.cfg.schedule, progress, self.warmup_done_at)

    def observe(self, accuracy: float, step: int) -> None:
        """warmup: a running mean of the head's accuracy (the same on every rank) against chance."""
        if self.cfg.schedule != "warmup" or self.warmup_done_at is not None:
            return
        self.acc_ema = accuracy if self.acc_ema is None else 0.9 * self.acc_ema + 0.1 * accuracy
        if self.acc_ema > self.cfg.warmup_factor / self.num_classes:
            self.warmup_done_at = step / max(1, self.ramp_steps - 1)

    def state_dict(self) -> dict:
        return {"ramp_steps": self.ramp_steps, "adv_acc_ema": self.acc_ema, "warmup_done_at": self.warmup_done_at}

    def load_state_dict(self, state: dict) -> None:
        self.ramp_steps = int(state.get("ramp_steps", self.ramp_steps))
        self.acc_ema, self.warmup_done_at = state.get("adv_acc_ema"), state.get("warmup_done_at")


def confusion_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the predicted distribution against the uniform one (mean over the batch)."""
    return -F.log_softmax(logits.float(), dim=1).mean(dim=1).mean()


class ClassAdversary(nn.Module):
    """An MLP classifier over the training classes, attached to the features by reversal or confusion."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 512, dropout: float = 0.2,
                 mode: str = "reversal") -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"model.adversary.mode: {mode!r}; allowed: {', '.join(MODES)}")
        self.mode = mode
        self.head = nn.Sequential(
            # No BatchNorm: its per-rank statistics would make a DDP step differ from one on the whole batch.
            nn.Linear(in_features, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, features: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(class logits, the features' own loss or None). The logits' cross-entropy trains the head (and, under
        reversal, sends -lam times its gradient to the features); under confusion the second term, lam times the
        cross-entropy to uniform of the head applied with its weights held fixed, is what trains the features."""
        if self.mode == "reversal":
            return self.head(grad_reverse(features, lam)), None
        logits = self.head(features.detach())
        fixed = {name: p.detach() for name, p in self.head.named_parameters()}
        confused = torch.func.functional_call(self.head, fixed, (features,))
        return logits, lam * confusion_loss(confused)
