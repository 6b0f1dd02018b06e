"""`python -m tests.fuzz TARGET [libFuzzer options] [corpus dirs]`: one target under atheris.

scripts/fuzz is the way in (time budget, cache directories, summary); this only instruments
the parsers, imports the target and hands control to libFuzzer. Only the protocol packages
are instrumented: coverage of the rest (the harness's own checks, the standard library,
construct) would be noise and cost speed.
"""

from __future__ import annotations

import sys

import atheris  # type: ignore[import-untyped]

from tests.fuzz.targets import TARGETS


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: python -m tests.fuzz {{{','.join(TARGETS)}}} [libFuzzer options]")
    name = sys.argv[1]
    with atheris.instrument_imports(include=["pyvfio_user", "devmodel_wire"]):
        # Imported here, inside the instrumentation, with the parsers it imports.
        from tests.fuzz.targets import load  # noqa: PLC0415

        one_input = load(name)
    atheris.Setup([sys.argv[0], *sys.argv[2:]], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
