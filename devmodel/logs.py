"""Logging on stderr, as toolstacks expect of the device models they run.

libxl, libvirt and systemd capture a device model's stderr into a per-guest log (or the
journal), so devmodel never opens log files or syslog itself. Two formats:

- text (default): `2026-05-09 07:35:25,123 devmodel[4242] dom7 INFO devmodel.leases: ...`;
  the guest id is on *every* line, tracebacks included (each of their lines carries the same
  prefix), so lines from many guests merged in one journal can still be told apart.
- json: one object per line, `{"time", "level", "logger", "domid", "pid", "message"[, "exc"]}`,
  for log shippers.

Text that came from a peer (a lender's BYE reason, a client's command) may contain control
characters; those are escaped so that no peer can forge log lines or drive the terminal.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Final, TextIO

# Control characters except TAB, escaped as \xNN.
_ESCAPES: Final = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F] if c != 0x09}


def clean(text: str) -> str:
    """`text` with control characters escaped (peer-supplied strings go through this)."""
    return text.translate(_ESCAPES)


class _GuestFilter(logging.Filter):
    """Stamps every record with the guest id, whichever logger made it."""

    def __init__(self, domid: int) -> None:
        super().__init__()
        self.domid = domid

    def filter(self, record: logging.LogRecord) -> bool:
        record.domid = self.domid
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s devmodel[%(process)d] dom%(domid)s %(levelname)s %(name)s: ")

    def format(self, record: logging.LogRecord) -> str:
        prefix = super().format(_without_message(record))
        lines = [clean(record.getMessage())]
        if record.exc_info:
            lines += self.formatException(record.exc_info).splitlines()
        if record.stack_info:
            lines += record.stack_info.splitlines()
        return "\n".join(prefix + line for line in lines)


def _without_message(record: logging.LogRecord) -> logging.LogRecord:
    """A shallow copy whose message part is empty (the formatter only renders the prefix)."""
    copy = logging.makeLogRecord(record.__dict__)
    copy.msg, copy.args, copy.exc_info, copy.exc_text, copy.stack_info = "", None, None, None, None
    return copy


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        import datetime  # noqa: PLC0415 (JSON logs only: kept out of every instance's start-up)

        when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        obj: dict[str, object] = {
            "time": when.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "domid": getattr(record, "domid", None),
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, ensure_ascii=True)


def setup(domid: int, fmt: str = "text", level: str = "info", stream: TextIO | None = None) -> None:
    """Route every logger to stderr in `fmt` at `level`, each line tagged with `domid`."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_GuestFilter(domid))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
