"""docs/reliability.md names the test behind every fault, bad input and promise: each named test must exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reliability.md"
# `test_x.py`, `test_x.py::test_name[case]` or `::test_name` (the test file named last before it).
REFERENCE = re.compile(r"`(test_\w+\.py)?(?:::(test_\w+)(?:\[[^\]`]*\])?)?`")


def named_tests(text: str) -> list[tuple[str, str | None]]:
    """(file, test or None) for every test reference, in order."""
    found, current = [], None
    for match in REFERENCE.finditer(text):
        file, test = match.groups()
        if not file and not test:
            continue
        current = file or current
        assert current, f"{DOC}: `::{test}` comes before any test file"
        found.append((current, test))
    return found


def functions_in(path: Path) -> set[str]:
    return {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)}


def test_the_reader_understands_the_shorthand():
    text = "`test_a.py::test_one`, `::test_two` and `test_b.py`; `test_b.py::test_three[x-y]`, `not a test`"
    assert named_tests(text) == [("test_a.py", "test_one"), ("test_a.py", "test_two"), ("test_b.py", None),
                                 ("test_b.py", "test_three")]


def test_every_test_the_reliability_doc_names_exists():
    named = named_tests(DOC.read_text())
    assert len(named) > 40
    missing = []
    for file, test in named:
        path = ROOT / "tests" / file
        if not path.is_file():
            missing.append(file)
        elif test and test not in functions_in(path):
            missing.append(f"{file}::{test}")
    assert not missing, f"{DOC} names tests that do not exist: {missing}"
