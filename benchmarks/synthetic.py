"""Generated image data at the shape of the real benchmarks, for benchmarks that cannot download them.

- ``photo_folder``: CUB-shaped: one folder per class, JPEGs of 500 x 375 that look like photos to a JPEG codec
  (smooth colour fields, texture, shapes: 40-50 KB at quality 90, like CUB's; flat colour would compress to
  almost nothing and decode unrealistically fast).
- ``sop_tree``: Stanford-Online-Products-shaped: ``Ebay_train.txt`` / ``Ebay_test.txt`` and small JPEGs in
  ``<category>_final/`` folders, 120,053 images in 22,634 classes at full size.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def photo(rng: np.random.Generator, size: tuple[int, int], base: np.ndarray) -> Image.Image:
    w, h = size
    low = rng.normal(0, 1, (h // 25 + 1, w // 25 + 1, 3))
    field = np.asarray(Image.fromarray(((low - low.min()) / np.ptp(low) * 255).astype(np.uint8))
                       .resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    noise = rng.normal(0, 18, (h, w, 3)).astype(np.float32)
    pic = Image.fromarray(np.clip(0.5 * field + 0.5 * base + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pic)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, max(1, w - 60))), int(rng.integers(0, max(1, h - 60)))
        draw.ellipse([x0, y0, x0 + int(rng.integers(20, 160)), y0 + int(rng.integers(20, 160))],
                     fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return pic.filter(ImageFilter.SMOOTH)


def _photo_class(args: tuple[Path, int, int, tuple[int, int], int]) -> None:
    root, c, per_class, size, seed = args
    rng = np.random.default_rng([seed, c])
    folder = root / f"class_{c:04d}"
    folder.mkdir(parents=True, exist_ok=True)
    base = rng.integers(0, 255, 3).astype(np.float32)
    for i in range(per_class):
        photo(rng, size, base).save(folder / f"{i:03d}.jpg", quality=90)


def photo_folder(root: Path, classes: int, per_class: int, size: tuple[int, int] = (500, 375), seed: int = 0,
                 workers: int = 2) -> None:
    """``classes`` folders of ``per_class`` photo-like JPEGs (in ``workers`` processes)."""
    jobs = [(root, c, per_class, size, seed) for c in range(classes)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(_photo_class, jobs, chunksize=4))


def _sop_chunk(args: tuple[Path, list[tuple[str, int]], int]) -> None:
    root, items, seed = args
    rng = np.random.default_rng([seed, len(items), items[0][1]])
    for rel, cls in items:
        base = np.random.default_rng(cls).integers(0, 255, 3).astype(np.float32)
        pixels = np.clip(base + rng.normal(0, 30, (48, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / rel, quality=85)


def sop_tree(root: Path, images: int = 120_053, classes: int = 22_634, train_classes: int = 11_318, seed: int = 0,
             workers: int = 2) -> None:
    """An SOP layout: at least 2 images a class (mean ``images / classes``), 12 ``<category>_final`` folders."""
    rng = np.random.default_rng(seed)
    sizes = 2 + rng.multinomial(images - 2 * classes, np.full(classes, 1 / classes))
    lines = {"train": ["image_id class_id super_class_id path"], "test": ["image_id class_id super_class_id path"]}
    items, n = [], 0
    for c in range(classes):
        category = c % 12
        folder = f"cat{category:02d}_final"
        for k in range(int(sizes[c])):
            n += 1
            rel = f"{folder}/{c + 1}_{k}.JPG"
            items.append((rel, c))
            lines["train" if c < train_classes else "test"].append(f"{n} {c + 1} {category + 1} {rel}")
    for category in range(12):
        (root / f"cat{category:02d}_final").mkdir(parents=True, exist_ok=True)
    (root / "Ebay_train.txt").write_text("\n".join(lines["train"]) + "\n")
    (root / "Ebay_test.txt").write_text("\n".join(lines["test"]) + "\n")
    chunks = [items[i:i + 2000] for i in range(0, len(items), 2000)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(_sop_chunk, [(root, chunk, seed) for chunk in chunks]))
