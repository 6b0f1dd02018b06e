"""Real guests against a real device model: the processes behind the qemu tests.

Every process starts in a session of its own so that its whole process group (run-qemu and
QEMU, or the device model and anything it spawns) can be killed at once, whatever state a
failing or hanging test leaves it in. Output goes to files, not pipes, so a chatty process can
never block on a full pipe while the harness waits for something else.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from devmodel.pci.registers import REGISTER_BY_NAME

REPO = Path(__file__).resolve().parents[2]
QEMU_CONFIGS = REPO / "qemu-configs"


PROVISION_TIMEOUT = 900.0


def provision(script: Path, pytestconfig: pytest.Config) -> None:
    """Run a test bed's provisioning script once, its progress shown live (pytest's capture
    is suspended: a cold provisioning takes tens of seconds and is worth watching; a warm one
    prints nothing); the test fails with the script's output if it fails."""
    capman = pytestconfig.pluginmanager.getplugin("capturemanager")
    output: list[str] = []
    with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
        proc = subprocess.Popen([str(script)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stderr.write(line)
            output.append(line)
        try:
            rc = proc.wait(PROVISION_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    if rc != 0:
        where = script.relative_to(REPO)
        pytest.fail(f"{where} failed with status {rc}:\n{''.join(output)}", pytrace=False)
DEVMODEL = REPO / ".venv" / "bin" / "devmodel"
PYTHON = REPO / ".venv" / "bin" / "python"
REFERENCE_LENDER = REPO / "examples" / "reference_lender.py"
RESULT_PREFIX = "DEVMODEL-RESULT "
# How devmodel's last log line introduces its counters (devmodel/app.py).
STOPPED_COUNTERS = "stopped; counters: "
# Beyond run-qemu's own --timeout: the harness's last resort if run-qemu itself hangs.
HARD_TIMEOUT_MARGIN = 15.0
# Most of a log is the kernel's boot chatter; on failure show its end, which is what matters.
LOG_TAIL = 12_000
# What qemu-configs/guest/init prints first: the kernel got as far as userspace.
INIT_STARTED = "devmodel guest: /init started"
# A guest whose kernel panics before /init runs is booted again, at most this many times. Under
# TCG with two vCPUs a boot now and then ends in an `int3` Oops while the kernel patches its own
# code, before it ever touches the device (a known weakness of multi-threaded TCG, not of
# devmodel). A guest that reached /init is never retried: from there on, whatever happens is
# the test's evidence. The Xen test bed's guests follow the same rule (qemu-configs/xen/dom0/guest).
EARLY_DEATH_RETRIES = 2


def died_before_init(serial: str) -> bool:
    """Whether this console is of a kernel that panicked before /init started."""
    return INIT_STARTED not in serial and "Kernel panic" in serial

# The device model's BAR0 as `devmodel run` starts it here (its default).
APERTURE = 256 << 20
# Guest parameters that keep both boots to several seconds each: every trapped read is a
# socket round trip of tens of microseconds under TCG.
PATTERN_BYTES = 64 << 10
TIMING_ITERS = 5000
GUEST_APPEND = (f"devmodel.bytes={PATTERN_BYTES} devmodel.iters={TIMING_ITERS} "
                f"devmodel.scratch={REGISTER_BY_NAME['SCRATCH'].offset:#x}")
BOOT_TIMEOUT = 120.0

# What bartest does (qemu-configs/guest/bartest.c), for tests that count accesses.
TAIL_BYTES = 64 << 10  # the pattern test always covers the last 64 KiB of BAR0 too
ACCESS_SIZES = (1, 2, 4, 8)
# boundary: at each end of BAR0 one priming qword store, then 8/4/2/1-byte stores each read
# back, then 1/2/4/8-byte loads.
BOUNDARY_WRITES = 2 * (1 + 4)
BOUNDARY_READS = 2 * (4 + 4)


def fill_verify_accesses(length: int) -> tuple[int, int]:
    """(stores, loads) of bartest's fill_verify on `length` bytes: each quarter written with
    one access size, each sixteenth read with one."""
    writes = sum(length // 4 // size for size in ACCESS_SIZES)
    reads = 4 * sum(length // 16 // size for size in ACCESS_SIZES)
    return writes, reads


def tail(text: str, limit: int = LOG_TAIL) -> str:
    if len(text) <= limit:
        return text
    return f"[... {len(text) - limit} characters cut ...]\n{text[-limit:]}"


def _die_with_parent(argv: list[str]) -> list[str]:
    """`argv` run so that it gets SIGTERM if the harness dies (even by SIGKILL): no device
    model or QEMU outlives a killed test run. The signal survives setpriv's exec."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *argv] if setpriv else argv


class Process:
    """A child in its own session whose group is killed on stop, with its output in a file."""

    def __init__(self, name: str, argv: list[str], log_path: Path,
                 stdout_path: Path | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.stdout_path = stdout_path or log_path
        with log_path.open("wb") as err:
            out = stdout_path.open("wb") if stdout_path else err
            try:
                self.proc = subprocess.Popen(_die_with_parent(argv), stdin=subprocess.DEVNULL,
                                             stdout=out, stderr=err, start_new_session=True)
            finally:
                if out is not err:
                    out.close()
        self.returncode: int | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def wait(self, timeout: float) -> int | None:
        """The exit status, or None if the process is still running after `timeout` seconds."""
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        return self.returncode

    def kill_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, grace: float = 5.0) -> int:
        """Signal the process, give it `grace` seconds, then SIGKILL its whole group.

        The group is killed even after a clean exit: a process may leave children behind.
        """
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.wait(grace)
        self.kill_group(signal.SIGKILL)
        if rc is None:
            rc = self.proc.wait()
        self.returncode = rc
        return rc


@dataclass
class Reaper:
    """Kills every process it was given: the safety net behind each test's own stops."""

    procs: list[Process] = field(default_factory=list)

    def add(self, proc: Process) -> Process:
        self.procs.append(proc)
        return proc

    def reap(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(signal.SIGKILL, grace=0.5)
        self.procs.clear()


class DevmodelServer:
    """`devmodel run` serving vfio-user on a unix socket, started as a user would start it."""

    def __init__(self, reaper: Reaper, workdir: Path, *args: str,
                 aperture_size: str = "256M", pci_id: str = "1234:10e5",
                 startup_timeout: float = 20.0, socket_path: Path | None = None,
                 transport: str = "vfio-user") -> None:
        if not DEVMODEL.exists():
            raise RuntimeError(f"{DEVMODEL} is missing: run scripts/setup-env")
        # socket_path: another instance's socket, to restart a device model in its place.
        self.socket_path = socket_path or workdir / "devmodel.sock"
        self.transport = transport
        argv = [str(DEVMODEL), "run", "--socket-path", str(self.socket_path),
                "--transport", transport,
                "--aperture-size", aperture_size, "--pci-id", pci_id, *args]
        self.process = reaper.add(Process("devmodel", argv, workdir / "devmodel.stderr"))
        deadline = time.monotonic() + startup_timeout
        while not self.socket_path.is_socket():
            if self.process.proc.poll() is not None:
                raise RuntimeError(
                    f"devmodel exited with status {self.process.proc.returncode} before it "
                    f"listened:\n{tail(self.process.log())}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"devmodel did not create {self.socket_path} within "
                                   f"{startup_timeout:g} s:\n{tail(self.process.log())}")
            time.sleep(0.02)

    def stop(self) -> int:
        return self.process.stop(signal.SIGTERM, grace=10.0)

    def counters(self) -> dict[str, int] | None:
        """The counters of the device model's last log line ("stopped; counters: {...}"),
        once it has stopped cleanly."""
        for line in reversed(self.process.log().splitlines()):
            at = line.find(STOPPED_COUNTERS)
            if at >= 0:
                value = ast.literal_eval(line[at + len(STOPPED_COUNTERS):].strip())
                assert isinstance(value, dict)
                return {str(k): int(v) for k, v in value.items()}
        return None

    def log_sections(self) -> list[tuple[str, str]]:
        return [(f"devmodel stderr ({shlex.join(self.process.argv)})",
                 tail(self.process.log()))]


class LenderProcess:
    """examples/reference_lender.py as its own process, the way a toolstack would run it.

    `evict_all()` is its SIGUSR1; `stop()` ends it with SIGTERM, after which `summary()` has
    the statistics it printed on the way out.
    """

    def __init__(self, reaper: Reaper, workdir: Path, *args: str,
                 startup_timeout: float = 20.0) -> None:
        self.socket_path = workdir / "lender.sock"
        argv = [str(PYTHON), str(REFERENCE_LENDER), "--socket", str(self.socket_path), *args]
        self.process = reaper.add(Process("lender", argv, workdir / "lender.stderr",
                                          stdout_path=workdir / "lender.stdout"))
        deadline = time.monotonic() + startup_timeout
        while not self.socket_path.is_socket():
            if self.process.proc.poll() is not None:
                raise RuntimeError(
                    f"the reference lender exited with status {self.process.proc.returncode} "
                    f"before it listened:\n{tail(self.process.log())}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the reference lender did not create {self.socket_path} "
                                   f"within {startup_timeout:g} s:\n{tail(self.process.log())}")
            time.sleep(0.02)

    def evict_all(self) -> None:
        self.process.proc.send_signal(signal.SIGUSR1)

    def stop(self) -> int:
        return self.process.stop(signal.SIGTERM, grace=10.0)

    def summary(self) -> dict[str, int] | None:
        """The "summary:" block it prints when it stops (None before that)."""
        out = self.process.stdout()
        if "summary:" not in out:
            return None
        found: dict[str, int] = {}
        for line in out.split("summary:", 1)[1].splitlines():
            key, _, value = line.strip().partition(": ")
            if key:
                found[key] = int(value)
        return found

    def log_sections(self) -> list[tuple[str, str]]:
        return [(f"reference lender stderr ({shlex.join(self.process.argv)})",
                 tail(self.process.log())),
                ("reference lender stdout", tail(self.process.stdout()))]


@dataclass
class GuestRun:
    """One guest boot: its parsed result lines and everything needed to explain a failure."""

    argv: list[str]
    serial: str
    qemu_stderr: str
    returncode: int | None
    seconds: float
    results: list[dict[str, Any]]
    server: DevmodelServer | None = None
    server_returncode: int | None = None
    # Boots before this one whose kernel died before /init (EARLY_DEATH_RETRIES).
    early_deaths: int = 0

    def lines(self, test: str) -> list[dict[str, Any]]:
        return [r for r in self.results if r.get("test") == test]

    def line(self, test: str) -> dict[str, Any]:
        """The single result line of `test`."""
        found = self.lines(test)
        assert len(found) == 1, f"expected one {test!r} result line, got {found}"
        return found[0]

    def event(self, name: str) -> dict[str, Any] | None:
        return next((r for r in self.results if r.get("event") == name), None)

    def log_sections(self) -> list[tuple[str, str]]:
        retried = (f", after {self.early_deaths} boot(s) that died before /init"
                   if self.early_deaths else "")
        sections = [
            (f"guest serial console ({self.seconds:.1f} s, run-qemu exit {self.returncode}"
             f"{retried})", tail(self.serial)),
            (f"QEMU stderr ({shlex.join(self.argv)})", tail(self.qemu_stderr)),
        ]
        if self.server is not None:
            sections += self.server.log_sections()
        return sections


def parse_results(serial: str) -> Iterator[dict[str, Any]]:
    """The guest's result objects, in order.

    The prefix is searched anywhere in a line, because a kernel message may land in front of
    (or behind) it on the shared console; a line that does not parse is returned as a
    `parse_error` so a test fails on it instead of missing it.
    """
    for line in serial.splitlines():
        at = line.find(RESULT_PREFIX)
        if at < 0:
            continue
        text = line[at + len(RESULT_PREFIX):].strip()
        try:
            # raw_decode: console text may also follow the object on the same line.
            obj, _ = json.JSONDecoder().raw_decode(text)
        except json.JSONDecodeError as exc:
            yield {"parse_error": str(exc), "line": text}
            continue
        yield obj if isinstance(obj, dict) else {"parse_error": "not an object", "line": text}


class RunningGuest:
    """A guest booting or running in the background, for tests that act while it runs.

    The host follows the guest through its result lines (`wait_for`) and does things to the
    device model between them; `finish` waits for the power-off and returns the GuestRun.
    """

    def __init__(self, reaper: Reaper, workdir: Path, tests: list[str], *,
                 server: DevmodelServer | None = None, smp: int = 1, append: str = "",
                 timeout: float = 90.0, msg_timeout: int | None = None,
                 qemu_args: tuple[str, ...] = ()) -> None:
        argv = [str(QEMU_CONFIGS / "run-qemu"), "--smp", str(smp), "--test", ",".join(tests),
                "--timeout", f"{timeout:g}"]
        if server is not None:
            argv += ["--socket", str(server.socket_path)]
        if append:
            argv += ["--append", append]
        if msg_timeout is not None:
            argv += ["--msg-timeout", str(msg_timeout)]
        if qemu_args:
            argv += ["--", *qemu_args]
        self.argv = argv
        self.server = server
        # Called with the finished run (the conftest's timing summary listens here).
        self.on_finish: Callable[[GuestRun], None] | None = None
        self.timeout = timeout
        self.workdir = workdir
        self.reaper = reaper
        self.early_deaths = 0
        self._boot()

    def _boot(self) -> None:
        self.t0 = time.monotonic()
        self.qemu = self.reaper.add(Process("qemu", self.argv, self.workdir / "qemu.stderr",
                                            stdout_path=self.workdir / "serial.log"))

    def _reboot_if_died_early(self) -> bool:
        """If QEMU has exited and its kernel died before /init, boot again (at most
        EARLY_DEATH_RETRIES times; the dead boot's console and stderr are kept beside, as
        serial.log.deadN and qemu.stderr.deadN): True when it did."""
        if self.qemu.proc.poll() is None or self.early_deaths >= EARLY_DEATH_RETRIES:
            return False
        if not died_before_init(self.qemu.stdout()):
            return False
        self.qemu.stop(signal.SIGKILL, grace=0)
        self.early_deaths += 1
        for name in ("serial.log", "qemu.stderr"):
            path = self.workdir / name
            if path.exists():
                path.rename(self.workdir / f"{name}.dead{self.early_deaths}")
        self._boot()
        return True

    def results(self) -> list[dict[str, Any]]:
        """The result lines the guest printed so far."""
        return list(parse_results(self.qemu.stdout()))

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float
                 ) -> dict[str, Any]:
        """The first result line that satisfies `predicate`, waiting up to `timeout` seconds.

        Raises AssertionError (with the guest's logs) if QEMU exits or time runs out first.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = next((r for r in self.results() if predicate(r)), None)
            if found is not None:
                return found
            if self._reboot_if_died_early():
                deadline = time.monotonic() + timeout  # the new boot gets the whole wait
                continue
            exited = self.qemu.proc.poll() is not None
            if exited or time.monotonic() > deadline:
                why = f"QEMU exited ({self.qemu.proc.returncode})" if exited else (
                    f"nothing after {timeout:g} s")
                run = self.snapshot(self.qemu.proc.returncode)
                logs = "\n".join(f"----- {t} -----\n{x}" for t, x in run.log_sections())
                raise AssertionError(f"the guest never printed the awaited line: {why}\n{logs}")
            time.sleep(0.05)

    def snapshot(self, returncode: int | None) -> GuestRun:
        serial = self.qemu.stdout()
        return GuestRun(argv=self.argv, serial=serial, qemu_stderr=self.qemu.log(),
                        returncode=returncode, seconds=time.monotonic() - self.t0,
                        results=list(parse_results(serial)), server=self.server,
                        early_deaths=self.early_deaths)

    def finish(self) -> GuestRun:
        """Wait for the guest to power off (or run-qemu's timeout) and return what it printed."""
        while True:
            left = self.timeout + HARD_TIMEOUT_MARGIN - (time.monotonic() - self.t0)
            rc = self.qemu.wait(max(left, 0.1))
            if rc is None or not self._reboot_if_died_early():
                break
        run = self.snapshot(rc)
        self.qemu.stop(signal.SIGKILL, grace=0)
        if self.on_finish is not None:
            self.on_finish(run)
        return run


def boot_guest(reaper: Reaper, workdir: Path, tests: list[str], *,
               server: DevmodelServer | None = None, smp: int = 1, append: str = "",
               timeout: float = 90.0, msg_timeout: int | None = None,
               qemu_args: tuple[str, ...] = ()) -> GuestRun:
    """Boot the test guest, run `tests` in it and return what it printed.

    Blocks until the guest powers off or `timeout` passes (then run-qemu kills QEMU, and the
    harness kills run-qemu's group if even that hangs).
    """
    return RunningGuest(reaper, workdir, tests, server=server, smp=smp, append=append,
                        timeout=timeout, msg_timeout=msg_timeout, qemu_args=qemu_args).finish()
