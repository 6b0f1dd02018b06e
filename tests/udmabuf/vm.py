"""The udmabuf tests on a host without udmabuf: one VM run, and its results as test outcomes.

tests/udmabuf/conftest.py replaces each selected test marked `udmabuf` with a stand-in
(VmItem) when this host has no /dev/udmabuf. The first stand-in to run boots the udmabuf VM
(qemu-configs/udmabuf/run) once, which runs all of their test ids with the host's own Python and
this checkout (shared read-only), and writes a JUnit XML report; each stand-in then reports its
test's outcome from that report: passed, failed with the VM's report text, skipped or xfailed
with the VM's reason. A VM that cannot run fails every stand-in with one line saying why.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

REPO = Path(__file__).resolve().parents[2]
VM_CONFIGS = REPO / "qemu-configs" / "udmabuf"
MARKER = "udmabuf"
# Set (to 1) by the VM's init for the command it runs: the tests run here, for real.
IN_VM_ENV = "DEVMODEL_UDMABUF_VM"
# Set (to 1) to send the tests to the VM even where this host has udmabuf.
VIA_VM_ENV = "DEVMODEL_UDMABUF_VIA_VM"
# A stand-in for qemu-configs/udmabuf/run (same arguments; no provisioning is done for it):
# the plumbing's own tests use one that writes a JUnit report without booting anything.
RUN_ENV = "DEVMODEL_UDMABUF_VM_RUN"
UDMABUF = Path("/dev/udmabuf")
# The run's directory as the VM sees it (qemu-configs/udmabuf/init).
VM_OUT = "/run/out"
JUNIT = "junit.xml"
# The whole run: boot under TCG, Python and pytest starting over 9p, the tests. A boot to the
# command took about 10 s on a loaded 2-core machine and pytest's start about 40 s more.
VM_TIMEOUT = 900.0
# How many of the slowest tests in the VM the summary names, with their times.
SLOWEST = 5
# What a failure report quotes of the VM's console.
CONSOLE_TAIL = 6000

Kind = Literal["passed", "failed", "skipped", "xfailed"]


@dataclass(frozen=True)
class Outcome:
    """One test's result in the VM: `text` is the report for a failure, the reason for a
    skip or an xfail, empty for a pass."""

    kind: Kind
    text: str = ""
    # The VM's own figure for the test (setup, call and teardown), for the summary.
    seconds: float = 0.0


def runs_here() -> bool:
    """Whether the udmabuf tests run in this process as they are: in the VM, or on a host whose
    kernel has udmabuf. Anywhere else they go to the VM."""
    if os.environ.get(IN_VM_ENV) == "1":
        return True
    return UDMABUF.exists() and os.environ.get(VIA_VM_ENV) != "1"


def junit_key(nodeid: str) -> tuple[str, str]:
    """The (classname, name) pytest's junitxml plugin writes for a test id: the path dotted
    without .py, then any classes; the function name with its parameters."""
    path, bracket, params = nodeid.partition("[")
    names = path.split("::")
    names[0] = re.sub(r"\.py$", "", names[0].replace("/", "."))
    names[-1] += bracket + params
    return ".".join(names[:-1]), names[-1]


def _element_text(element: ET.Element) -> str:
    text = (element.text or "").strip()
    return text or element.get("message", "")


def outcomes_from_junit(xml_text: str, nodeids: Iterable[str]) -> dict[str, Outcome]:
    """Each test id's outcome in a JUnit XML report of pytest's.

    A test may appear in several <testcase> elements (pytest opens a second one for an error in
    teardown after a failure): any <failure> or <error> makes it failed, with every such text;
    otherwise a <skipped> makes it skipped, or xfailed when its type is pytest.xfail; otherwise
    it passed. A test id the report does not hold at all failed (the VM never ran it).
    """
    root = ET.fromstring(xml_text)
    cases: dict[tuple[str, str], list[ET.Element]] = {}
    for case in root.iter("testcase"):
        cases.setdefault((case.get("classname", ""), case.get("name", "")), []).append(case)
    result: dict[str, Outcome] = {}
    for nodeid in nodeids:
        found = cases.get(junit_key(nodeid))
        if not found:
            result[nodeid] = Outcome("failed", "the udmabuf VM's JUnit report has no result "
                                     "for this test: it was not collected or not run there")
            continue
        seconds = sum(float(case.get("time", "0") or 0) for case in found)
        children = [child for case in found for child in case]
        failures = [_element_text(c) for c in children if c.tag in ("failure", "error")]
        skips = [c for c in children if c.tag == "skipped"]
        if failures:
            result[nodeid] = Outcome("failed", "\n\n".join(failures), seconds)
        elif skips:
            kind: Kind = "xfailed" if skips[0].get("type") == "pytest.xfail" else "skipped"
            reason = skips[0].get("message", "") or _element_text(skips[0])
            result[nodeid] = Outcome(kind, reason, seconds)
        else:
            result[nodeid] = Outcome("passed", "", seconds)
    return result


@dataclass
class VmRun:
    """The one VM run of a session: each test's outcome, or why there are none."""

    outcomes: dict[str, Outcome] = field(default_factory=dict)
    error: str = ""
    seconds: float = 0.0
    returncode: int | None = None
    workdir: Path | None = None
    # From the VM's console: when its init started the command, and when the command ended
    # (seconds since the kernel started).
    ready_s: float | None = None
    done_s: float | None = None

    console_tail: str = ""

    def summary(self) -> str:
        """What the run cost, and how it ended; for the terminal summary."""
        passed = sum(o.kind == "passed" for o in self.outcomes.values())
        times = [f"run exit {self.returncode}"]
        if self.ready_s is not None:
            times.insert(0, f"the tests' command started {self.ready_s:g} s after the kernel")
        if self.done_s is not None:
            times.insert(1, f"ended at {self.done_s:g} s")
        text = (f"one boot ran {len(self.outcomes)} test(s), {passed} passed, in "
                f"{self.seconds:.1f} s in all ({', '.join(times)})")
        slowest = sorted(self.outcomes.items(), key=lambda kv: kv[1].seconds, reverse=True)
        for nodeid, outcome in slowest[:SLOWEST]:
            text += f"\n  {outcome.seconds:6.1f} s  {nodeid}"
        if self.error:
            text += f"\n{self.error}"
        if self.console_tail:
            text += f"\nthe end of the VM's console:\n{self.console_tail}"
        return text


