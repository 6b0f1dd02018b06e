"""`devmodel run`: builds the device from its options and serves it until told to stop.

Stop signals (SIGTERM, SIGINT, SIGHUP, the last being how libxl stops device models) end the
service gracefully: the socket is removed and the process exits 0. A second signal while
stopping exits at once.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import stat
from collections.abc import Iterator
from dataclasses import dataclass

import trio

from devmodel.aperture import DEFAULT_GRANULE
from devmodel.counters import DeviceCounters
from devmodel.leases.builtin_lender import BuiltinLender
from devmodel.leases.engine import EngineConfig, LeaseEngine
from devmodel.leases.lender_link import LenderLink
from devmodel.leases.policy import FailurePolicy
from devmodel.pci.function import PciFunction
from devmodel.pci.identity import PciIdentity
from devmodel.pci.registers import Feature
from devmodel.sizes import format_size
from devmodel.transports.vfio_user import VfioUserServer

log = logging.getLogger("devmodel")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class StartupError(Exception):
    """The service could not start (exit status 1): a message for the operator."""


@dataclass(slots=True)
class RunOptions:
    socket_path: str | None = None
    listen_fd: int | None = None
    aperture_size: int = 256 << 20
    granule: int = DEFAULT_GRANULE
    vendor_id: int = 0x1234
    device_id: int = 0x10E5
    page_in_timeout: float = 2.0
    revoke_timeout: float = 2.0
    failure_policy: FailurePolicy = FailurePolicy.ALL_ONES
    # Without a lender socket, devmodel lends itself private memory (the built-in lender).
    lender_socket: str | None = None
    guest_id: int = 0


# The built-in lender cuts the aperture into at most this many leases.
BUILTIN_MAX_LEASES = 65536


def open_listener(options: RunOptions) -> socket.socket:
    if options.listen_fd is not None:
        try:
            sock = socket.socket(fileno=options.listen_fd)
        except OSError as exc:
            raise StartupError(f"--fd {options.listen_fd}: not a usable socket ({exc})") from None
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise StartupError(f"--fd {options.listen_fd}: not a unix stream socket")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise StartupError(f"--fd {options.listen_fd}: the socket is not listening")
        return sock
    path = options.socket_path
    assert path is not None
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(4)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {path}: {exc.strerror}") from None
    return sock


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead instance; refuse to steal a live one's."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StartupError(f"{path} exists and is not a socket; not touching it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            os.unlink(path)
            return
        raise StartupError(f"cannot check the existing socket {path}: {exc.strerror}") from None
    finally:
        probe.close()
    raise StartupError(f"another process is serving on {path}")


@contextlib.contextmanager
def _socket_file(path: str | None) -> Iterator[None]:
    try:
        yield
    finally:
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


async def run(options: RunOptions) -> None:
    counters = DeviceCounters()
    config = EngineConfig(
        page_in_timeout=options.page_in_timeout,
        revoke_timeout=options.revoke_timeout,
        policy=options.failure_policy,
    )
    aperture = LeaseEngine(options.aperture_size, options.granule, counters, config)
    builtin: BuiltinLender | None = None
    if options.lender_socket is None:
        chunk = max(options.granule, options.aperture_size // BUILTIN_MAX_LEASES)
        try:
            builtin = BuiltinLender(aperture, chunk)
            builtin.lend_everything()
        except OSError as exc:
            raise StartupError(f"cannot create the built-in lender's memory: {exc}") from None
    identity = PciIdentity(vendor_id=options.vendor_id, device_id=options.device_id)
    device = PciFunction(identity, aperture, counters, features=Feature.LENT)
    listener = open_listener(options)
    owned_path = options.socket_path if options.listen_fd is None else None
    server = VfioUserServer(device, counters)
    with listener, _socket_file(owned_path), trio.open_signal_receiver(*STOP_SIGNALS) as sigs:
        async with trio.open_nursery() as nursery:
            if options.lender_socket is not None:
                link = LenderLink(aperture, options.lender_socket, options.guest_id)
                nursery.start_soon(link.run)
            await nursery.start(server.serve, listener)
            log.info(
                "serving %04x:%04x, BAR0 %s (granule %s) on %s",
                options.vendor_id,
                options.device_id,
                format_size(options.aperture_size),
                format_size(options.granule),
                options.socket_path or f"fd {options.listen_fd}",
            )
            async for signum in sigs:
                log.info("%s: stopping", signal.Signals(signum).name)
                # A second signal during the stop exits at once.
                for s in STOP_SIGNALS:
                    signal.signal(s, signal.SIG_DFL)
                nursery.cancel_scope.cancel()
                break
    aperture.close()
    if builtin is not None:
        builtin.close()
    log.info("stopped; counters: %s", counters.as_dict())
