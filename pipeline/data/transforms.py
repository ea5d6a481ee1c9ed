"""Image transforms: training augmentation (uint8, in the data pipeline), batch normalisation (on the device),
evaluation's deterministic transform; apart from the stream so that serving needs torchvision alone.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torchvision.transforms import v2 as T

from pipeline.config import AugmentConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ASPECT_RANGE = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect ratios


def eval_transform(image_size: int) -> T.Compose:
    """Shorter side to ``image_size``, centre crop (the identity for square images of that size), normalised."""
    return T.Compose([T.ToImage(), T.Resize(image_size, antialias=True), T.CenterCrop(image_size),
                      T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def train_augment(aug: AugmentConfig, image_size: int) -> T.Compose:
    """(3, H, W) uint8 -> (3, S, S) uint8: random resized crop, flip, colour jitter. ``normalize`` comes after,
    per batch, on the device the model trains on (a quarter of the bytes to move, no per-image float work)."""
    steps: list[Any] = [T.RandomResizedCrop(image_size, scale=tuple(aug.crop_scale), ratio=ASPECT_RANGE,
                                            antialias=True)]
    if aug.flip:
        steps.append(T.RandomHorizontalFlip())
    if aug.color_jitter > 0:
        j = aug.color_jitter
        steps.append(T.ColorJitter(brightness=j, contrast=j, saturation=j))
    return T.Compose(steps)


def train_min_area(aug: AugmentConfig, image_size: int) -> float:
    """Fewest pixels an image must keep for the smallest crop RandomResizedCrop can take to still cover
    ``image_size`` x ``image_size`` pixels at any allowed aspect: a JPEG decoded at reduced scale keeps at least
    this many, so scaling in the decoder never costs resolution."""
    return image_size * image_size * ASPECT_RANGE[1] / aug.crop_scale[0]


def normalize(images: torch.Tensor) -> torch.Tensor:
    """A uint8 batch (N, 3, H, W) -> float32 normalised with ImageNet's mean and std, on the batch's device."""
    scale, shift = _normalizer(images.device)
    return images.to(torch.float32).mul_(scale).sub_(shift)


@functools.lru_cache(maxsize=8)
def _normalizer(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 / (255 std), mean / std) on a device, made once per device rather than at every step."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return 1.0 / (255.0 * std), mean / std
