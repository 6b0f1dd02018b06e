"""`trace on`: every access to the aperture logged at debug level, for a person debugging.

It is the engine's `tracer` hook, set only while tracing is on, so an engine nobody traces
pays one attribute test per access for it. Records go to the `devmodel.trace` logger, whose
level is lowered while tracing so that they pass even when the rest logs at info.
"""

from __future__ import annotations

import logging

from devmodel.leases.engine import LeaseEngine

__all__ = ["log_access", "set_tracing", "trace_log"]

trace_log = logging.getLogger("devmodel.trace")


def log_access(write: bool, offset: int, data: bytes, ns: int) -> None:
    """The tracer: one debug line per access, with its data and duration."""
    if write:
        trace_log.debug("write %d at %#x <- %s (%d ns)", len(data), offset, data.hex(), ns)
    else:
        trace_log.debug("read %d at %#x = %s (%d ns)", len(data), offset, data.hex(), ns)


def set_tracing(engine: LeaseEngine, on: bool) -> None:
    """Turn the access trace of `engine` on or off."""
    engine.tracer = log_access if on else None
    trace_log.setLevel(logging.DEBUG if on else logging.NOTSET)
