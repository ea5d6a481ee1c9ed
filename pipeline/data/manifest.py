"""A shard set's manifest, typed: what ``manifest.json`` records (``shards.build`` writes it) and where the shards
are, and :class:`Split`, the images of one split (or of some of its classes) that evaluation embeds."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from pipeline.paths import is_remote


@dataclass(frozen=True)
class Manifest:
    """The classes (``id``, ``key``, ``name``, ``split``, ``count``) and, per split, the shards (``file``,
    ``samples``, ``sha256``, ``bytes``, ordered class ``groups``), of a shard set at ``root``."""

    root: str
    data: dict[str, Any]

    @property
    def splits(self) -> list[str]:
        return list(self.data["splits"])

    def shards(self, split: str) -> list[dict[str, Any]]:
        return self.data["splits"][split]["shards"]

    @cached_property
    def _counts(self) -> dict[str, dict[int, int]]:
        """Per split, each class's images in its shards."""
        out: dict[str, dict[int, int]] = {}
        for split in self.splits:
            counts = out[split] = {}
            for cid, n in (g for sh in self.shards(split) for g in sh["groups"]):
                counts[cid] = counts.get(cid, 0) + n
        return out

    def classes(self, split: str) -> list[dict[str, Any]]:
        """The classes with images in a split, each with its ``count`` there (In-Shop's query and gallery splits
        share the test classes, whose own ``split`` is 'test')."""
        counts = self._counts[split]
        return [{**c, "count": counts[c["id"]]} for c in self.data["classes"] if c["id"] in counts]

    def class_ids(self, split: str) -> list[int]:
        """The classes whose ``split`` is this one: the label space of a head trained on it (a class none of whose
        images could be read included)."""
        return sorted(c["id"] for c in self.data["classes"] if c["split"] == split)

    def images(self, split: str, classes: set[int] | frozenset[int] | None = None) -> int:
        """Images of a split, or of some of its classes."""
        if classes is None:
            return self.data["splits"][split]["samples"]
        return sum(n for cid, n in self._counts[split].items() if cid in classes)

    @property
    def names(self) -> dict[int, str]:
        return {c["id"]: c["name"] for c in self.data["classes"]}

    @property
    def bad(self) -> list[str]:
        """Images left out when the shards were built (unreadable)."""
        return self.data.get("bad", [])

    def protocol(self, split: str) -> tuple[str, str | None]:
        """(query split, gallery split or None): In-Shop style manifests evaluate 'test' as query vs gallery."""
        if split == "test" and "test" not in self.splits and {"query", "gallery"} <= set(self.splits):
            return "query", "gallery"
        if split not in self.splits:
            raise ValueError(f"split {split!r} is not in the manifest; it has: {', '.join(self.splits)}")
        return split, None

    def split(self, name: str, classes: set[int] | None = None, verify: bool = True) -> Split:
        return Split(self, name, None if classes is None else frozenset(classes), verify)


@dataclass(frozen=True)
class Split:
    """The images of one split of a shard set, or of some of its classes; ``verify``: check each shard's sha256."""

    manifest: Manifest
    name: str
    classes: frozenset[int] | None = None
    verify: bool = True

    @property
    def root(self) -> str:
        return self.manifest.root

    @property
    def size(self) -> int:
        return self.manifest.images(self.name, self.classes)

    @property
    def shards(self) -> list[dict[str, Any]]:
        """The split's shards that hold its chosen classes."""
        shards = self.manifest.shards(self.name)
        if self.classes is None:
            return shards
        return [s for s in shards if any(g[0] in self.classes for g in s["groups"])]

    def dataset_input(self, context: str) -> dict[str, str]:
        """These images as an MLflow dataset input: named after the shard root and the context, the manifest's
        digest, the root as source, the split's class and image counts."""
        root, data = self.root, self.manifest.data
        chosen = [c for c in self.manifest.classes(self.name) if self.classes is None or c["id"] in self.classes]
        digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
        remote = is_remote(root)
        profile = {"split": self.name, "classes": len(chosen), "images": sum(c["count"] for c in chosen),
                   "shards": len(self.manifest.shards(self.name)), "source": data["params"].get("source")}
        return {"name": f"{root.rstrip('/').rsplit('/', 1)[-1]}-{context}", "digest": digest, "context": context,
                "source_type": root.split(":", 1)[0] if remote else "local",
                "source": json.dumps({"uri": root if remote else Path(root).resolve().as_uri()}),
                "profile": json.dumps(profile)}
