"""Opening the real Xen host, with the libraries' own complaints folded into one error line."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator

from devmodel.control.toolstack import StartupError
from devmodel.xen.platform import XenPlatform

__all__ = ["open_host"]

log = logging.getLogger("devmodel.xen")


def open_host(domid: int) -> XenPlatform:
    """The real host, imported only when used (it loads Xen's libraries).

    Xen's libraries report their own open failures on stderr through their default logger
    ("xencall: error: ..."); that text is caught here and folded into the one line a
    failed start prints, so a toolstack's log gets one message, not two.
    """
    try:
        from devmodel.xen.host import XenHost  # noqa: PLC0415
    except ImportError as exc:
        raise StartupError(f"the Xen host interface is not available: {exc}") from None
    with _captured_stderr() as said:
        try:
            host: XenPlatform = XenHost(domid)
        except (OSError, ValueError) as exc:
            failure: BaseException | None = exc
        else:
            failure = None
    libraries = "; ".join(line.strip() for line in said if line.strip())
    if failure is not None:
        extra = f" ({libraries})" if libraries else ""
        raise StartupError(
            f"cannot open Xen's interfaces for domain {domid}: {failure}{extra}"
        ) from None
    if libraries:
        log.info("Xen's libraries said: %s", libraries)
    return host


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """File descriptor 2 redirected to a temporary file; its lines in the list afterwards."""
    lines: list[str] = []
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as tmp:
            os.dup2(tmp.fileno(), 2)
            try:
                yield lines
            finally:
                os.dup2(saved, 2)
                tmp.seek(0)
                lines.extend(tmp.read(4096).decode(errors="replace").splitlines())
    finally:
        os.close(saved)
