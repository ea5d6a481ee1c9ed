"""Image transforms: what training (augmented) and evaluation (deterministic) feed the model.

Kept apart from the stream so that the served model needs torchvision alone, not the data pipeline.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms import v2 as T

from pipeline.config import AugmentConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_transform(image_size: int) -> T.Compose:
    """Shorter side to ``image_size``, centre crop (the identity for square images of that size)."""
    return T.Compose([T.ToImage(), T.Resize(image_size, antialias=True), T.CenterCrop(image_size),
                      T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def train_transform(aug: AugmentConfig, image_size: int) -> T.Compose:
    steps: list[Any] = [T.ToImage(), T.RandomResizedCrop(image_size, scale=tuple(aug.crop_scale), antialias=True)]
    if aug.flip:
        steps.append(T.RandomHorizontalFlip())
    if aug.color_jitter > 0:
        j = aug.color_jitter
        steps.append(T.ColorJitter(brightness=j, contrast=j, saturation=j))
    steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)
