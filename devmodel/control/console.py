"""The Python debug console: the `python` control command, only with `--debug-console`.

Why a control command rather than a console socket of its own: it inherits everything the
control socket already enforces (0600 socket in a private directory, peer uid checked, bounded
queues, line limits), there is no second socket to secure, find or clean up, and the REPL's
line editing, history and completion serve it for free (`python` enters a `py>` prompt).

What it is: each statement runs *on the device model's event loop*, between two guest accesses,
so it sees a consistent lease table and needs no locking; the price is that whatever it does
stalls the device while it runs, which is why it exists only when the instance was started
with `--debug-console`. Every session and every statement is logged at WARNING with the peer's
pid and uid, so a debugging session is visible in the guest's log afterwards.

The namespace is curated (the engine, the lease table helpers, trio's task tree, the counters,
the settings) and persists for the client's session. It is not a sandbox: the peer is already
the device model's own user or root, who could ptrace the process anyway.
"""

from __future__ import annotations

import contextlib
import io
import logging
import traceback
from collections.abc import Callable
from typing import Final

import trio

from devmodel.logs import clean

__all__ = [
    "MAX_OUTPUT",
    "Text",
    "log_statement",
    "namespace_for",
    "run_statement",
    "task_tree",
]

log = logging.getLogger("devmodel.console")

MAX_OUTPUT: Final = 1 << 20


class Text(str):
    """A string that shows as itself at the console prompt (no quotes, real newlines)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return str(self)


def task_tree() -> Text:
    """trio's task tree, one task per line, indented by nesting."""
    lines: list[str] = []

    def walk(task: trio.lowlevel.Task, depth: int) -> None:
        lines.append("  " * depth + task.name)
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child, depth + 1)

    root = trio.lowlevel.current_root_task()
    if root is not None:
        walk(root, 0)
    return Text("\n".join(lines))


def run_statement(namespace: dict[str, object], code: str) -> dict[str, object]:
    """Evaluate an expression (its repr is returned) or execute statements; capture stdout.

    Exceptions raised by the code are part of the answer ("error" holds the traceback), not a
    failure of the command: a typo in a debugging session is not an error of the protocol.
    """
    out = io.StringIO()
    result: object = None
    error = ""
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                compiled = compile(code, "<console>", "eval")
            except SyntaxError:
                exec(compile(code, "<console>", "exec"), namespace)
            else:
                result = eval(compiled, namespace)
    except SystemExit:
        error = "SystemExit is not allowed in the debug console"
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt | trio.Cancelled):
            raise
        error = "".join(traceback.format_exception(exc)[1:])  # without the console frame
    text = out.getvalue()
    answer: dict[str, object] = {"output": text[:MAX_OUTPUT]}
    if result is not None:
        namespace["_"] = result
        answer["result"] = repr(result)[:MAX_OUTPUT]
    if error:
        answer["error"] = error[:MAX_OUTPUT]
    return answer


def log_statement(who: str, first: bool, code: str) -> None:
    if first:
        log.warning("debug console session opened by %s", who)
    log.warning("debug console %s: %s", who, clean(code))


def namespace_for(
    objects: dict[str, object], helpers: dict[str, Callable[..., object]]
) -> dict[str, object]:
    ns: dict[str, object] = {"__name__": "__console__", "trio": trio, "tasks": task_tree}
    ns.update(objects)
    ns.update(helpers)
    return ns
