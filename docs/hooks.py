"""MkDocs hook: the configuration reference, generated from the config models themselves (it cannot drift)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

MARKER = "<!-- gdml:config-reference -->"


def _default(value: Any) -> str:
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    return json.dumps(value) if not isinstance(value, str) else value


def _type(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    return (text or str(annotation).replace("typing.", "")).replace(" | ", " or ")  # a table cell holds no pipe


def reference() -> str:
    """One table per config section: key, type, default, and the field's own docstring."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from pydantic import BaseModel

    from pipeline.config import Config

    def fields(model: type[BaseModel], prefix: str):
        for name, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                yield from fields(field.annotation, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}", field

    out = []
    for section, field in Config.model_fields.items():
        model = field.annotation
        doc = " ".join((model.__doc__ or "").split())
        out += [f"## `{section}`", "", *([doc, ""] if doc else []),
                "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for key, f in fields(model, f"{section}."):
            cells = [f"`{key}`", f"`{_type(f.annotation)}`", f"`{_default(f.get_default(call_default_factory=True))}`",
                     " ".join((f.description or "").split())]
            out.append("| " + " | ".join(cells[:3] + [cells[3].replace("|", "\\|")]) + " |")
        out.append("")
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return markdown.replace(MARKER, reference()) if MARKER in markdown else markdown
