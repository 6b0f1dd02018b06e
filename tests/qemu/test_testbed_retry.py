"""The harness boots a guest again when its kernel died before /init, and never otherwise.

Not a qemu test: a stand-in for run-qemu (a shell script that plays a boot's console) drives
the real RunningGuest, so the rule is checked with the fast tests, without booting anything.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from . import testbed
from .testbed import (
    EARLY_DEATH_RETRIES,
    INIT_STARTED,
    RESULT_PREFIX,
    Reaper,
    RunningGuest,
    died_before_init,
)

PANIC = "[    1.46] Kernel panic - not syncing: Fatal exception in interrupt"
RESULT = RESULT_PREFIX + '{"test":"regs","ok":true}'

# Plays the boots listed in $FAKE_BOOTS (one word each: panic, init-panic, ok), one per run,
# counting runs in $FAKE_BOOTS.n: what run-qemu would print on the serial console.
FAKE_RUN_QEMU = f"""#!/bin/sh
n=$(cat "$FAKE_BOOTS.n" 2>/dev/null || echo 0)
echo $((n + 1)) > "$FAKE_BOOTS.n"
set -- $(cat "$FAKE_BOOTS")
shift "$n"
case "$1" in
    panic) echo '{PANIC}' ;;
    init-panic) echo '{INIT_STARTED}'; echo '{PANIC}' ;;
    *) echo '{INIT_STARTED}'; echo '{RESULT}' ;;
esac
"""


def test_a_console_is_an_early_death_only_with_a_panic_and_no_init() -> None:
    assert died_before_init(f"boot chatter\n{PANIC}\n")
    assert not died_before_init(f"{INIT_STARTED}\n{PANIC}\n")
    assert not died_before_init("boot chatter, then QEMU went away\n")


def guest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, boots: str) -> RunningGuest:
    configs = tmp_path / "qemu-configs"
    configs.mkdir()
    script = configs / "run-qemu"
    script.write_text(FAKE_RUN_QEMU)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    (tmp_path / "boots").write_text(boots)
    monkeypatch.setenv("FAKE_BOOTS", str(tmp_path / "boots"))
    monkeypatch.setattr(testbed, "QEMU_CONFIGS", configs)
    workdir = tmp_path / "guest"
    workdir.mkdir()
    return RunningGuest(Reaper(), workdir, ["regs"], timeout=20)


def boots_run(tmp_path: Path) -> int:
    return int((tmp_path / "boots.n").read_text())


@pytest.mark.parametrize("wait", ["finish", "wait_for"])
def test_kernels_that_die_before_init_are_booted_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wait: str
) -> None:
    g = guest(tmp_path, monkeypatch, "panic panic ok")
    if wait == "wait_for":
        assert g.wait_for(lambda r: r.get("test") == "regs", 20)["ok"] is True
    run = g.finish()
    assert run.line("regs")["ok"] is True
    assert run.early_deaths == 2 and boots_run(tmp_path) == 3
    # The dead boots' consoles stay beside the last one.
    assert PANIC in (tmp_path / "guest" / "serial.log.dead1").read_text()
    assert PANIC in (tmp_path / "guest" / "serial.log.dead2").read_text()
    assert "after 2 boot(s) that died before /init" in run.log_sections()[0][0]


def test_retries_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    g = guest(tmp_path, monkeypatch, " ".join(["panic"] * (EARLY_DEATH_RETRIES + 2)))
    run = g.finish()
    assert run.early_deaths == EARLY_DEATH_RETRIES
    assert boots_run(tmp_path) == EARLY_DEATH_RETRIES + 1
    assert PANIC in run.serial and run.results == []
    with pytest.raises(AssertionError, match="QEMU exited"):
        g.wait_for(lambda r: True, 5)


def test_a_guest_that_reached_init_is_never_booted_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = guest(tmp_path, monkeypatch, "init-panic ok")
    with pytest.raises(AssertionError, match="QEMU exited"):
        g.wait_for(lambda r: r.get("test") == "regs", 20)
    run = g.finish()
    assert run.early_deaths == 0 and boots_run(tmp_path) == 1
    assert run.results == []
