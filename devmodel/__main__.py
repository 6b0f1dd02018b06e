"""`python -m devmodel` and the `devmodel` command (pyproject.toml's script).

Before anything imports trio, the standard modules trio loads for features devmodel never uses
are deferred (devmodel/deferred_imports.py): ~6 MB of every instance's memory.
"""

import sys

from devmodel import deferred_imports


def main() -> int:
    deferred_imports.defer()
    from devmodel.cli import main as cli_main  # noqa: PLC0415 (after the deferral above)

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
