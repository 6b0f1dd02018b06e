"""devmodel.testing is for tests, benchmarks and examples: it never needs pytest, and the
product never needs it."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import devmodel
import devmodel.testing

PACKAGE = Path(devmodel.__file__).parent
TESTING = PACKAGE / "testing"


def imported_modules(path: Path) -> Iterator[tuple[int, str]]:
    """(line, module) for every import in `path`; `from a import b` gives a and a.b."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module is not None and not node.level:
            yield node.lineno, node.module
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


def test_testing_never_imports_pytest() -> None:
    offences = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: imports {module}"
        for path in sorted(TESTING.rglob("*.py"))
        for line, module in imported_modules(path)
        if module.split(".")[0] in {"pytest", "_pytest", "hypothesis"}
    ]
    assert not offences, "\n".join(offences)


def test_the_product_never_imports_testing() -> None:
    offences = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: imports {module}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if TESTING not in path.parents
        for line, module in imported_modules(path)
        if module == "devmodel.testing" or module.startswith("devmodel.testing.")
    ]
    assert not offences, "\n".join(offences)


def test_the_public_face_exports_what_it_lists() -> None:
    assert len(devmodel.testing.__all__) == len(set(devmodel.testing.__all__))
    missing = [name for name in devmodel.testing.__all__ if not hasattr(devmodel.testing, name)]
    assert not missing
