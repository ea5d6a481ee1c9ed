"""Where things live: local paths vs remote locations (object stores, URLs, ``pipe:`` commands)."""

from __future__ import annotations

from pathlib import Path


def is_remote(location: str) -> bool:
    """True for ``s3://``, ``gs://``, ``http(s)://`` ... and ``pipe:`` commands; False for local paths."""
    return "://" in location or location.startswith("pipe:")


def absolute(location: str) -> str:
    """Local paths made absolute (Ray workers run in their own directories); remote locations unchanged."""
    return location if is_remote(location) else str(Path(location).resolve())


def join(location: str, *parts: str) -> str:
    """``location/part/...`` for a local path or a URL."""
    if is_remote(location):
        return "/".join([location.rstrip("/"), *parts])
    return str(Path(location, *parts))
