"""Every committed corpus input, replayed through its fuzz target: the seeds stay valid
starting points, and every regression input (`regress-*`) keeps its bug fixed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fuzz import seeds
from tests.fuzz.targets import CORPUS, TARGETS, load

CASES = sorted(
    (target, path) for target in TARGETS for path in (CORPUS / target).iterdir() if path.is_file()
)


@pytest.mark.parametrize(("target", "path"), CASES, ids=[f"{t}/{p.name}" for t, p in CASES])
def test_corpus_input_passes_its_target(target: str, path: Path) -> None:
    load(target)(path.read_bytes())


def test_every_target_has_seeds_and_the_corpus_is_small() -> None:
    for target in TARGETS:
        files = list((CORPUS / target).iterdir())
        assert any(f.name.startswith("seed-") for f in files), target
        assert sum(f.stat().st_size for f in files) < 32 << 10, f"{target}: corpus over 32 KiB"


def test_committed_seeds_are_what_seeds_py_makes() -> None:
    """The seeds are generated (python -m tests.fuzz.seeds); a format change regenerates them."""
    for target, make in seeds.SEEDS.items():
        for name, data in make().items():
            assert (CORPUS / target / f"seed-{name}").read_bytes() == data, (target, name)
