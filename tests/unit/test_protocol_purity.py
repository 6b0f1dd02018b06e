"""protocol/ is sans-IO: no module there may import anything that does IO or keeps time, nor
call the builtin open(). Everything that runs belongs in devmodel/.

KNOWN lists the offences that remain, each with what removing it takes; the test fails on any
other, and on a KNOWN one that is gone (so the list only shrinks)."""

from __future__ import annotations

import ast
from pathlib import Path

PROTOCOL = Path(__file__).resolve().parents[2] / "protocol"
FORBIDDEN = frozenset(
    {
        "asyncio",
        "fcntl",
        "io",
        "mmap",
        "os",
        "pathlib",
        "select",
        "selectors",
        "socket",
        "subprocess",
        "threading",
        "time",
        "trio",
    }
)

KNOWN = {
    # The connections own the fds that arrive with messages and close those they drop (a
    # refused GRANT's, a truncated message's). Not closing them needs an API for handing
    # dropped fds back to the IO loop, which every transport and lender must then use.
    "protocol/pyvfio_user/connection.py: imports os",
    "protocol/devmodel_wire/lease/connection.py: imports os",
}


def offences(path: Path) -> list[str]:
    """`file:line: what` for every forbidden import and open() call in `path`."""
    where = path.relative_to(PROTOCOL.parent)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module is not None and not node.level:
            modules = [node.module]
        else:
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "open"
            ):
                found.append(f"{where}:{node.lineno}: calls open()")
            continue
        found += [
            f"{where}:{node.lineno}: imports {module}"
            for module in modules
            if module.split(".")[0] in FORBIDDEN
        ]
    return found


def test_protocol_does_no_io() -> None:
    sources = sorted(PROTOCOL.rglob("*.py"))
    assert len(sources) > 10, f"protocol/ not found at {PROTOCOL}"
    found = [offence for path in sources for offence in offences(path)]
    new = [offence for offence in found if _without_line(offence) not in KNOWN]
    assert not new, "protocol/ must stay sans-IO:\n" + "\n".join(new)
    gone = KNOWN - {_without_line(offence) for offence in found}
    assert not gone, f"fixed, so take them off KNOWN: {sorted(gone)}"


def _without_line(offence: str) -> str:
    """`file:line: what` as `file: what`, the way KNOWN names it."""
    where, what = offence.split(": ", 1)
    return f"{where.rsplit(':', 1)[0]}: {what}"
