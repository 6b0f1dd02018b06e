"""`devmodel ls`'s options and defaults, apart from devmodel.control.listing, so that building
the command line's parser (which every `devmodel run` does) does not load the listing and the
control protocol's client side (docs/performance.md, "Footprint of an idle instance")."""

from __future__ import annotations

import argparse
from typing import Final

DEFAULT_DIR: Final = "/run/devmodel"
TIMEOUT: Final = 0.8
INTERVAL: Final = 0.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths",
        metavar="DIR",
        nargs="*",
        help="where to look for control sockets (default: $DEVMODEL_RUNDIR or "
        f"{DEFAULT_DIR}, the launch example's runtime directory); a socket may be named too",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=TIMEOUT,
        help=f"seconds each instance has for each answer (default {TIMEOUT:g})",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=INTERVAL,
        help=f"seconds between the two samples of the fault rate (default {INTERVAL:g})",
    )
    parser.add_argument("--json", action="store_true", help="one JSON array instead of a table")
