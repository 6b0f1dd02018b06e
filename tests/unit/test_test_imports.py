"""No module imports a test module or a conftest: what tests share lives in devmodel.testing or
in support modules (tests/integration/launching.py, tests/xen/rig.py, ...) that pytest does not
collect, and conftest files hold fixtures only."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def imported(node: ast.stmt) -> list[str]:
    """The modules an import statement names, relative ones with their leading dots."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = "." * node.level + (node.module or "")
        return [base] + [f"{base.rstrip('.')}.{alias.name}" for alias in node.names]
    return []


def test_nothing_imports_a_test_module_or_a_conftest() -> None:
    offences = []
    for top in ("tests", "bench", "examples"):
        for path in sorted((REPO / top).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.Import | ast.ImportFrom):
                    continue
                for module in imported(node):
                    last = module.rsplit(".", 1)[-1]
                    first = module.lstrip(".").split(".")[0]
                    local = module.startswith(".") or first == "tests"
                    if local and (last.startswith("test_") or last == "conftest"):
                        where = path.relative_to(REPO)
                        offences.append(f"{where}:{node.lineno}: imports {module}")
    assert not offences, "\n".join(offences)
