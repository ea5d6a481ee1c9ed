"""Embedding a split of the shards with a model on the model's own device: on a GPU with loader workers, pinned
memory, autocast and channels_last (as training runs there), on the CPU in float32 in one process."""

from __future__ import annotations

import gc
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pipeline.config import EvalConfig
from pipeline.data.manifest import Split
from pipeline.data.samples import ShardChecksumError, SplitImages
from pipeline.runtime import Capabilities, Runtime, choose


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's parameters live: inputs go there."""
    return next(iter(model.parameters())).device


def loader_workers(ev: EvalConfig, runtime: Runtime, shards: int) -> int:
    """``eval.loader_workers``, with ``auto`` resolved: on a GPU one process per CPU beyond the first (at most 8
    and one per shard), so that decoding keeps up with the GPU; on the CPU none (the model needs the cores)."""
    if ev.loader_workers != "auto":
        return int(ev.loader_workers)
    if runtime.device.type != "cuda":
        return 0
    return max(0, min(8, len(os.sched_getaffinity(0)) - 1, shards))


@torch.no_grad()
def embed_split(model: torch.nn.Module, split: Split, ev: EvalConfig | None = None, image_size: int = 64,
                progress: bool = True, stats: dict | None = None,
                runtime: Runtime | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Embeddings, labels and keys of the images of a split (or of some of its classes), in manifest order.
    ``stats["skipped"]`` receives the number of images that could not be read. ``runtime``: the precision and
    memory format to embed with (a training worker passes its own; by default the device's: autocast and
    channels_last on a GPU, the model converted to channels_last)."""
    ev = ev or EvalConfig()
    model.eval()
    device = model_device(model)
    if runtime is None:
        runtime = choose(device, Capabilities.detect() if device.type == "cuda" else Capabilities(cuda=False))
        if runtime.channels_last:
            model.to(memory_format=torch.channels_last)
    memory = torch.channels_last if runtime.channels_last else torch.preserve_format
    source = SplitImages(split, image_size=image_size)
    workers = loader_workers(ev, runtime, len(source.shards))
    # Its own generator: an evaluation inside training (rank 0's validation) must not draw from the training RNG.
    cuda = device.type == "cuda"  # pinned host memory: the copy to the GPU overlaps the next batch's decoding
    data = DataLoader(source, batch_size=ev.batch_size, num_workers=workers, generator=torch.Generator(),
                      pin_memory=cuda, multiprocessing_context="fork" if workers else None)
    embs, labels, keys, places = [], [], [], []
    expected = split.size
    failed = None
    with tqdm(total=expected, desc=f"embed {split.name}", unit="img", disable=None if progress else True) as bar:
        try:
            for images, cls, key, place in data:
                with runtime.autocast():
                    emb, _ = model(images.to(device, non_blocking=cuda, memory_format=memory))
                embs.append(emb.float().cpu().numpy())
                labels.append(cls.numpy())
                places.append(place.numpy())
                keys += list(key)
                bar.update(len(cls))
        except ShardChecksumError as err:  # from a loader worker, torch wraps the message in the worker's traceback
            line = str(err).strip().splitlines()[-1]
            failed = line.partition("ShardChecksumError: ")[2] or line
    if failed:  # the loader is garbage now, but in a reference cycle: collected now, its worker processes end now
        gc.collect()  # (not whenever the caller's next collection comes)
        raise ShardChecksumError(failed)
    if not embs:
        raise RuntimeError(f"no image of split {split.name!r} in {split.root} could be read")
    order = np.argsort(np.concatenate(places), kind="stable")  # the workers' batches back in manifest order
    if stats is not None:
        stats["skipped"] = stats.get("skipped", 0) + expected - len(order)
    return np.concatenate(embs)[order], np.concatenate(labels)[order], [keys[i] for i in order]


def load_images(split: Split, indices: set[int]) -> dict[int, Image.Image]:
    """The decoded images at the given positions of a split's embedding order (for plots)."""
    out = {}
    for i, (img, _, _, _) in enumerate(SplitImages(split, raw=True)):
        if i in indices:
            out[i] = img
            if len(out) == len(indices):
                break
    return out
