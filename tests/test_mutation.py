"""``benchmarks/mutation.py`` still applies to the code: every mutant's snippet occurs exactly once
in its file and every test it lists exists, so a rewrite of the code cannot silently retire a mutant
(the script refuses to start on a stale one, but it runs only now and then). Offline, nothing runs."""
from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def mutation() -> ModuleType:
    """The script as a module (registered first: its dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location("pteenet_mutation", ROOT / "benchmarks" / "mutation.py")
    assert spec is not None and spec.loader is not None
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_mutant_applies_to_the_code_as_it_is() -> None:
    m = mutation()
    assert m.ROOT == ROOT and len(m.MUTANTS) > 50
    assert not m.stale(m.MUTANTS), "\n".join(m.stale(m.MUTANTS))


def test_a_stale_snippet_or_test_is_reported() -> None:
    m = mutation()
    good = m.MUTANTS[0]
    gone = m.Mutant("X1", good.file, "no such code", "x", "", good.tests)
    twice = m.Mutant("X2", "runtime/model.py", "self.active[k]", "x", "", good.tests)
    no_test = m.Mutant("X3", good.file, good.old, good.new, "", ("tests/test_promises.py::test_no_such_thing",))
    assert [line.split(":")[0] for line in m.stale([good, gone, twice, no_test])] == ["X1", "X2", "X3"]
