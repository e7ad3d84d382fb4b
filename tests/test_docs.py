"""The README and docs/ point at things that exist: relative links, the repository paths they name
(modules move; a stale path sends a reader nowhere), the ``pteenet.`` names the README's Python
calls, and the README stays a newcomer's page (under 16 KB). Offline, no model is run."""
from __future__ import annotations

import glob
import re
from pathlib import Path

import pytest

import pteenet

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# A repository path in backticks: starts at a top-level folder of the repository, ends in a file
# extension; ``*`` may stand for part of a name (``train_speed_processes*.json``).
PATH = re.compile(r"`((?:pteenet|benchmarks|examples|tests|docs)/[\w./*-]+\.(?:py|json|png|md|sh|safetensors))`")


def relative_links(text: str) -> list[str]:
    """Links in ``text`` that point into the repository (no scheme, no pure #anchor)."""
    links = [m.group(1) for m in LINK.finditer(text)]
    return [link for link in links if not re.match(r"[a-z]+:", link) and not link.startswith("#")]


def test_docs_exist() -> None:
    assert (ROOT / "docs").is_dir() and len(DOCS) > 1


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    missing = [link for link in relative_links(text) if not (doc.parent / link.split("#")[0]).exists()]
    assert not missing, f"{doc.name}: links to missing files: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_named_repository_paths_exist(doc: Path) -> None:
    # Paths are written from the repository root wherever the document lives.
    named = set(PATH.findall(doc.read_text(encoding="utf-8")))
    missing = sorted(p for p in named if not glob.glob(str(ROOT / p)))
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"


def test_readme_python_names_exist() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "the README has no Python block"
    names = set(re.findall(r"\bpteenet\.(\w+(?:\.\w+)?)", "".join(blocks)))
    assert names
    missing = []
    for dotted in sorted(names):
        obj: object = pteenet
        for part in dotted.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is None:
            missing.append(dotted)
    assert not missing, f"the README's Python uses names pteenet lacks: {missing}"
    methods = set(re.findall(r"\bmodel\.(\w+)\(", "".join(blocks)))
    assert not [m for m in methods if not hasattr(pteenet.EarlyExitModel, m)]


def test_readme_is_short() -> None:
    size = (ROOT / "README.md").stat().st_size
    assert size < 16 * 1024, f"README.md is {size} bytes; move detail to docs/"
