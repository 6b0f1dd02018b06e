"""`devmodel run`: builds the device from its settings and serves it until told to stop.

Life of an instance, in the order a toolstack sees it (shared/reference/xen-ioreq.md, "How
toolstacks run a device model"):

1. Startup. The pidfile is taken (locked) first, so a second instance for the same guest fails
   before it touches any socket. The lease engine, the lender (built-in or the link) and the
   PCI function are built; only then are the sockets created (vfio-user, metrics, control),
   so a socket that exists is one that serves. Then readiness: `READY=1` to NOTIFY_SOCKET
   and/or `--ready-fd`. Any failure up to here exits 1 with one line; nothing is left behind.
2. Running, in the foreground (never daemonized: the toolstack owns the process), logging to
   stderr with the guest id on every line.
3. Stopping, on SIGTERM, SIGINT, SIGHUP (libxl's), the control command `quit` or the guest's
   end (Xen transport: the @releaseDomain watch): the control
   clients get a SHUTDOWN event; accesses waiting inside the engine get a short grace to finish
   (STOP_GRACE); then every task is cancelled: the vfio-user transport answers the request it
   was serving (an error) and those already sent, the lender link drops its leases and says
   BYE; the sockets and the pidfile are removed, the last
   log line gives the counters, and the exit status is 0. A second stop signal while a
   signal's stop runs exits at once (the default action of the signal); a signal during a
   stop for another reason joins it (see _Stopper).

The Xen transport: `--transport xen` loads `devmodel.xen.server.serve_xen`,
started as `await nursery.start(serve_xen, device, counters, domid)`; it must call
`task_status.started()` once the ioreq server serves, and run until cancelled.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, NamedTuple

import trio

from devmodel import __version__
from devmodel.aperture import DEFAULT_GRANULE
from devmodel.backend import DeviceBackend
from devmodel.config import GRANULE_PICKED, Settings
from devmodel.control.instance import (
    BuiltinLenderView,
    Instance,
    Lender,
    LinkLenderView,
    Runtime,
    build_instance,
)
from devmodel.control.toolstack import (
    PidFile,
    StartupError,
    check_ready_fd,
    remove_stale_socket,
    sd_notify,
    unlink_quietly,
    write_ready_fd,
)
from devmodel.counters import DeviceCounters
from devmodel.leases.builtin_lender import BuiltinLender
from devmodel.leases.engine import EngineConfig, LeaseEngine
from devmodel.metrics.http_endpoint import bound_address, open_metrics, serve_metrics
from devmodel.metrics.timing import AccessTiming
from devmodel.pci.function import PciFunction
from devmodel.pci.identity import PciIdentity
from devmodel.pci.registers import Feature
from devmodel.polling import PageInPoll
from devmodel.sizes import format_size
from devmodel.transports.vfio_user import VfioUserServer

if TYPE_CHECKING:
    # Imported where used, so that an instance loads only what its settings need (the lease
    # protocol with a lender socket, the control server and commands with a control socket;
    # docs/performance.md, "Footprint of an idle instance").
    from devmodel.control.server import ControlClient, ControlServer
    from devmodel.leases.lender_link import LenderLink
    from devmodel.xen.platform import XenPlatform
    from devmodel_wire.control import Command

log = logging.getLogger("devmodel")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

# The built-in lender cuts the aperture into at most this many leases.
BUILTIN_MAX_LEASES = 65536
# How long a stop lets control clients read their last messages (the reply to `quit`).
CONTROL_FLUSH = 0.5
# How long a stop lets accesses waiting on a page-in finish normally. Short on purpose: a stop
# usually means the guest is going away, and the vfio-user transport answers whatever is still
# waiting when it is cancelled (an error reply, promptly; QEMU must not wait out its timeout).
STOP_GRACE = 0.25

__all__ = ["STOP_SIGNALS", "StartupError", "lender_link", "open_listener", "run"]


def open_listener(settings: Settings) -> socket.socket:
    """The vfio-user listening socket: inherited (`--fd`) or created (`--socket-path`)."""
    if settings.fd is not None:
        fd = settings.fd
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise StartupError(f"--fd {fd}: not a usable socket ({exc})") from None
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.detach()
            raise StartupError(f"--fd {fd}: not a unix stream socket")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.detach()
            raise StartupError(f"--fd {fd}: the socket is not listening")
        return sock
    path = settings.socket_path
    assert path is not None
    remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(4)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {path}: {exc.strerror}") from None
    return sock


async def run(
    settings: Settings, *, xen_platform: Callable[[int], XenPlatform] | None = None
) -> None:
    """Serve until stopped; StartupError if the service cannot start.

    `xen_platform(domid)` replaces the real Xen host for `--transport xen` (tests pass a
    simulated hypervisor); the command line never sets it."""
    if settings.ready_fd is not None:
        check_ready_fd(settings.ready_fd)
    pidfile = PidFile(settings.pidfile) if settings.pidfile else None
    try:
        # Signals are caught from the very start: a stop during startup is a clean stop too.
        with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            await _serve(settings, signals, xen_platform)
    finally:
        if pidfile is not None:
            pidfile.release()


class _Stopper:
    """One stop, whoever asks first (a signal, `quit`, the guest's end).

    Once a stop signal has arrived, the next one kills (the default action): an operator's
    second Ctrl-C. A stop for another reason keeps the handlers, so that the toolstack's own
    SIGTERM, which follows a guest's end as a matter of course, joins the stop in progress
    instead of cutting it short."""

    def __init__(self) -> None:
        self.event = trio.Event()
        self.reason = ""

    def request(self, reason: str, *, by_signal: bool = False) -> None:
        if by_signal:
            for s in STOP_SIGNALS:
                signal.signal(s, signal.SIG_DFL)
        if self.event.is_set():
            if by_signal:
                log.info("%s: already stopping (%s); another signal kills", reason, self.reason)
            return
        self.reason = reason
        # Logged once a second signal would kill: a supervisor (or a test) that reads this
        # line after a signal knows that the next stop signal ends the process at once.
        log.info("%s: stopping", reason)
        self.event.set()

    async def watch(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            self.request(signal.Signals(signum).name, by_signal=True)


class _Transport(NamedTuple):
    """A transport whose resources exist (its socket is bound): how to start it, and whether
    a client is attached (vfio-user; the Xen transport has no client to lose)."""

    start: Callable[[trio.Nursery], Awaitable[None]]
    connected: Callable[[], bool]
    drain: Callable[[], Awaitable[None]] | None = None
    """Run on a graceful stop before tasks are cancelled (libvfio-user: answer what the
    client sent while the leases are still held); the native transport drains on cancel."""


async def _serve(
    settings: Settings,
    signals: AsyncIterator[int],
    xen_platform: Callable[[int], XenPlatform] | None = None,
) -> None:
    started = time.time()
    counters = DeviceCounters()
    config = EngineConfig(
        page_in_timeout=settings.page_in_timeout,
        revoke_timeout=settings.revoke_timeout,
        policy=settings.failure_policy,
    )
    timing = AccessTiming()
    engine = LeaseEngine(settings.aperture_size, settings.granule, counters, config, timing=timing)
    stopper = _Stopper()
    builtin: BuiltinLender | None = None
    link: LenderLink | None = None
    lender: Lender
    if settings.lender_socket is None:
        chunk = max(settings.granule, settings.aperture_size // BUILTIN_MAX_LEASES)
        try:
            builtin = BuiltinLender(engine, chunk)
            builtin.lend_everything()
        except OSError as exc:
            raise StartupError(f"cannot create the built-in lender's memory: {exc}") from None
        lender = BuiltinLenderView(builtin)
    else:
        link = lender_link(settings, engine, counters)
        lender = LinkLenderView(link)
    vendor, device_id = settings.pci_id
    identity = PciIdentity(vendor_id=vendor, device_id=device_id)
    device = PciFunction(identity, engine, counters, features=Feature.LENT)
    # The one backend every transport calls (its region bus follows the function's BARs).
    backend = DeviceBackend(device)
    if link is not None and link.poll is not None:
        backend.follow_up = link.poll.follow_up
    runtime = Runtime()
    on_event = runtime.emit
    engine.on_event = on_event

    async with contextlib.AsyncExitStack() as stack:
        stack.callback(_close_engine, engine, builtin)
        stack.callback(backend.close)
        transport = _transport(
            settings, backend, counters, stack, on_event, stopper.request, xen_platform
        )
        transport_connected = transport.connected

        metrics_listeners: list[trio.SocketListener] = []
        metrics_address: tuple[str, int] | None = None
        if settings.metrics_listen is not None:
            host, port = settings.metrics_listen
            try:
                metrics_listeners = await open_metrics(host, port)
            except OSError as exc:
                raise StartupError(
                    f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}"
                ) from None
            for listener in metrics_listeners:
                stack.push_async_callback(listener.aclose)
            metrics_address = bound_address(metrics_listeners)
        # Everything the commands see exists now: the one place the Instance is built.
        inst = build_instance(
            settings,
            engine,
            timing,
            device,
            lender,
            transport_connected,
            stopper.request,
            runtime,
            metrics_address=metrics_address,
            started=started,
        )
        control: ControlServer | None = None
        if settings.control_socket is not None:
            from devmodel.control.server import ControlServer  # noqa: PLC0415

            control = ControlServer(
                settings.control_socket,
                functools.partial(_execute, inst),
                {
                    "qemu": {"major": 0, "minor": 1, "micro": 0},
                    "package": f"devmodel {__version__}",
                },
            )
            control.open()
            stack.callback(control.close)
            control.on_disconnect = _console_closed
            runtime.control = control

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stopper.watch, signals)
            if link is not None:
                nursery.start_soon(link.run)
            await transport.start(nursery)
            if control is not None:
                await nursery.start(control.serve)
            if metrics_listeners:
                await nursery.start(serve_metrics, metrics_listeners, inst.metrics.render)
            runtime.status = "running"
            _announce(settings, inst)
            await stopper.event.wait()
            await _graceful_stop(settings, inst, stopper.reason)
            if transport.drain is not None:
                await transport.drain()
            nursery.cancel_scope.cancel()
    log.info("stopped; counters: %s", counters.as_dict())


def lender_link(settings: Settings, engine: LeaseEngine, counters: DeviceCounters) -> LenderLink:
    """The link to the lender at `--lender-socket`, with the deadlines the settings give it."""
    from devmodel.leases.lender_link import LenderLink  # noqa: PLC0415 (see TYPE_CHECKING)

    assert settings.lender_socket is not None
    poll = None
    if settings.page_in_poll_max_us:
        poll = PageInPoll(settings.page_in_poll_max_us * 1000, counters)
    return LenderLink(
        engine,
        settings.lender_socket,
        settings.domid,
        hello_timeout=settings.lender_hello_timeout,
        ping_timeout=settings.lender_ping_timeout,
        write_timeout=settings.lender_write_timeout,
        poll=poll,
    )


async def _execute(inst: Instance, client: ControlClient, cmd: Command) -> object:
    """The control server's executor: the commands are loaded at the first one."""
    from devmodel.control import commands  # noqa: PLC0415 (see TYPE_CHECKING)

    return await commands.execute(inst, client, cmd)


def _console_closed(client: ControlClient) -> None:
    from devmodel.control import commands  # noqa: PLC0415

    commands.console_closed(client)


def _transport(
    settings: Settings,
    backend: DeviceBackend,
    counters: DeviceCounters,
    stack: contextlib.AsyncExitStack,
    on_event: Callable[[str, dict[str, object]], None],
    stop: Callable[[str], None],
    xen_platform: Callable[[int], XenPlatform] | None = None,
) -> _Transport:
    """Create the transport's resources now (StartupError here); return how to start it."""
    if settings.transport == "xen":
        try:
            xen = importlib.import_module("devmodel.xen.server")
            serve_xen = xen.serve_xen
        except (ImportError, AttributeError):
            raise StartupError(
                "the xen transport is not available in this build (devmodel.xen.server)"
            ) from None

        async def start_xen(nursery: trio.Nursery) -> None:
            start = functools.partial(
                serve_xen,
                pci_config_ports=settings.pci_config_ports,
                pvh_acpi_root=settings.pvh_acpi_root,
                on_domain_end=stop,
            )
            if xen_platform is not None:
                start = functools.partial(start, platform=xen_platform(settings.domid))
            await nursery.start(start, backend, counters, settings.domid)

        return _Transport(start_xen, lambda: False)

    def on_client(what: str) -> None:
        name = "CLIENT_CONNECTED" if what == "connected" else "CLIENT_DISCONNECTED"
        on_event(name, {"transport": settings.transport})

    if settings.transport == "libvfio-user":
        return _libvfio_user_transport(settings, backend, counters, stack, on_client)

    server = VfioUserServer(
        backend, counters, on_client=on_client, poll_max_ns=settings.poll_max_us * 1000
    )
    listener = open_listener(settings)
    owned = settings.socket_path if settings.fd is None else None
    stack.callback(unlink_quietly, owned)
    stack.callback(listener.close)

    async def start_vfio_user(nursery: trio.Nursery) -> None:
        await nursery.start(server.serve, listener)

    return _Transport(start_vfio_user, lambda: server.connected)


def _libvfio_user_transport(
    settings: Settings,
    backend: DeviceBackend,
    counters: DeviceCounters,
    stack: contextlib.AsyncExitStack,
    on_client: Callable[[str], None],
) -> _Transport:
    """The same device through libvfio-user (loaded only when asked for: it is a C build)."""
    from devmodel.transports import libvfio_user as lvu_transport  # noqa: PLC0415
    from devmodel.transports import libvfio_user_lib  # noqa: PLC0415

    path = settings.socket_path
    assert path is not None
    try:
        lib = libvfio_user_lib.load()
    except libvfio_user_lib.LibVfioUserMissing as exc:
        raise StartupError(str(exc)) from None
    remove_stale_socket(path)
    # A page-in is bounded by the engine; this bounds the access itself, whatever happens.
    server = lvu_transport.LibVfioUserServer(
        backend,
        counters,
        path,
        on_client=on_client,
        wait_limit=settings.page_in_timeout + STOP_GRACE + 1.0,
        lib=lib,
    )
    try:
        server.open()
    except lvu_transport.LibVfioUserError as exc:
        raise StartupError(str(exc)) from None
    stack.callback(server.close)

    async def start(nursery: trio.Nursery) -> None:
        await nursery.start(server.serve)

    return _Transport(start, lambda: server.connected, server.drain)


def _announce(settings: Settings, inst: Instance) -> None:
    """Log what serves where, then tell whoever waits for readiness."""
    where = (
        settings.socket_path
        if settings.socket_path is not None
        else (f"fd {settings.fd}" if settings.fd is not None else f"xen domain {settings.domid}")
    )
    vendor, device_id = settings.pci_id
    if settings.sources.get("granule") == GRANULE_PICKED:
        log.info(
            "no --granule given and the default %s does not fit BAR0: granule %s, the largest "
            "that fits %s",
            format_size(DEFAULT_GRANULE),
            format_size(settings.granule),
            format_size(settings.aperture_size),
        )
    log.info(
        "serving %04x:%04x, BAR0 %s (granule %s) on %s%s%s",
        vendor,
        device_id,
        format_size(settings.aperture_size),
        format_size(settings.granule),
        where,
        f", control {settings.control_socket}" if settings.control_socket else "",
        f", metrics http://{inst.metrics_address[0]}:{inst.metrics_address[1]}/metrics"
        if inst.metrics_address
        else "",
    )
    if settings.debug_console:
        log.warning("the debug console is enabled (--debug-console): `python` runs code here")
    sd_notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving domain {settings.domid}")
    if settings.ready_fd is not None:
        write_ready_fd(settings.ready_fd)


async def _graceful_stop(settings: Settings, inst: Instance, reason: str) -> None:
    runtime = inst.runtime
    runtime.status = "stopping"
    sd_notify("STOPPING=1")
    runtime.broadcast("SHUTDOWN", {"reason": reason})
    # Accesses waiting for a page-in that is about to arrive are served normally; the rest are
    # answered by the transport when it is cancelled.
    if not await inst.engine.drain(min(STOP_GRACE, settings.page_in_timeout)):
        log.info("%d access(es) still waiting; the transport answers them", inst.engine.in_flight)
    if runtime.control is not None:
        await runtime.control.flush(CONTROL_FLUSH)


def _close_engine(engine: LeaseEngine, builtin: BuiltinLender | None) -> None:
    engine.close()
    if builtin is not None:
        builtin.close()
