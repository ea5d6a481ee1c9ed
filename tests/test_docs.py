"""The documentation site builds strictly (a broken link or a bad page fails), its configuration reference is
generated from the config models (every key, as the code has it), and the README stays a front page."""

import os
import re
import subprocess
import sys
from pathlib import Path

from pydantic import BaseModel

from pipeline.config import Config

ROOT = Path(__file__).resolve().parent.parent


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out += _keys(field.annotation, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


def test_the_site_builds_strictly_with_every_config_key_in_its_reference(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    page = (tmp_path / "site" / "reference" / "configuration" / "index.html").read_text()
    documented = re.findall(r"<tr>\s*<td><code>([\w.]+)</code></td>", page)
    assert documented == _keys(Config)  # every key, in the models' order, each with its meaning from the code
    assert "<td></td></tr>" not in page.replace("\n", "")  # no key without a docstring
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text()
    assert "train_and_evaluate" in api and "Tracker" in api


def test_the_readme_is_a_front_page_and_no_page_shows_a_machine_path():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        found = re.findall(r"(?:/work/|/root/|/home/\w+|/tmp/\w+)", page.read_text())
        assert not found, (page, found)
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / link).is_file(), link
