"""Every documented aperture size starts with default options (issue 14, bug 2).

`--aperture-size` takes a power of two from 1M (README, `--help`), and the default granule is
2M: a 1M aperture with no --granule used to exit 2 ("--granule must not be larger than
--aperture-size"). Without --granule devmodel now picks the largest granule that fits (4K for
1M), says so in its log, and reports it in `query-status` (with where it came from) and in
BAR2's GRANULE register. Each size from 1M to 64G is started as a toolstack would (starting is
enough for the big ones: the memory is MAP_NORESERVE); the smallest is also used by a guest.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from devmodel.config import GRANULE_PICKED
from devmodel.sizes import format_size
from devmodel.testing import VfioUserClient
from tests.integration.launching import Launched, launch, run_briefly

MiB = 1 << 20
SIZES = [MiB << n for n in range(17)]  # 1M, 2M, 4M, ... 64G
APERTURE_SIZE_REG = 0x08  # BAR2 (devmodel/pci/registers.py)
GRANULE_REG = 0x10


def _name(size: int) -> str:
    return f"{size // MiB}M" if size < 1 << 30 else f"{size >> 30}G"


def _expected_granule(size: int) -> int:
    return 4 << 10 if size < 2 * MiB else 2 * MiB


def test_every_documented_aperture_size_starts_with_default_options(tmp_path: Path) -> None:
    def start(size: int) -> Launched:
        where = tmp_path / _name(size)
        where.mkdir()
        return launch(where, "--aperture-size", _name(size), name="dm", ready_timeout=60)

    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(start, size) for size in SIZES]
    started = [f.result() for f in futures if f.exception() is None]
    try:
        failed = [(s, f.exception()) for s, f in zip(SIZES, futures, strict=True) if f.exception()]
        assert not failed, failed
        for size, dm in zip(SIZES, started, strict=True):
            with dm.control() as ctl:
                status = ctl.execute("query-status")
                config = ctl.execute("query-config")
            assert isinstance(status, dict) and isinstance(config, dict)
            granule = _expected_granule(size)
            assert (status["aperture_size"], status["granule"]) == (size, granule), _name(size)
            picked = granule != 2 * MiB
            assert status["granule_source"] == (GRANULE_PICKED if picked else "default")
            assert config["settings"]["granule"] == granule
            with VfioUserClient(dm.socket_path) as client:
                client.attach()
                assert client.read_u64(2, APERTURE_SIZE_REG) == size
                assert client.read_u32(2, GRANULE_REG) == granule
                if size == MiB:
                    # The smallest aperture is real memory a guest can use, end to end.
                    for offset in (0, 4096, MiB - 8):
                        client.write(0, offset, b"1M works")
                        assert client.read(0, offset, 8) == b"1M works"
            log = dm.stderr()
            assert f"BAR0 {_name(size)} (granule {format_size(granule)})" in log
            if picked:
                assert "no --granule given" in log and "granule 4K, the largest that fits" in log
    finally:
        for dm in started:
            dm.kill()


@pytest.mark.parametrize(("granule", "ok"), [("4K", True), ("2M", False), ("1G", False)])
def test_an_explicit_granule_larger_than_the_aperture_is_still_refused(
    tmp_path: Path, granule: str, ok: bool
) -> None:
    if ok:
        dm = launch(tmp_path, "--aperture-size", "1M", "--granule", granule)
        try:
            with dm.control() as ctl:
                status = ctl.execute("query-status")
            assert isinstance(status, dict)
            assert status["granule"] == 4096 and status["granule_source"] == "command line"
        finally:
            dm.kill()
        return
    done = run_briefly(
        "run", "--socket-path", str(tmp_path / "x.sock"), "--aperture-size", "1M",
        "--granule", granule,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--granule must not be larger than --aperture-size" in done.stderr
