"""`devmodel run` as a toolstack launches it: options, config file, exit statuses, readiness,
logs, pidfile. (Stop signals: test_cli_signals.py; the control socket: test_control_*.py.)"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from devmodel.control.client import ControlClient
from tests.integration.launching import devmodel_argv, launched, run_briefly
from tests.libvfio_user import available as libvfio_user_available

# ---------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize(
    "args",
    [
        ["--aperture-size", "3M"],
        ["--granule", "8K"],
        ["--domid", "abc"],
        ["--page-in-timeout", "9"],
        ["--lender-ping-timeout", "0"],
        ["--lender-write-timeout", "90"],
        ["--failure-policy", "sometimes"],
        ["--log-format", "xml"],
        ["--metrics-listen", "10.1.2.3:9000"],
        ["--bogus-option"],
        ["--config", "/nonexistent/devmodel.toml"],
        ["--transport", "xen"],
    ],
)
def test_bad_options_exit_2_with_exactly_one_line(tmp_path: Path, args: list[str]) -> None:
    done = run_briefly("run", "--socket-path", str(tmp_path / "x.sock"), *args)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("devmodel run: error:")
    assert not (tmp_path / "x.sock").exists()


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('aperture-size = "3M"\n', "aperture-size: aperture size must be a power of two"),
        ("apperture-size = 1\n", "did you mean 'aperture-size'"),
        ("domid = = 3\n", "not valid TOML"),
        ('failure-policy = "maybe"\n', "failure-policy: must be one of"),
        ("lender-ping-timeout = -2\n", "lender-ping-timeout: lender link timeouts must be above 0"),
    ],
)
def test_bad_config_files_exit_2_with_one_line(tmp_path: Path, text: str, words: str) -> None:
    config = tmp_path / "dm.toml"
    config.write_text(f'socket-path = "{tmp_path / "x.sock"}"\n' + text)
    done = run_briefly("run", "--config", str(config))
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert words in line and str(config) in line


def test_no_command_is_a_usage_error() -> None:
    done = run_briefly()
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("where", [["--print-capabilities"], ["run", "--print-capabilities"]])
def test_print_capabilities(where: list[str]) -> None:
    done = run_briefly(*where)
    assert done.returncode == 0, done.stderr
    caps = json.loads(done.stdout)
    assert caps["transports"]["vfio-user"]["available"] is True
    assert "xen" in caps["transports"]
    lvu = caps["transports"]["libvfio-user"]
    assert lvu["available"] is (libvfio_user_available() == "")
    assert lvu["options"] == ["socket-path"] and lvu["max_aperture_size"] == 2 << 30
    assert {"control-socket", "sd-notify", "ready-fd", "pidfile"} <= set(caps["features"])
    names = {o["name"] for o in caps["options"]}
    assert {"domid", "socket-path", "fd", "lender-socket", "control-socket", "pidfile"} <= names
    assert caps["limits"]["timeout_max_seconds"] == 4.5
    assert "query-status" in caps["control"]["commands"]
    assert "LEASE_GRANTED" in caps["control"]["events"]
    leases = caps["leases"]
    assert leases["fd_kinds"] == ["memfd", "dma-buf"] and "dmabuf-grants" in leases["features"]
    assert leases["dmabuf_exporters"] == ["udmabuf"]


# ---------------------------------------------------------------------------- start failures


def test_start_failures_exit_1_with_one_line(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    cases = [
        (["--control-socket", str(shared / "c.sock")], "accessible to group or others"),
        (["--transport", "xen"], "cannot open Xen's interfaces for domain 5"),
        (["--metrics-listen", f"127.0.0.1:{port}"], "cannot serve metrics"),
        (["--ready-fd", "97"], "--ready-fd 97: not an open file descriptor"),
    ]
    for args, words in cases:
        sock_args = [] if "--transport" in args else ["--socket-path", str(tmp_path / "x.sock")]
        done = run_briefly("run", *sock_args, "--domid", "5", *args)
        assert done.returncode == 1, (args, done.stderr)
        [line] = done.stderr.strip().splitlines()
        assert words in line and "dom5" in line and "cannot start" in line
        assert not (tmp_path / "x.sock").exists()
        assert not (shared / "c.sock").exists()
    busy.close()


def test_a_second_instance_with_the_same_pidfile_exits_1(tmp_path: Path) -> None:
    with launched(tmp_path) as dm:
        assert Path(dm.pidfile).read_text() == f"{dm.proc.pid}\n"
        done = run_briefly(
            "run", "--socket-path", str(tmp_path / "other.sock"), "--pidfile", dm.pidfile
        )
        assert done.returncode == 1
        assert f"locked by a running instance (pid {dm.proc.pid})" in done.stderr
        assert not (tmp_path / "other.sock").exists()
        assert Path(dm.pidfile).exists()  # untouched
        assert dm.stop() == 0
    assert not Path(dm.pidfile).exists()


def test_a_stale_pidfile_is_reused(tmp_path: Path) -> None:
    (tmp_path / "dm.pid").write_text("999999\n")
    with launched(tmp_path) as dm:
        assert Path(dm.pidfile).read_text() == f"{dm.proc.pid}\n"
        assert dm.stop() == 0


# ---------------------------------------------------------------------------- config file


def test_config_file_with_command_line_overrides(tmp_path: Path) -> None:
    config = tmp_path / "guest.toml"
    config.write_text('domid = 12\naperture-size = "32M"\nfailure-policy = "zeros"\n')
    with launched(tmp_path, "--config", str(config), "--aperture-size", "64M") as dm:
        with dm.control() as ctl:
            answer = ctl.execute("query-config")
        assert isinstance(answer, dict)
        settings, sources = answer["settings"], answer["sources"]
        assert settings["domid"] == 12 and sources["domid"] == str(config)
        assert settings["aperture-size"] == 64 << 20 and sources["aperture-size"] == "command line"
        assert settings["failure-policy"] == "zeros"
        assert answer["config-file"] == str(config)
        assert dm.stop() == 0
    assert " dom12 " in dm.stderr()


def test_lender_link_timeouts_from_the_file_and_the_command_line_reach_the_running_link(
    tmp_path: Path,
) -> None:
    """No lender listens there: the link keeps retrying, which changes nothing here."""
    config = tmp_path / "guest.toml"
    lender = tmp_path / "no-lender.sock"
    config.write_text(f'lender-socket = "{lender}"\nlender-ping-timeout = 30\n')
    argv = ("--config", str(config), "--lender-write-timeout", "7.5")
    with launched(tmp_path, *argv) as dm:
        with dm.control() as ctl:
            status = ctl.execute("query-status")
            answer = ctl.execute("query-config")
        assert isinstance(status, dict) and isinstance(answer, dict)
        link = status["lender"]
        assert isinstance(link, dict) and link["socket"] == str(lender)
        assert link["timeouts"] == {"hello": 2.0, "ping": 30.0, "ping_interval": 5.0, "write": 7.5}
        settings, sources = answer["settings"], answer["sources"]
        assert settings["lender-ping-timeout"] == 30.0
        assert sources["lender-ping-timeout"] == str(config)
        assert settings["lender-write-timeout"] == 7.5
        assert sources["lender-write-timeout"] == "command line"
        assert dm.stop() == 0


# ---------------------------------------------------------------------------- readiness


@pytest.mark.parametrize("abstract", [False, True])
def test_sd_notify_ready_once_the_sockets_serve(tmp_path: Path, abstract: bool) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"devmodel-test-{os.getpid()}-{time.monotonic_ns()}"
        notify.bind("\0" + name)
        address = "@" + name
    else:
        address = str(tmp_path / "notify")
        notify.bind(address)
    notify.settimeout(20)
    with notify, launched(tmp_path, env={"NOTIFY_SOCKET": address}) as dm:
        message = notify.recv(4096).decode()
        fields = dict(line.split("=", 1) for line in message.splitlines())
        assert fields["READY"] == "1" and fields["MAINPID"] == str(dm.proc.pid)
        # Ready means serving: both sockets accept now.
        for path in (dm.socket_path, dm.control_path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.connect(path)
            probe.close()
        dm.proc.send_signal(signal.SIGTERM)
        assert notify.recv(4096) == b"STOPPING=1"
        assert dm.proc.wait(15) == 0


def test_ready_fd_is_written_then_closed(tmp_path: Path) -> None:
    # launch() itself waits on --ready-fd; here: the write end is closed after READY=1.
    # The close follows the write, so the reader may see READY=1 a moment before it: poll.
    with launched(tmp_path) as dm:
        deadline = time.monotonic() + 5.0
        while True:
            pipes = set()
            for fd in os.listdir(f"/proc/{dm.proc.pid}/fd"):
                with contextlib.suppress(FileNotFoundError):
                    target = os.readlink(f"/proc/{dm.proc.pid}/fd/{fd}")
                    if target.startswith("pipe:"):
                        pipes.add(target)
            if not pipes or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert not pipes, f"--ready-fd still open 5 s after READY=1: {pipes}"
        assert dm.stop() == 0


# ---------------------------------------------------------------------------- logs


def test_text_logs_carry_the_guest_id_on_every_line(tmp_path: Path) -> None:
    with launched(tmp_path, "--domid", "42", "--log-level", "debug") as dm:
        assert dm.stop() == 0
    lines = dm.stderr().strip().splitlines()
    assert len(lines) >= 2
    assert all(f"devmodel[{dm.proc.pid}] dom42 " in line for line in lines), lines
    assert "stopped; counters: {" in lines[-1]


def test_json_logs_are_one_object_per_line(tmp_path: Path) -> None:
    with launched(tmp_path, "--domid", "3", "--log-format", "json") as dm:
        assert dm.stop(signal.SIGHUP) == 0
    records = [json.loads(line) for line in dm.stderr().strip().splitlines()]
    assert records and all(r["domid"] == 3 and r["pid"] == dm.proc.pid for r in records)
    assert {"time", "level", "logger", "message"} <= set(records[0])
    assert records[-1]["message"].startswith("stopped; counters: ")


def test_fd_inherited_listener_with_control(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = str(tmp_path / "inherited.sock")
    listener.bind(path)
    listener.listen(1)
    fd = listener.fileno()
    ctl = str(tmp_path / "c" / "control.sock")
    proc = subprocess.Popen(
        devmodel_argv("run", "--fd", str(fd), "--control-socket", ctl),
        pass_fds=(fd,),
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(ctl) and time.monotonic() < deadline:
            time.sleep(0.02)
        with ControlClient(ctl) as client:
            status = client.execute("query-status")
            assert isinstance(status, dict) and status["socket"] == f"fd {fd}"
            client.execute("quit")
        assert proc.wait(15) == 0
        assert os.path.exists(path)  # not ours to remove
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
        listener.close()
