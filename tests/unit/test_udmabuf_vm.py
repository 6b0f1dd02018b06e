"""The udmabuf tests' plumbing on a host without udmabuf (tests/udmabuf/vm.py): JUnit test
addresses, a JUnit report read back into outcomes, and stand-ins that report those outcomes
under the original test ids from a single VM run (a fake one here: no boot)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.udmabuf.vm import RUN_ENV, VIA_VM_ENV, junit_key, outcomes_from_junit

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def test_junit_key_of_functions_classes_and_parameters() -> None:
    assert junit_key("tests/udmabuf/test_kernel.py::test_a") == (
        "tests.udmabuf.test_kernel", "test_a")
    assert junit_key("tests/x/test_y.py::TestZ::test_w[a/b::c-1.5]") == (
        "tests.x.test_y.TestZ", "test_w[a/b::c-1.5]")


SAMPLE = '''
import pytest

def test_pass():
    pass

def test_fail():
    assert 1 + 1 == 3, "arithmetic"

def test_skip():
    pytest.skip("no widget here")

@pytest.mark.xfail(reason="known gap", strict=True)
def test_xfail():
    assert False

@pytest.fixture
def broken():
    raise RuntimeError("setup broke")

def test_setup_error(broken):
    pass

@pytest.fixture
def bad_teardown():
    yield
    raise RuntimeError("teardown broke")

def test_fail_and_teardown_error(bad_teardown):
    assert False, "call failed"

def test_pass_and_teardown_error(bad_teardown):
    pass

class TestGroup:
    @pytest.mark.parametrize("n", [1, 2], ids=["one", "a::b.c"])
    def test_param(self, n):
        assert n == 1
'''


def test_outcomes_read_back_from_pytests_own_junit_report(tmp_path: Path) -> None:
    """A report pytest itself wrote for every kind of outcome maps back to each test id."""
    pkg = tmp_path / "sub"
    pkg.mkdir()
    (pkg / "test_sample.py").write_text(SAMPLE)
    junit = tmp_path / "junit.xml"
    subprocess.run([PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:trio",
                    f"--junitxml={junit}", "sub/test_sample.py"],
                   cwd=tmp_path, check=False, capture_output=True)
    base = "sub/test_sample.py::"
    ids = [base + name for name in (
        "test_pass", "test_fail", "test_skip", "test_xfail", "test_setup_error",
        "test_fail_and_teardown_error", "test_pass_and_teardown_error",
        "TestGroup::test_param[one]", "TestGroup::test_param[a::b.c]", "test_never_run")]
    got = outcomes_from_junit(junit.read_text(), ids)
    kinds = {nodeid.removeprefix(base): outcome.kind for nodeid, outcome in got.items()}
    assert kinds == {
        "test_pass": "passed", "test_fail": "failed", "test_skip": "skipped",
        "test_xfail": "xfailed", "test_setup_error": "failed",
        "test_fail_and_teardown_error": "failed", "test_pass_and_teardown_error": "failed",
        "TestGroup::test_param[one]": "passed", "TestGroup::test_param[a::b.c]": "failed",
        "test_never_run": "failed",
    }
    assert "arithmetic" in got[base + "test_fail"].text
    assert got[base + "test_skip"].kind == "skipped"
    assert got[base + "test_skip"].text == "no widget here"
    assert all(outcome.seconds >= 0 for outcome in got.values())
    assert got[base + "test_xfail"].text == "known gap"
    assert "setup broke" in got[base + "test_setup_error"].text
    both = got[base + "test_fail_and_teardown_error"].text
    assert "call failed" in both and "teardown broke" in both
    assert "teardown broke" in got[base + "test_pass_and_teardown_error"].text
    assert "assert 2 == 1" in got[base + "TestGroup::test_param[a::b.c]"].text
    assert "no result" in got[base + "test_never_run"].text


FAKE_RUN = '''#!/bin/sh
# A fake qemu-configs/udmabuf/run: records its arguments and writes a JUnit report in which
# the first udmabuf test fails, the second is skipped and every other one passes.
workdir=$3
shift 6
echo "$*" >>"$FAKE_RUN_LOG"
n=0
{
    echo '<testsuites><testsuite>'
    for arg in "$@"; do
        case $arg in tests/*) ;; *) continue ;; esac
        path=${arg%%::*}; name=${arg#*::}
        class=$(echo "${path%.py}" | tr / .)
        n=$((n + 1))
        echo "<testcase classname='$class' name='$name'>"
        case $n in
            1) echo "<failure message='m'>the VM says no</failure>" ;;
            2) echo "<skipped type='pytest.skip' message='not today'/>" ;;
        esac
        echo "</testcase>"
    done
    echo '</testsuite></testsuites>'
} >"$workdir/junit.xml"
echo "UDMABUF-VM-READY after 1.5 s"
echo "UDMABUF-VM-DONE status 1 after 2.5 s"
exit 1
'''


def test_stand_ins_report_one_vm_runs_outcomes_under_the_test_ids(tmp_path: Path) -> None:
    """`pytest -m udmabuf` on the real udmabuf tests, with a fake VM: one run for all of them,
    their outcomes reported as the VM's report has them, under the original ids."""
    fake = tmp_path / "fake-run"
    fake.write_text(FAKE_RUN)
    fake.chmod(0o755)
    log = tmp_path / "runs.log"
    # TMPDIR: the run directory a failed VM run leaves behind goes with tmp_path.
    env = {**os.environ, RUN_ENV: str(fake), VIA_VM_ENV: "1", "FAKE_RUN_LOG": str(log),
           "TMPDIR": str(tmp_path)}
    env.pop("DEVMODEL_UDMABUF_VM", None)
    proc = subprocess.run(
        [PYTHON, "-m", "pytest", "-p", "no:cacheprovider", "-m", "udmabuf", "-rA",
         "tests/udmabuf/test_kernel.py"],
        cwd=REPO, env=env, check=False, capture_output=True, text=True)
    out = proc.stdout
    runs = log.read_text().splitlines()
    assert len(runs) == 1, runs
    ids = [arg for arg in runs[0].split() if arg.startswith("tests/")]
    assert len(ids) > 5
    assert ids[0] == "tests/udmabuf/test_kernel.py::test_ioctl_numbers_are_the_kernel_headers"
    assert "-m udmabuf --junitxml=/run/out/junit.xml" in runs[0]
    assert proc.returncode == 1, out
    assert f"FAILED {ids[0]}" in out
    assert "the VM says no" in out
    assert f"SKIPPED [1] {ids[1].split('::')[0]}:" in out and "not today" in out
    for nodeid in ids[2:]:
        assert f"PASSED {nodeid}" in out
    assert f"1 failed, {len(ids) - 2} passed, 1 skipped" in out
    assert "one boot ran" in out