READY_LINE = re.compile(r"^UDMABUF-VM-READY after ([\d.]+) s", re.MULTILINE)
DONE_LINE = re.compile(r"^UDMABUF-VM-DONE status \d+ after ([\d.]+) s", re.MULTILINE)


def _tail(text: str) -> str:
    return text if len(text) <= CONSOLE_TAIL else f"[...]\n{text[-CONSOLE_TAIL:]}"


def _provision(config: pytest.Config) -> str:
    """Provision the VM (and the QEMU test bed), its progress shown live; the reason in one
    line if that failed, else ""."""
    from ..qemu.testbed import provision  # noqa: PLC0415  (only hosts without udmabuf need it)

    try:
        provision(VM_CONFIGS / "provision", config)
    except pytest.fail.Exception as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        why = next((line.removeprefix("error: ") for line in reversed(lines)
                    if line.startswith("error: ")), lines[-1] if lines else "?")
        return f"qemu-configs/udmabuf/provision failed: {why}"
    return ""


def run_in_vm(config: pytest.Config, nodeids: list[str], workdir: Path) -> VmRun:
    """Boot the udmabuf VM once and run `nodeids` there with pytest; their outcomes."""
    t0 = time.monotonic()
    run_script = os.environ.get(RUN_ENV)
    if not run_script:
        run_script = str(VM_CONFIGS / "run")
        if error := _provision(config):
            return VmRun(error=error, seconds=time.monotonic() - t0)
    argv = [run_script, "--no-provision", "--workdir", str(workdir),
            "--timeout", f"{VM_TIMEOUT:g}", "--",
            sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-m", MARKER,
            f"--junitxml={VM_OUT}/{JUNIT}", *nodeids]
    console = workdir / "console.log"
    with console.open("wb") as out:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out,
                              stderr=subprocess.STDOUT, check=False,
                              timeout=VM_TIMEOUT + 60, start_new_session=True)
    run = VmRun(seconds=time.monotonic() - t0, returncode=proc.returncode, workdir=workdir)
    junit = workdir / JUNIT
    text = console.read_text(errors="replace")
    if ready := READY_LINE.search(text):
        run.ready_s = float(ready.group(1))
    if done := DONE_LINE.search(text):
        run.done_s = float(done.group(1))
    if not junit.exists():
        run.error = (f"the udmabuf VM wrote no JUnit report (qemu-configs/udmabuf/run exit "
                     f"{proc.returncode} after {run.seconds:.0f} s; console: {console})")
        run.console_tail = _tail(text)
        return run
    try:
        run.outcomes = outcomes_from_junit(junit.read_text(), nodeids)
    except ET.ParseError as exc:
        run.error = f"the udmabuf VM's JUnit report {junit} does not parse: {exc}"
    return run


class VmItem(pytest.Item):
    """A udmabuf test's stand-in on a host without udmabuf: it reports what the same test id
    did in the VM. It has the test's id and location but neither its fixtures nor its marks'
    skip conditions: those are evaluated in the VM, where the test really runs."""

    def __init__(self, *, location: tuple[str | os.PathLike[str], int | None, str],
                 **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._location = location
        self.add_marker(MARKER)
        self.add_marker("qemu")

    def reportinfo(self) -> tuple[str | os.PathLike[str], int | None, str]:
        return self._location

    def runtest(self) -> None:
        run = vm_run(self.session)
        if run.error:
            # One line; the end of the console is in the terminal summary, once.
            pytest.fail(run.error, pytrace=False)
        outcome = run.outcomes.get(self.nodeid) or Outcome("failed", "not run in the VM")
        if outcome.kind == "skipped":
            # Reported at the test's own location (as a skip mark is), not this line.
            raise pytest.skip.Exception(outcome.text, _use_item_location=True)
        elif outcome.kind == "xfailed":
            pytest.xfail(outcome.text)
        elif outcome.kind == "failed":
            pytest.fail(f"in the udmabuf VM (its console: {run.workdir}/console.log):\n"
                        f"{outcome.text}", pytrace=False)


RUN_KEY = pytest.StashKey[VmRun]()
WORKDIR_KEY = pytest.StashKey[Path]()


def stand_in(item: pytest.Item) -> VmItem:
    """`item`'s VmItem: the same test id, hung off the session so that no module or class
    fixture and no inherited mark of the original applies to it."""
    path, lineno, domain = item.reportinfo()
    return VmItem.from_parent(item.session, name=item.name, nodeid=item.nodeid,
                              location=(path, lineno, domain))


def vm_run(session: pytest.Session) -> VmRun:
    """The session's VM run, made by the first stand-in that asks for it."""
    stash = session.config.stash
    if RUN_KEY not in stash:
        nodeids = [item.nodeid for item in session.items if isinstance(item, VmItem)]
        stash[RUN_KEY] = run_in_vm(session.config, nodeids, stash[WORKDIR_KEY])
    return stash[RUN_KEY]
