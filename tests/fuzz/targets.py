"""The fuzz targets by name: the module holding each one's `one_input`.

Kept as module names, not imported functions, so that the atheris runner can import each
target (and the parsers it drives) inside atheris's instrumentation.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

TARGETS: dict[str, str] = {
    "vfio_user": "tests.fuzz.target_vfio_user",
    "lease": "tests.fuzz.target_lease",
    "control": "tests.fuzz.target_control",
    "xen": "tests.fuzz.target_xen",
}

CORPUS = Path(__file__).parent / "corpus"
"""The committed seed corpus: CORPUS/<target>/<file>, one input per file."""


def load(name: str) -> Callable[[bytes], None]:
    module = importlib.import_module(TARGETS[name])
    one_input: Callable[[bytes], None] = module.one_input
    return one_input