def test_a_plain_run_sends_them_to_the_vm_and_not_qemu_leaves_them_out(tmp_path: Path) -> None:
    """Without -m the udmabuf tests still go to the (fake) VM; `-m "not qemu"`, the run
    without guest boots, selects none of them."""
    fake = tmp_path / "fake-run"
    fake.write_text(FAKE_RUN)
    fake.chmod(0o755)
    log = tmp_path / "runs.log"
    env = {**os.environ, RUN_ENV: str(fake), VIA_VM_ENV: "1", "FAKE_RUN_LOG": str(log),
           "TMPDIR": str(tmp_path)}
    env.pop("DEVMODEL_UDMABUF_VM", None)
    base = [PYTHON, "-m", "pytest", "-p", "no:cacheprovider", "tests/udmabuf"]
    plain = subprocess.run(base, cwd=REPO, env=env, check=False, capture_output=True, text=True)
    assert len(log.read_text().splitlines()) == 1, plain.stdout
    assert "1 failed" in plain.stdout and "1 skipped" in plain.stdout, plain.stdout
    log.unlink()
    no_qemu = subprocess.run([*base, "-m", "not qemu"], cwd=REPO, env=env, check=False,
                             capture_output=True, text=True)
    assert no_qemu.returncode == 5, no_qemu.stdout
    assert "deselected" in no_qemu.stdout
    assert not log.exists()


def _udmabuf_run_script() -> Any:
    """qemu-configs/udmabuf/run, a script without a .py suffix, as a module."""
    path = REPO / "qemu-configs" / "udmabuf" / "run"
    loader = importlib.machinery.SourceFileLoader("udmabuf_run", str(path))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("console", "status", "expected"),
    [
        # The kernel died before /init: no status, booted again by main().
        ("echo 'Kernel panic - not syncing: Fatal exception in interrupt'", None, (125, True)),
        # It reached /init and then died: no status, never booted again.
        ("echo 'udmabuf VM: /init started'; echo 'Kernel panic - not syncing'", None,
         (125, False)),
        # The command ran and reported.
        ("echo 'udmabuf VM: /init started'", "3", (3, False)),
    ],
)
def test_udmabuf_run_tells_a_kernel_that_died_before_init(
    tmp_path: Path, console: str, status: str | None, expected: tuple[int, bool]
) -> None:
    """`run` as the VM's console shows it, with a shell standing in for QEMU."""
    run = _udmabuf_run_script()
    status_path = tmp_path / "status"
    fake = console + (f"; echo {status} > {status_path}" if status else "")
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        got = run.run(["sh", "-c", fake], dict(os.environ), 30.0, status_path)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert got == expected
