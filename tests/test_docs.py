"""The README and docs/ point at things that exist: relative links, the repository paths they name
(modules move; a stale path sends a reader nowhere), the ``pteenet.`` names the README's Python
calls, and the README stays a newcomer's page (under 10 KB). They describe the product as it is:
process language (issue numbers, numbered development runs and their results files, "today's rule")
fails; history belongs in CHANGELOG.md and git. Results files are named by the script that wrote
them and docs/benchmarks.md maps every script. Offline, no model is run."""
from __future__ import annotations

import glob
import re
from pathlib import Path

import pytest

import pteenet

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# The changelog tells history (it is exempt from the process-language check) but its links and paths must resolve.
LINKED = [*DOCS, ROOT / "CHANGELOG.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# Process language: what a reader of the docs cannot act on. Issue numbers ("issue 17", "issue #17",
# "the goal"), numbered development runs ("stop 25", "stop-24", "stop24", "this stop") and
# wording that dates the text ("today's rule", "the old rule", "the earlier default", "the defaults
# when it ran", a "What changed" section). Results files of development runs may be named only
# inside benchmarks/results/archive/, where such runs are kept with their machine and date.
PROCESS = re.compile(
    r"\bissue(?:'s)?\s*#?\d+|\b(?:the|this|that) issue\b"
    r"|\bstops?[\s_-]?\d+\b|\b(?:this|the last|the previous) stop\b|\bthat stop's"
    r"|\b(?:today's|the old|the earlier|the new) (?:rule|default|code)\b|\bthe defaults when it ran\b"
    r"|\b(?:this|the earlier|an earlier|the last|the previous) run\b"
    r"|^#+\s*what changed\b",
    re.I | re.M)
ARCHIVED = re.compile(r"benchmarks/results/archive/[\w.*-]+")
# A repository path in backticks: starts at a top-level folder of the repository, ends in a file
# extension; ``*`` may stand for part of a name (``train_speed-processes*.json``).
PATH = re.compile(r"`((?:pteenet|benchmarks|examples|tests|docs)/[\w./*-]+\.(?:py|json|png|md|sh|safetensors))`")


def relative_links(text: str) -> list[str]:
    """Links in ``text`` that point into the repository (no scheme, no pure #anchor)."""
    links = [m.group(1) for m in LINK.finditer(text)]
    return [link for link in links if not re.match(r"[a-z]+:", link) and not link.startswith("#")]


def test_docs_exist() -> None:
    assert (ROOT / "docs").is_dir() and len(DOCS) > 1


@pytest.mark.parametrize("doc", LINKED, ids=lambda p: p.name)
def test_relative_links_resolve(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    missing = [link for link in relative_links(text) if not (doc.parent / link.split("#")[0]).exists()]
    assert not missing, f"{doc.name}: links to missing files: {missing}"


@pytest.mark.parametrize("doc", LINKED, ids=lambda p: p.name)
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


def process_language(text: str) -> list[str]:
    """The phrases of ``text`` that tell the history of its own development (archived paths aside)."""
    return [m.group(0) for m in PROCESS.finditer(ARCHIVED.sub("", text))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_docs_describe_the_product_not_its_history(doc: Path) -> None:
    found = process_language(doc.read_text(encoding="utf-8"))
    assert not found, f"{doc.name}: process language (history goes to CHANGELOG.md): {found}"


def test_process_language_is_recognised() -> None:
    # The forms the docs used; each must be caught, and ordinary words must not.
    caught = ["see issue 17", "issue #17", "the issue's goal", "Item 3 of the issue", "stop 25's run",
              "stop-24 code", "`-stop24.json`", "cifar10_time_summary-stop26-run1.json", "this stop's run",
              "today's rule", "the old rule", "the earlier default", "the defaults when it ran",
              "## What changed", "in the earlier run", "unlike this run"]
    assert [s for s in caught if not process_language(s)] == []
    fine = ["samples that stop computing", "a diverging run stops", "stop at the first p-value",
            "`benchmarks/results/archive/cifar10_time-other-machine.json`", "Ctrl-C stops the run", "no exit"]
    assert [s for s in fine if process_language(s)] == []


def test_readme_is_short() -> None:
    size = (ROOT / "README.md").stat().st_size
    assert size <= 10 * 1024, f"README.md is {size} bytes; move detail to docs/"


RESULTS = ROOT / "benchmarks" / "results"


def benchmark_scripts() -> list[Path]:
    """The scripts in benchmarks/ (a helper module without a ``__main__`` block is not one)."""
    return [p for p in sorted((ROOT / "benchmarks").glob("*.py")) if "__main__" in p.read_text(encoding="utf-8")]


def test_results_are_named_by_what_they_measure() -> None:
    # <script>[-<configuration>].json/.png: the name says which script wrote it; development runs
    # (numbered, "-run1") and other replaced results live in results/archive/ only.
    scripts = {p.stem for p in benchmark_scripts()} | {"demo"}  # demo: examples/demo.sh's headline
    files = [p for p in RESULTS.iterdir() if p.is_file()]
    assert files
    unnamed = [p.name for p in files if not any(p.stem == s or p.stem.startswith(s + "-") for s in scripts)]
    assert not unnamed, f"results files not named <script>[-<configuration>]: {unnamed}"
    development = [p.name for p in files if re.search(r"-(?:stop|run)\d", p.stem)]
    assert not development, f"development runs outside benchmarks/results/archive/: {development}"


def test_every_benchmark_script_is_mapped_to_its_results() -> None:
    text = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    missing = [p.name for p in benchmark_scripts() if f"`benchmarks/{p.name}`" not in text]
    assert not missing, f"docs/benchmarks.md does not map these scripts: {missing}"


def test_readme_first_screen_shows_the_commands_and_the_call() -> None:
    first = "\n".join((ROOT / "README.md").read_text(encoding="utf-8").splitlines()[:40])
    for needle in ("make demo", "make test", "pteenet attach ", "pteenet train-branches ", "pteenet sweep-threshold ",
                   "pteenet export ", "```python", "pteenet.attach(", "pteenet.export_model("):
        assert needle in first, f"the README's first 40 lines lack {needle!r}"
