"""Embedding a split of the shards with a model, in one process, on the model's own device."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pipeline.data.samples import SplitImages


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's parameters live: inputs go there."""
    return next(iter(model.parameters())).device


def split_size(manifest: dict, split: str, classes: set[int] | None = None) -> int:
    if classes is None:
        return manifest["splits"][split]["samples"]
    return sum(c["count"] for c in manifest["classes"] if c["split"] == split and c["id"] in classes)


@torch.no_grad()
def embed_split(model: torch.nn.Module, manifest: dict, root: str, split: str = "test", batch_size: int = 256,
                image_size: int = 64, classes: set[int] | None = None, progress: bool = True, verify: bool = True,
                stats: dict | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Embeddings, labels and keys of every image of a split, or of some of its classes. ``stats["skipped"]``
    receives the number of images that could not be read."""
    model.eval()
    device = model_device(model)
    source = SplitImages(manifest, root, split, image_size=image_size, classes=classes, verify=verify)
    # Its own generator: an evaluation inside training (rank 0's validation) must not draw from the training RNG.
    cuda = device.type == "cuda"  # pinned host memory: the copy to the GPU overlaps the next batch's decoding
    data = DataLoader(source, batch_size=batch_size, generator=torch.Generator(), pin_memory=cuda)
    embs, labels, keys = [], [], []
    with tqdm(total=split_size(manifest, split, classes), desc=f"embed {split}", unit="img",
              disable=None if progress else True) as bar:
        for images, cls, key in data:
            emb, _ = model(images.to(device, non_blocking=cuda))
            embs.append(emb.float().cpu().numpy())
            labels.append(cls.numpy())
            keys += list(key)
            bar.update(len(cls))
    if stats is not None:
        stats["skipped"] = stats.get("skipped", 0) + source.skipped
    if not embs:
        raise RuntimeError(f"no image of split {split!r} in {root} could be read")
    return np.concatenate(embs), np.concatenate(labels), keys


def load_images(manifest: dict, root: str, split: str, indices: set[int],
                classes: set[int] | None = None) -> dict[int, Image.Image]:
    """The decoded images at the given positions of a split's embedding order (for plots)."""
    out = {}
    for i, (img, _, _) in enumerate(SplitImages(manifest, root, split, raw=True, classes=classes)):
        if i in indices:
            out[i] = img
            if len(out) == len(indices):
                break
    return out
