"""The `devmodel` command line.

Exit status: 0 after a clean stop, 1 when the service could not start, 2 for a usage error
(the conventions toolstacks expect from device models).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import trio

from devmodel import __version__
from devmodel.aperture import DEFAULT_GRANULE, GRANULES, check_aperture_size
from devmodel.app import RunOptions, StartupError, run
from devmodel.leases.policy import FailurePolicy
from devmodel.pci.identity import parse_pci_id
from devmodel.sizes import format_size, parse_size


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _aperture_arg(text: str) -> int:
    size = _size_arg(text)
    try:
        check_aperture_size(size)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return size


def _granule_arg(text: str) -> int:
    size = _size_arg(text)
    if size not in GRANULES:
        raise argparse.ArgumentTypeError(
            f"granule must be one of {', '.join(format_size(g) for g in GRANULES)}, not {text}"
        )
    return size


def _pci_id_arg(text: str) -> tuple[int, int]:
    try:
        return parse_pci_id(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < 4.5:
        raise argparse.ArgumentTypeError(
            "timeouts must be above 0 and below 4.5 s (QEMU gives up on a reply after 5 s)"
        )
    return value


def _fd_arg(text: str) -> int:
    try:
        fd = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--fd takes a file descriptor number, not {text!r}"
        ) from None
    if fd < 0:
        raise argparse.ArgumentTypeError("--fd must not be negative")
    return fd


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="devmodel",
        description="A per-guest device model: a PCI BAR through which a guest borrows memory "
        "lent by another domain.",
    )
    parser.add_argument("--version", action="version", version=f"devmodel {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run_p = sub.add_parser(
        "run",
        help="serve the device to one guest until SIGTERM, SIGINT or SIGHUP",
        description="Serve the PCI function over vfio-user until SIGTERM, SIGINT or SIGHUP, "
        "then remove the socket and exit 0. Exit 1 if it cannot start, 2 on a usage error.",
    )
    where = run_p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--socket-path",
        metavar="PATH",
        help="listen for the vfio-user client (QEMU's vfio-user-pci) on this unix socket; "
        "a stale socket file from a dead instance is replaced",
    )
    where.add_argument(
        "--fd",
        type=_fd_arg,
        metavar="N",
        help="serve on an inherited, already listening unix stream socket",
    )
    run_p.add_argument(
        "--aperture-size",
        type=_aperture_arg,
        default=256 << 20,
        metavar="SIZE",
        help="size of BAR0, the lent-memory aperture: a power of two from 1M (K/M/G/T "
        "suffixes; default 256M)",
    )
    run_p.add_argument(
        "--granule",
        type=_granule_arg,
        default=DEFAULT_GRANULE,
        metavar="SIZE",
        help="lease granule: 4K, 2M or 1G (default 2M)",
    )
    run_p.add_argument(
        "--pci-id",
        type=_pci_id_arg,
        default=(0x1234, 0x10E5),
        metavar="VVVV:DDDD",
        help="PCI vendor and device id in hex (default 1234:10e5)",
    )
    run_p.add_argument(
        "--lender-socket",
        metavar="PATH",
        help="borrow BAR0's memory from the lender listening on this unix socket "
        "(docs/lease-protocol.md); without it devmodel lends itself private memory",
    )
    run_p.add_argument(
        "--domid",
        type=int,
        default=0,
        metavar="N",
        help="the guest's id, sent to the lender in HELLO (default 0)",
    )
    run_p.add_argument(
        "--page-in-timeout",
        type=_seconds_arg,
        default=2.0,
        metavar="SECONDS",
        help="how long an access waits for a page-in before the failure policy applies "
        "(default 2; keep it under the client's reply timeout, 5 s for QEMU)",
    )
    run_p.add_argument(
        "--revoke-timeout",
        type=_seconds_arg,
        default=2.0,
        metavar="SECONDS",
        help="how long a revoke waits for transports to unmap the window (default 2)",
    )
    run_p.add_argument(
        "--failure-policy",
        choices=[p.value for p in FailurePolicy],
        default=FailurePolicy.ALL_ONES.value,
        help="what an access gets when its memory cannot be had: all-ones reads and dropped "
        "writes (default, like a PCI master abort), zeros, or an error reply",
    )
    run_p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log verbosity on stderr (default info)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s devmodel[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.granule > args.aperture_size:
        parser.error("--granule must not be larger than --aperture-size")
    vendor, device = args.pci_id
    options = RunOptions(
        socket_path=args.socket_path,
        listen_fd=args.fd,
        aperture_size=args.aperture_size,
        granule=args.granule,
        vendor_id=vendor,
        device_id=device,
        page_in_timeout=args.page_in_timeout,
        revoke_timeout=args.revoke_timeout,
        failure_policy=FailurePolicy(args.failure_policy),
        lender_socket=args.lender_socket,
        guest_id=args.domid,
    )
    try:
        trio.run(run, options)
    except StartupError as exc:
        print(f"devmodel: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
