"""devmodel/deferred_imports.py: a deferred module runs exactly once, at its first use, and is
then the real module; an `import` statement alone does not run it.

Each test writes a throwaway module that counts its executions in `COUNTS` (this test module),
so what ran, and how often, is observed directly.
"""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from devmodel import deferred_imports

COUNTS: dict[str, int] = {}

BODY = """\
import tests.unit.test_deferred_imports as t
t.COUNTS[__name__] = t.COUNTS.get(__name__, 0) + 1
VALUE = 42
def double(x):
    return 2 * x
"""


@pytest.fixture
def module(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    name = f"deferred_sample_{request.node.name}"
    (tmp_path / f"{name}.py").write_text(BODY)
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    try:
        yield name
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)


def test_an_import_statement_does_not_run_it_and_a_use_runs_it_once(module: str) -> None:
    assert deferred_imports.defer((module,)) == [module]
    assert not deferred_imports.executed(module)
    imported = importlib.import_module(module)  # what `import NAME` does
    assert COUNTS.get(module) is None
    assert imported is sys.modules[module]
    assert imported.VALUE == 42
    assert COUNTS[module] == 1
    assert deferred_imports.executed(module)
    assert imported.double(4) == 8
    assert importlib.import_module(module) is imported
    assert COUNTS[module] == 1
    assert type(imported) is type(sys)  # a plain module now


def test_from_import_runs_it(module: str) -> None:
    deferred_imports.defer((module,))
    namespace: dict[str, object] = {}
    exec(f"from {module} import double", namespace)
    assert COUNTS[module] == 1
    assert namespace["double"](3) == 6  # type: ignore[operator]


def test_threads_racing_to_the_first_use_run_it_once(module: str) -> None:
    deferred_imports.defer((module,))
    deferred = sys.modules[module]
    start = threading.Barrier(8)
    seen: list[int] = []

    def use() -> None:
        start.wait()
        seen.append(deferred.VALUE)

    threads = [threading.Thread(target=use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [42] * 8
    assert COUNTS[module] == 1


def test_a_module_that_fails_leaves_sys_modules_as_a_failed_import_does(
    tmp_path: Path, module: str
) -> None:
    (tmp_path / f"{module}.py").write_text("raise RuntimeError('broken')\n")
    importlib.invalidate_caches()
    deferred_imports.defer((module,))
    deferred = sys.modules[module]
    with pytest.raises(RuntimeError, match="broken"):
        deferred.anything  # noqa: B018
    assert module not in sys.modules


def test_imported_missing_and_dotted_names_are_left_alone(module: str) -> None:
    importlib.import_module(module)
    assert deferred_imports.defer((module, "no_such_module_anywhere")) == []
    assert COUNTS[module] == 1
    with pytest.raises(ValueError, match="top-level"):
        deferred_imports.defer(("ctypes.util",))
