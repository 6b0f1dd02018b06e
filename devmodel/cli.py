"""The `devmodel` command line: `run` (what a toolstack launches per guest), `attach` (the
REPL on one instance's control socket) and `ls` (every instance on the host, at a glance).

Exit status: 0 after a clean stop, 1 when the service could not start, 2 for a usage error
(a bad option or configuration value), each error in one line on stderr: the conventions
toolstacks expect from device models (varstored, QEMU).

`run`'s options come from one table (devmodel/config.py) shared with the TOML file given by
`--config` (the command line wins) and with `--print-capabilities`, which prints what this
build supports as JSON, for a toolstack to check before it launches anything.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import trio

from devmodel import __version__, logs
from devmodel.config import (
    LIBVFIO_USER_MAX_APERTURE,
    OPTIONS,
    ConfigError,
    Settings,
    build_settings,
    describe_options,
    limits,
)
from devmodel.config import load_file as load_config_file

log = logging.getLogger("devmodel")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump), still exit status 2."""

    run_parser: argparse.ArgumentParser | None = None

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> _Parser:
    parser = _Parser(
        prog="devmodel",
        description="A per-guest device model: a PCI BAR through which a guest borrows memory "
        "lent by another domain.",
    )
    parser.add_argument("--version", action="version", version=f"devmodel {__version__}")
    parser.add_argument(
        "--print-capabilities",
        action="store_true",
        help="print what this build supports (transports, features, options, limits) as JSON",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    run_p = sub.add_parser(
        "run",
        help="serve the device to one guest until SIGTERM, SIGINT, SIGHUP or `quit`",
        description="Serve the PCI function to one guest until SIGTERM, SIGINT, SIGHUP or the "
        "control command quit, then remove its sockets and pidfile and exit 0. Exit 1 if it "
        "cannot start, 2 on a usage error. Every option can also be set in the --config file "
        "(same name without the leading dashes); the command line wins.",
    )
    parser.run_parser = run_p
    run_p.add_argument(
        "--config",
        metavar="FILE",
        help="read settings from this TOML file (keys are the option names, e.g. "
        'aperture-size = "64M"); options on the command line override it',
    )
    run_p.add_argument(
        "--print-capabilities",
        action="store_true",
        help="print what this build supports as JSON and exit",
    )
    for opt in OPTIONS:
        if opt.flag:
            run_p.add_argument(
                f"--{opt.name}",
                dest=opt.attr,
                action="store_true",
                default=argparse.SUPPRESS,
                help=opt.help,
            )
        else:
            run_p.add_argument(
                f"--{opt.name}",
                dest=opt.attr,
                metavar=opt.metavar,
                default=argparse.SUPPRESS,
                help=opt.help,
            )

    attach_p = sub.add_parser(
        "attach",
        help="attach the debug REPL to a running instance's control socket",
        description="An interactive console on a running device model's control socket: line "
        "editing, history, completion of the commands the instance reports, tables, live "
        "views (watch stats; watch map, the aperture) and events as they arrive. With -c, run "
        "commands and exit.",
    )
    attach_p.add_argument("control_socket", metavar="CONTROL_SOCKET")
    attach_p.add_argument(
        "-v", "--verbose", action="store_true", help="echo the JSON sent and received"
    )
    attach_p.add_argument(
        "-c",
        "--command",
        dest="lines",
        action="append",
        metavar="LINE",
        help="run this REPL line and exit (repeatable)",
    )
    attach_p.add_argument(
        "--history",
        metavar="FILE",
        help="history file (default ~/.devmodel_history; 'none' for none)",
    )
    attach_p.add_argument(
        "--no-events", action="store_true", help="do not show events as they arrive"
    )

    ls_p = sub.add_parser(
        "ls",
        help="list the running instances found by their control sockets",
        description="Ask every device model whose control socket is under DIR, all at once: "
        "domain, pid, transport, client and lender, leases, windows per state, faults per "
        "second. One that does not answer within --timeout is shown as not answering; a "
        "socket nobody listens on as stale.",
    )
    from devmodel.control.listing_options import add_arguments  # noqa: PLC0415 (small)

    add_arguments(ls_p)
    return parser


def capabilities() -> dict[str, object]:
    """What --print-capabilities prints."""
    from devmodel.control.commands import COMMANDS, EVENTS  # noqa: PLC0415 (only here)

    xen = importlib.util.find_spec("devmodel.xen.server") is not None
    return {
        "name": "devmodel",
        "version": __version__,
        "transports": {
            "vfio-user": {"available": True, "options": ["socket-path", "fd"]},
            "libvfio-user": {
                "available": _libvfio_user_available(),
                "options": ["socket-path"],
                "max_aperture_size": LIBVFIO_USER_MAX_APERTURE,
            },
            "xen": {"available": xen, "options": ["domid"]},
        },
        "features": [
            "builtin-lender",
            "lender-socket",
            "config-file",
            "control-socket",
            "control-events",
            "pidfile",
            "sd-notify",
            "ready-fd",
            "log-json",
            "metrics-prometheus",
            "metrics-http",
            "debug-console",
        ],
        "leases": lease_capabilities(),
        "options": describe_options(),
        "limits": limits(),
        "control": {
            "commands": sorted(["qmp_capabilities", *COMMANDS]),
            "events": list(EVENTS),
        },
        "exit_status": {"0": "clean stop", "1": "could not start", "2": "usage error"},
        "stop_signals": ["SIGTERM", "SIGINT", "SIGHUP"],
    }


def lease_capabilities() -> dict[str, object]:
    """The lease protocol as this borrower speaks it: which fd kinds a GRANT may carry, the
    HELLO features that enable them, and the dma-buf exporters it accepts (docs/lease-protocol.md
    section 5)."""
    from devmodel_wire.lease.checks import DMABUF_EXPORTERS  # noqa: PLC0415 (only here)
    from devmodel_wire.lease.constants import (  # noqa: PLC0415
        FEATURE_NAMES,
        FEATURES_KNOWN,
        VERSION_MAJOR,
        VERSION_MINOR,
    )

    return {
        "protocol": f"{VERSION_MAJOR}.{VERSION_MINOR}",
        "features": [name for bit, name in FEATURE_NAMES.items() if bit & FEATURES_KNOWN],
        "fd_kinds": ["memfd", "dma-buf"],
        "dmabuf_exporters": sorted(DMABUF_EXPORTERS),
    }


def _libvfio_user_available() -> bool:
    """Whether the libvfio-user transport's shared library is built here (not loaded)."""
    from devmodel.transports.libvfio_user_lib import (  # noqa: PLC0415
        LIBRARY_ENV,
        default_library_path,
    )

    env = os.environ.get(LIBRARY_ENV)
    return (Path(env) if env else default_library_path()).is_file()


def _print_capabilities() -> int:
    print(json.dumps(capabilities(), indent=2))
    return 0


def _startup_error(exc: BaseException) -> BaseException | None:
    """The StartupError in `exc`, even when trio wrapped it in an exception group."""
    from devmodel.control.toolstack import StartupError  # noqa: PLC0415

    if isinstance(exc, StartupError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _startup_error(inner)
            if found is not None:
                return found
    return None


def run_settings(args: argparse.Namespace) -> Settings:
    """`run`'s settings from its parsed arguments and `--config` file; ConfigError if bad."""
    given = {o.name: getattr(args, o.attr) for o in OPTIONS if hasattr(args, o.attr)}
    file_values = load_config_file(args.config) if args.config else None
    return build_settings(given, file_values, args.config)


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from devmodel.app import run  # noqa: PLC0415 (imports trio's whole world)

    if args.print_capabilities:
        return _print_capabilities()
    try:
        settings = run_settings(args)
    except ConfigError as exc:
        parser.error(str(exc))
    logs.setup(settings.domid, settings.log_format, settings.log_level)
    try:
        trio.run(run, settings)
    except BaseException as exc:
        found = _startup_error(exc)
        if found is None:
            raise
        log.error("cannot start: %s", found)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # Reported by the subcommand's parser, so the line names the command it belongs to.
        sub = parser.run_parser if args.command == "run" else parser
        assert sub is not None
        sub.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        if args.print_capabilities:
            return _print_capabilities()
        parser.error("a command is required: run, attach or ls")
    if args.command == "run":
        assert parser.run_parser is not None
        return _run(args, parser.run_parser)
    if args.command == "ls":
        from devmodel.control import listing  # noqa: PLC0415

        return listing.main(args)
    from devmodel import repl  # noqa: PLC0415 (readline only for the REPL)

    return repl.main(args)


if __name__ == "__main__":
    sys.exit(main())
