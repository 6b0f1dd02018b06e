"""One benchmark run: every figure issue 12 sets a target for, against its peer, in one table.

Run it as `bench/run` (which picks the project's .venv). In one run, with the measurements
interleaved in rounds (round-robin over the peers) so that machine noise hits them all alike,
and with servers pinned to one CPU and clients to another where the machine has two:

1. trapped 8-byte REGION_READs of BAR0 from a C client (bench/vfio_user_client.c) against a C
   server that answers without doing anything (bench/echo_server.c, the floor), libvfio-user's
   samples/server (scripts/build-libvfio-user) and `devmodel run` with polling off and on;
2. the device model's own time per trapped read, in process (bench_vfio_user.py);
3. the lease path with an independent lender process (bench_leases.py; the lender is
   bench/lean_lender.py, blocking calls and no event loop, so that its own share is small and
   shown: the lender's own part of a fault has its row): a fault next to a resident read,
   PING -> PONG next to the vfio-user round trip, REVOKE -> REVOKED idle and under a client's
   load, the PAGE_INs of 64 concurrent faults on one window;
4. `devmodel run`'s start-up time (exec to --ready-fd), idle RSS and idle CPU, with its
   bytecode compiled as an installed devmodel has it (`compiled_bytecode`).

Prints one table (figure, median, p99, ratio to its peer, target, pass/MISS) and writes JSON
(--json; default ~/.cache/devmodel/bench/run-<time>.json) that a later run compares itself
with: `bench/run --compare OLD.json` adds the ratio new/old per row. Each latency row keeps
its distribution (`cdf`, quantiles), from which bench_plots.py draws PNG plots next to the JSON
(--plots DIR elsewhere, --no-plots none): the trapped read per server, the fault next to a
resident read, the revokes next to PING. Not a test: the machines
here are small and noisy; the smoke test is tests/integration/test_bench_run.py.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import os
import platform
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import bench_leases as bl
import bench_vfio_user as bv
import trio
import xen_table

from devmodel.testing import VfioUserClient

HERE = Path(__file__).resolve().parent
TOP = HERE.parent
CACHE = Path(
    os.environ.get("DEVMODEL_CACHE")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "devmodel"
)
BENCH_CACHE = CACHE / "bench"
LIBVFIO_USER_SERVER = CACHE / "libvfio-user" / "bin" / "server"
SCHEMA = 1
POLL_OPTION = "--poll-max-us"
US = 1e-6
perf = time.perf_counter


# ---------------------------------------------------------------------------- rows


@dataclass
class Row:
    """One line of the table (and of the JSON). Values are in `unit`; None when not measured,
    with `note` saying why."""

    key: str
    figure: str
    unit: str
    median: float | None = None
    p99: float | None = None
    n: int = 0
    peer: str | None = None
    ratio: float | None = None
    target: str = ""
    passed: bool | None = None
    note: str = ""
    # Latency rows: the distribution as [fraction, value] pairs at CDF_FRACTIONS, what
    # bench_plots.py draws (enough for a CDF and its tail; the raw samples would be MBs).
    cdf: list[list[float]] | None = None


# 0 to 0.99 in steps of 0.005, then the tail, then the maximum.
CDF_FRACTIONS = (*(i / 200 for i in range(199)), 0.995, 0.999, 0.9999, 1.0)


def cdf_points(samples: Sequence[float], unit: float = US) -> list[list[float]]:
    """[fraction, value in `unit`] at CDF_FRACTIONS: the sample at index fraction * n, as
    bench_leases.pct picks p99 (1.0 is the maximum)."""
    ordered = sorted(samples)
    n = len(ordered)
    return [[f, round(ordered[min(n - 1, int(n * f))] / unit, 3)] for f in CDF_FRACTIONS]


@dataclass
class Results:
    rows: dict[str, Row] = field(default_factory=dict)

    def add(self, row: Row) -> Row:
        self.rows[row.key] = row
        return row

    def latency(self, key: str, figure: str, samples: Sequence[float]) -> Row:
        """A latency row from samples in seconds (the first tenth dropped as warm-up)."""
        kept = bl.trimmed(list(samples)) if len(samples) >= 10 else list(samples)
        if not kept:
            return self.add(Row(key, figure, "us", note="no samples"))
        row = Row(
            key, figure, "us", statistics.median(kept) / US, bl.pct(kept, 0.99) / US, len(kept)
        )
        row.cdf = cdf_points(kept)
        return self.add(row)

    def missing(self, key: str, figure: str, unit: str, note: str) -> Row:
        return self.add(Row(key, figure, unit, note=note))

    def median(self, key: str) -> float | None:
        row = self.rows.get(key)
        return None if row is None else row.median

    def compare(self, key: str, peer: str) -> Row:
        """Set the row's ratio to its peer (both medians)."""
        row = self.rows[key]
        row.peer = peer
        m, p = row.median, self.median(peer)
        if m is not None and p:
            row.ratio = m / p
        return row


def check_ratio(row: Row, bound: float, peer_name: str) -> None:
    """A target on the row's ratio to its peer: at most `bound` times it."""
    row.target = f"<= {bound:.2f}x {peer_name}"
    if row.ratio is not None:
        row.passed = row.ratio <= bound


def check(row: Row, target: str, ok: Callable[[float], bool | None]) -> None:
    row.target = target
    if row.median is not None:
        row.passed = ok(row.median)


# ---------------------------------------------------------------------------- processes


PINNING = ("split", "same", "none")


def cpu_plan(pin: str = "split") -> tuple[set[int] | None, set[int] | None]:
    """(server CPUs, client CPUs): `split` one each where the machine lets us have two, `same`
    both on one CPU, `none` no pinning."""
    cpus = sorted(os.sched_getaffinity(0))
    if pin == "none":
        return None, None
    if pin == "same" or len(cpus) < 2:
        return {cpus[0]}, {cpus[0]}
    return {cpus[0]}, {cpus[1]}


def build_c(name: str) -> Path:
    """bench/NAME.c compiled into the bench cache, named by a hash of its source (so worktrees
    with different sources never share a binary); compiled again only when that is missing."""
    src = HERE / f"{name}.c"
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
    out = BENCH_CACHE / f"{name}-{digest}"
    if not out.exists():
        BENCH_CACHE.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}")
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(tmp), str(src)], check=True)
        tmp.replace(out)
    return out


def libvfio_user_server(build: bool) -> tuple[Path | None, str]:
    """The sample server, built if missing and allowed; (None, why) when there is none."""
    if LIBVFIO_USER_SERVER.exists() and os.access(LIBVFIO_USER_SERVER, os.X_OK):
        # The script is a no-op on a complete cache; it also checks the cache's recipe.
        if not build:
            return LIBVFIO_USER_SERVER, ""
    elif not build:
        return None, "not built: --no-build and no cached build"
    t0 = perf()
    done = subprocess.run(
        [str(TOP / "scripts" / "build-libvfio-user"), "--print-server"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        why = lines[-1] if lines else f"exit status {done.returncode}"
        return None, f"not built: {why.removeprefix('error: ')}"
    took = perf() - t0
    if took > 2:
        print(f"built libvfio-user's sample server in {took:.0f} s", file=sys.stderr)
    return Path(done.stdout.strip().splitlines()[-1]), ""


def libvfio_user_transport_missing() -> str:
    """'' when `devmodel run --transport libvfio-user` can run here, else why not."""
    from devmodel.transports import libvfio_user_lib  # noqa: PLC0415

    try:
        libvfio_user_lib.load()
    except libvfio_user_lib.LibVfioUserMissing:
        return "not built: scripts/build-libvfio-user builds libvfio-user.so"
    return ""


def compiled_bytecode() -> str:
    """Measure devmodel as installed: with its modules' bytecode compiled, as pip and distro
    packages leave it. An environment with PYTHONDONTWRITEBYTECODE (this project's development
    machines set it) would otherwise make every `devmodel run` compile devmodel's sources at
    start: ~1.3 MB more idle RSS and a slower start that no installed instance pays. Then the
    bytecode goes to the bench cache (PYTHONPYCACHEPREFIX), not into the source tree. Imports
    what `devmodel run` imports once, so that the measured starts find it compiled; returns a
    note for the table's header."""
    if os.environ.pop("PYTHONDONTWRITEBYTECODE", None) is not None:
        os.environ.setdefault("PYTHONPYCACHEPREFIX", str(BENCH_CACHE / "pycache"))
    subprocess.run(
        [sys.executable, "-c", "import devmodel.__main__, devmodel.cli, devmodel.app"], check=True
    )
    prefix = os.environ.get("PYTHONPYCACHEPREFIX")
    return f"bytecode cached in {prefix}" if prefix else "bytecode cached in __pycache__"


def polling_available() -> bool:
    done = subprocess.run(
        [sys.executable, "-m", "devmodel", "run", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    return POLL_OPTION in done.stdout


def devmodel_argv(sock: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "devmodel",
        "run",
        "--socket-path",
        sock,
        "--log-level",
        "warning",
        *extra,
    ]


def spawn(argv: list[str], cpus: set[int] | None, sock: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv, preexec_fn=bl.pinned(cpus))  # noqa: PLW1509
    try:
        bl.wait_for_path(sock, proc)
    except BaseException:
        bl.stop_process(proc)
        raise
    return proc


@contextlib.contextmanager
def processes() -> Iterator[list[subprocess.Popen[Any]]]:
    procs: list[subprocess.Popen[Any]] = []
    try:
        yield procs
    finally:
        for p in reversed(procs):
            bl.stop_process(p)


def c_client_round(
    client: Path, cpus: set[int] | None, reads: int, chunk: int, sockets: list[str]
) -> list[list[float]]:
    """One run of the C client over `sockets`; per socket its latencies in seconds."""
    done = subprocess.run(
        [str(client), str(reads), str(chunk), *sockets],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
        preexec_fn=bl.pinned(cpus),
    )
    if done.returncode != 0:
        raise bl.BenchFailed(f"the C client failed: {done.stderr.strip()}")
    lines = done.stdout.splitlines()
    if len(lines) != len(sockets):
        raise bl.BenchFailed(f"the C client printed {len(lines)} lines for {len(sockets)} servers")
    return [[int(v) * 1e-9 for v in line.split()] for line in lines]


POSTED_BURST = 200
"""Posted writes per timed burst (QEMU queues a guest's posted stores back to back like this)."""


def posted_round(sockets: dict[str, str], bursts: int) -> dict[str, list[float]]:
    """Per server, seconds per posted write: `bursts` bursts of POSTED_BURST posted 8-byte BAR0
    writes (NO_REPLY, as a guest's stores are) sent at once and ended by one read, whose reply
    says that every write before it was served, as bartest's timing loop ends its writes.
    Servers are interleaved burst by burst, so that machine noise hits them alike."""
    clients = {name: bl.RawClient(path) for name, path in sockets.items()}
    times: dict[str, list[float]] = {name: [] for name in sockets}
    try:
        for _ in range(bursts):
            for name, c in clients.items():
                stream = b"".join(
                    bl.posted_write_request(c.msg_id + 1 + i, (i * 8) % 4096, b"posted!!")
                    for i in range(POSTED_BURST)
                )
                c.msg_id += POSTED_BURST
                t0 = perf()
                c.sock.sendall(stream)
                c.read(0)
                times[name].append((perf() - t0) / POSTED_BURST)
    finally:
        for c in clients.values():
            c.close()
    return times


def time_to_ready(tmp: Path, cpus: set[int] | None, i: int) -> float:
    """Seconds from starting `devmodel run` (fork + exec) to READY=1 on its --ready-fd."""
    sock = str(tmp / f"start{i}.sock")
    r, w = os.pipe()
    try:
        t0 = perf()
        proc = subprocess.Popen(
            devmodel_argv(sock, "--ready-fd", str(w)),
            pass_fds=(w,),
            preexec_fn=bl.pinned(cpus),  # noqa: PLW1509
        )
        os.close(w)
        w = -1
        got = b""
        try:
            while not got.endswith(b"\n"):
                ready, _, _ = select.select([r], [], [], 20)
                chunk = os.read(r, 64) if ready else b""
                if not chunk:
                    raise bl.BenchFailed("devmodel run never wrote READY=1 to its --ready-fd")
                got += chunk
            took = perf() - t0
        finally:
            bl.stop_process(proc)
        if got.strip() != b"READY=1":
            raise bl.BenchFailed(f"--ready-fd got {got!r}")
        return took
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / os.sysconf("SC_CLK_TCK")


def vm_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e6  # kB (KiB) to MB
    raise bl.BenchFailed(f"no VmRSS for pid {pid}")


# ---------------------------------------------------------------------------- the run


@dataclass
class Plan:
    rounds: int
    reads: int  # trapped reads per server, all rounds together
    chunk: int
    own_reads: int
    repeat: int  # lease samples per figure, all rounds together
    starts: int  # start-up measurements per round
    idle: float  # seconds of idle CPU measurement
    coalesce_rounds: int
    poll_us: int


def run(
    args: argparse.Namespace,
    plan: Plan,
    server_cpus: set[int] | None,
    client_cpus: set[int] | None,
) -> Results:
    res = Results()
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    client = build_c("vfio_user_client")
    echo = build_c("echo_server")
    lvu, lvu_note = libvfio_user_server(build=not args.no_build)
    polling = polling_available()
    tmp = Path(tempfile.mkdtemp(prefix="devmodel-bench-run-"))
    per_round = max(1, plan.reads // plan.rounds)
    lease_round = max(2, plan.repeat // plan.rounds)
    trapped: dict[str, list[float]] = {"floor": [], "lvu": [], "off": [], "on": [], "dm_lvu": []}
    posted: dict[str, list[float]] = {"dm": [], "dm_lvu": []}
    bursts = max(2, per_round // 200)
    # The libvfio-user transport of devmodel itself: (None, why) when its library is missing.
    dm_lvu_note = libvfio_user_transport_missing()
    own: list[float] = []
    lease: dict[str, list[float]] = collections.defaultdict(list)  # bl.lease_round's figures
    loads: dict[str, list[float]] = {load: [] for load in bl.LEASE_LOADS}
    ready: list[float] = []
    try:
        with processes() as procs:
            floor_sock, off_sock, on_sock = (str(tmp / n) for n in ("echo", "off", "on"))
            procs.append(spawn([str(echo), floor_sock], server_cpus, floor_sock))
            dm_off = spawn(devmodel_argv(off_sock), server_cpus, off_sock)
            procs.append(dm_off)
            dm_lvu_sock = str(tmp / "dm-lvu")
            if not dm_lvu_note:
                procs.append(
                    spawn(
                        devmodel_argv(dm_lvu_sock, "--transport", "libvfio-user"),
                        server_cpus,
                        dm_lvu_sock,
                    )
                )
            dm_on = None
            if polling:
                dm_on = spawn(
                    devmodel_argv(on_sock, POLL_OPTION, str(plan.poll_us)), server_cpus, on_sock
                )
                procs.append(dm_on)
            lvu_tmp = tmp / "lvu-e2e"
            lvu_tmp.mkdir()
            with (
                bl.EndToEnd(tmp, server_cpus=server_cpus, client_cpus=client_cpus) as e2e,
                contextlib.ExitStack() as lvu_stack,
            ):
                e2e_lvu = None
                if not dm_lvu_note:
                    e2e_lvu = lvu_stack.enter_context(
                        bl.EndToEnd(
                            lvu_tmp,
                            server_cpus=server_cpus,
                            client_cpus=client_cpus,
                            extra=("--transport", "libvfio-user"),
                        )
                    )
                for r in range(plan.rounds):
                    print(f"round {r + 1}/{plan.rounds}", file=sys.stderr)
                    # 1. trapped reads, the C client round-robin over every server there is.
                    names = ["floor", "off"]
                    socks = [f"raw:{floor_sock}", off_sock]
                    lvu_proc = None
                    if lvu is not None:
                        lvu_sock = str(tmp / f"lvu{r}")
                        try:
                            lvu_proc = spawn([str(lvu), lvu_sock], server_cpus, lvu_sock)
                        except bl.BenchFailed as exc:  # measure the others all the same
                            lvu, lvu_note = None, f"did not start: {exc}"
                        else:
                            names.append("lvu")
                            socks.append(lvu_sock)
                    if dm_on is not None:
                        names.append("on")
                        socks.append(on_sock)
                    if not dm_lvu_note:
                        names.append("dm_lvu")
                        socks.append(dm_lvu_sock)
                    try:
                        got = c_client_round(client, client_cpus, per_round, plan.chunk, socks)
                    finally:
                        if lvu_proc is not None:
                            bl.stop_process(lvu_proc)
                    for name, samples in zip(names, got, strict=True):
                        trapped[name] += samples
                    # ... and streamed posted writes, native against the libvfio-user transport.
                    posted_socks = {"dm": off_sock}
                    if not dm_lvu_note:
                        posted_socks["dm_lvu"] = dm_lvu_sock
                    for name, samples in posted_round(posted_socks, bursts).items():
                        posted[name] += samples
                    # 2. the device model's own time, in this process.
                    own += bv.device_model_own_times(max(1000, plan.own_reads // plan.rounds))
                    # 3. the lease path.
                    rates = bl.lease_round(e2e, lease_round, lease)
                    lease["lender_own"] += e2e.lender.ask("own")["grant"]
                    for load, rate in rates.items():
                        loads[load].append(rate)
                    # ... and its fault and resident read over the libvfio-user transport.
                    if e2e_lvu is not None:
                        if e2e_lvu.client is None:
                            e2e_lvu.client = bl.RawClient(e2e_lvu.dm_sock)
                        fault, resident = bl.measure_e2e_faults(
                            e2e_lvu.client, e2e_lvu.lender, lease_round
                        )
                        lease["lvu_fault"] += fault
                        lease["lvu_resident"] += resident
                    # 4. start-up.
                    for i in range(plan.starts):
                        ready.append(time_to_ready(tmp, server_cpus, r * plan.starts + i))
                stats = e2e.lender.ask("stats")
            counts_engine = trio.run(bl.engine_coalescing, plan.coalesce_rounds, 64)
            link = trio.run(bl.link_coalescing, tmp, plan.coalesce_rounds, 64)
            # ... and against a lender process: how long the slowest of them waited.
            proc = trio.run(bl.process_coalescing, tmp, plan.coalesce_rounds, 64, client_cpus)
            counts_link, wrong = link.counts + proc.counts, link.wrong + proc.wrong
            idle = idle_figures(off_sock, dm_off, on_sock, dm_on, plan.idle)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    # ------------------------------------------------------------------------ the rows
    res.latency("trapped_floor", "trapped read: C do-nothing server (floor)", trapped["floor"])
    if lvu is not None:
        res.latency("trapped_lvu", "trapped read: libvfio-user samples/server", trapped["lvu"])
        res.compare("trapped_lvu", "trapped_floor")
    else:
        res.missing("trapped_lvu", "trapped read: libvfio-user samples/server", "us", lvu_note)
    on_note = "" if polling else f"not available in this build (no {POLL_OPTION})"
    for mode, label in (("off", "polling off"), ("on", f"polling {plan.poll_us} us")):
        for peer, peer_name, bound in (
            ("trapped_lvu", "libvfio-user", 0.75),
            ("trapped_floor", "floor", 2.0),
        ):
            key = f"trapped_dm_{mode}_vs_{'lvu' if peer == 'trapped_lvu' else 'floor'}"
            figure = f"trapped read: devmodel, {label} / {peer_name}"
            if mode == "on" and not polling:
                res.missing(key, figure, "us", on_note)
            else:
                res.latency(key, figure, trapped[mode])
                res.compare(key, peer)
            check_ratio(res.rows[key], bound, peer_name)
    lvu_figure = "trapped read: devmodel, libvfio-user transport / devmodel"
    if dm_lvu_note:
        res.missing("trapped_dm_lvu", lvu_figure, "us", dm_lvu_note)
    else:
        res.latency("trapped_dm_lvu", lvu_figure, trapped["dm_lvu"])
        res.compare("trapped_dm_lvu", "trapped_dm_off_vs_floor")
    res.latency("posted_dm", f"posted write, {POSTED_BURST} streamed: devmodel", posted["dm"])
    posted_figure = "posted write, streamed: libvfio-user transport / vfio-user"
    if dm_lvu_note:
        res.missing("posted_dm_lvu", posted_figure, "us", dm_lvu_note)
    else:
        res.latency("posted_dm_lvu", posted_figure, posted["dm_lvu"])
        res.compare("posted_dm_lvu", "posted_dm")
    own_row = res.latency("own_time", "device model's own time per read (means of 1000)", own)
    res.compare("own_time", "trapped_dm_off_vs_floor")
    check(own_row, "median <= 3 us", lambda m: m <= 3.0)

    # The resident reads and faults alternate in pairs after each evict of the lender's
    # (bench_leases.lease_round): the first of a pair finds devmodel parked, as a PING or a
    # REVOKE does, the second right after the other read. Each figure is checked against the
    # one measured in the same state; all of them together are shown too.
    res.latency("resident", "lease: resident read, vfio-user round trip", lease["resident"])
    res.latency(
        "resident_idle", "lease: resident read, first after the evict", lease["resident_idle"]
    )
    res.rows["resident_idle"].note = "devmodel parked, as a PING finds it"
    res.latency(
        "resident_warm", "lease: resident read, right after a fault", lease["resident_warm"]
    )
    ping = res.latency("ping", "lease: PING -> PONG, devmodel idle", lease["ping"])
    res.compare("ping", "resident_idle")
    ping.target = "<= 1.30x vfio-user RT"
    if ping.ratio is not None:
        ping.passed = ping.ratio <= 1.3
    rt = res.median("ping") or 0.0
    res.latency("fault", "lease: fault (evicted read, instant lender)", lease["fault"])
    res.compare("fault", "resident")
    for state, what in (("idle", "first after the evict"), ("warm", "right after a resident read")):
        row = res.latency(f"fault_{state}", f"lease: fault, {what}", lease[f"fault_{state}"])
        res.compare(f"fault_{state}", f"resident_{state}")
        bound = (res.median(f"resident_{state}") or 0.0) + rt + 20
        if state == "idle":
            check(row, f"<= resident + RT + 20 us = {bound:.0f} us", bound.__ge__)
        else:
            row.note = f"against its resident read + RT + 20 us = {bound:.0f} us"
    # Part of the fault, and of the 20 us: the lender's, not devmodel's (bench/lean_lender.py).
    res.latency("lender_own", "lease: the lender's own part of a fault", lease["lender_own"])
    res.rows["lender_own"].note = "PAGE_IN received -> GRANT sent, in the bench lender"
    for key, figure, peer in (
        ("lvu_resident", "lease: resident read, libvfio-user transport / vfio-user", "resident"),
        ("lvu_fault", "lease: fault, libvfio-user transport / vfio-user", "fault"),
    ):
        if dm_lvu_note:
            res.missing(key, figure, "us", dm_lvu_note)
        else:
            res.latency(key, figure, lease[key])
            res.compare(key, peer)
    idle_bound = rt + 20
    row = res.latency("revoke_idle", "lease: REVOKE -> REVOKED, idle window", lease["revoke"])
    res.compare("revoke_idle", "ping")
    check(row, f"<= RT + 20 us = {idle_bound:.0f} us", lambda m: m <= idle_bound)
    for load, what in (("reads", "reads"), ("posted", "reads + posted writes")):
        rate = statistics.median(loads[load]) if loads[load] else 0.0
        row = res.latency(
            f"revoke_{load}", f"lease: REVOKE -> REVOKED, load: {what}", lease[f"revoke_{load}"]
        )
        row.note = f"{rate:,.0f} accesses/s"
        res.compare(f"revoke_{load}", "ping")
        check(row, f"<= 2 x (RT + 20 us) = {2 * idle_bound:.0f} us", lambda m: m <= 2 * idle_bound)
        res.latency(f"ping_{load}", f"lease: PING -> PONG, load: {what}", lease[f"ping_{load}"])
        res.compare(f"ping_{load}", "ping")
    counts = counts_engine + counts_link
    res.add(
        Row(
            "coalesce",
            "lease: PAGE_INs for 64 concurrent faults",
            "count",
            statistics.median(counts),
            float(max(counts)),
            len(counts),
            target="exactly 1",
            passed=all(c == 1 for c in counts) and not wrong,
            note=f"{wrong} wrong reads" if wrong else "",
        )
    )
    # ... and how long the slowest of them waited, against one fault alone (the same lender
    # process, which answers each PAGE_IN after 5 ms; the engine and its link in this process).
    res.latency("fault_alone", "lease: one fault alone (lender answers in 5 ms)", proc.alone)
    res.latency("fault_64", "lease: 64 concurrent faults, the slowest", proc.slowest)
    res.compare("fault_64", "fault_alone")
    check_ratio(res.rows["fault_64"], 1.10, "one fault")
    if stats["nacks"] or stats["errors"]:
        res.rows["fault"].note = f"lender saw {stats['nacks']} refusals, {stats['errors']} errors"
        res.rows["fault_idle"].passed = False

    row = res.add(
        Row(
            "ready",
            "devmodel run: exec to ready",
            "s",
            statistics.median(ready),
            max(ready),
            len(ready),
        )
    )
    check(row, "<= 0.3 s", lambda m: m <= 0.3)
    row = res.add(
        Row("idle_rss", "devmodel run: idle RSS, client attached", "MB", idle["rss"], n=1)
    )
    check(row, "<= 24 MB", lambda m: m <= 24)
    row = res.add(
        Row(
            "idle_cpu_off",
            f"devmodel run: idle CPU over {plan.idle:g} s, polling off",
            "%",
            idle["cpu_off"],
            n=1,
        )
    )
    if polling:
        row = res.add(
            Row(
                "idle_cpu_on",
                f"devmodel run: idle CPU over {plan.idle:g} s, polling on",
                "%",
                idle["cpu_on"],
                n=1,
            )
        )
        check(row, "<= 1%", lambda m: m <= 1.0)
    else:
        res.missing(
            "idle_cpu_on", "devmodel run: idle CPU, polling on", "%", on_note
        ).target = "<= 1%"
    return res


def idle_figures(
    off_sock: str,
    dm_off: subprocess.Popen[bytes],
    on_sock: str,
    dm_on: subprocess.Popen[bytes] | None,
    seconds: float,
) -> dict[str, float]:
    """Idle RSS (polling off) and idle CPU of both instances, each with an attached, idle
    client, measured over the same `seconds`."""
    with contextlib.ExitStack() as stack:
        off = stack.enter_context(VfioUserClient(off_sock))
        off.attach()
        if dm_on is not None:
            on = stack.enter_context(VfioUserClient(on_sock))
            on.attach()
        time.sleep(0.5)  # let the attach's work finish
        rss = vm_rss_mb(dm_off.pid)
        pids = [dm_off.pid] + ([dm_on.pid] if dm_on is not None else [])
        before = [proc_cpu_seconds(p) for p in pids]
        t0 = perf()
        time.sleep(seconds)
        took = perf() - t0
        used = [proc_cpu_seconds(p) - b for p, b in zip(pids, before, strict=True)]
    result = {"rss": rss, "cpu_off": 100 * used[0] / took}
    if dm_on is not None:
        result["cpu_on"] = 100 * used[1] / took
    return result


# ---------------------------------------------------------------------------- output


PEER_NAMES = {
    "trapped_floor": "floor",
    "trapped_lvu": "libvfio-user",
    "trapped_dm_off_vs_floor": "devmodel RT",
    "posted_dm": "vfio-user",
    "resident": "resident",
    "resident_idle": "parked read",
    "resident_warm": "warm read",
    "ping": "lease RT",
}


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "us":
        return f"{value:.1f} us" if value < 1000 else f"{value / 1000:.2f} ms"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "count":
        return f"{value:g}"
    if unit == "%":
        return f"{value:.2f} %"
    return f"{value:.1f} {unit}"


def print_table(res: Results, old: dict[str, Any] | None = None) -> None:
    head = f"{'figure':<58} {'median':>10} {'p99':>10}  {'ratio to peer':<20} {'target':<34} "
    old_rows = {r["key"]: r for r in old["rows"]} if old else {}
    if old:
        head += f"{'new/old':>8} {'p99 n/o':>8}"
    print(head)
    print("-" * len(head))
    for row in res.rows.values():
        if row.note and row.median is None:
            line = f"{row.figure:<58} {row.note}"
            if row.target:
                line += f"   (target {row.target})"
            print(line)
            continue
        peer = PEER_NAMES.get(row.peer or "", row.peer)
        ratio = f"{row.ratio:.2f}x {peer}" if row.ratio is not None and row.peer else ""
        mark = "" if row.passed is None else ("pass" if row.passed else "MISS")
        target = f"{row.target} {mark}".strip()
        line = (
            f"{row.figure:<58} {fmt(row.median, row.unit):>10} {fmt(row.p99, row.unit):>10}  "
            f"{ratio:<20} {target:<34} "
        )
        was = old_rows.get(row.key)
        if old:
            line += compare_cells(row, was)
        if row.note:
            line += f" ({row.note})"
        print(line.rstrip())


def compare_cells(row: Row, was: dict[str, Any] | None) -> str:
    def r(new: float | None, prev: float | None) -> str:
        return f"{new / prev:.2f}x" if new is not None and prev else "-"

    if was is None:
        return f"{'new row':>8} {'':>8}"
    return f"{r(row.median, was.get('median')):>8} {r(row.p99, was.get('p99')):>8}"


def to_json(
    res: Results, plan: Plan, cpus: list[int], elapsed: float, pin: str = "split"
) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg": [round(v, 2) for v in os.getloadavg()],  # at the end of the run
        "host": platform.node(),
        "python": platform.python_version(),
        "cpus": cpus,
        "pin": pin,
        "plan": asdict(plan),
        "seconds": round(elapsed, 1),
        "rows": [asdict(row) for row in res.rows.values()],
    }


def from_json(data: dict[str, Any]) -> Results:
    res = Results()
    known = set(Row.__dataclass_fields__)
    for r in data["rows"]:
        # Older runs lack newer fields (cdf), which default.
        res.add(Row(**{k: v for k, v in r.items() if k in known}))
    return res


def plot(data: dict[str, Any], out_dir: Path, stem: str) -> None:
    """The PNG plots of a result and the same CDFs as text (bench_plots.py), or one line saying
    why there are none."""
    try:
        import bench_plots  # noqa: PLC0415 (matplotlib: only when plotting)
    except ImportError as exc:
        print(f"plots: none ({exc}; install the bench extra: pip install -e '.[bench]')")
        return
    try:
        written = bench_plots.write_plots(data, out_dir, stem)
    except ImportError as exc:
        print(f"plots: none ({exc}; install the bench extra: pip install -e '.[bench]')")
        return
    for path in written:
        print(f"plot: {path}")
    try:
        text = bench_plots.write_text_plots(data, out_dir, stem)
    except ImportError as exc:
        print(f"text plots: none ({exc}; install the bench extra: pip install -e '.[bench]')")
        return
    if text is not None:
        print(f"text plots: {text}")


def print_xen(run_dir: str | None) -> None:
    """The Xen figures (trapped reads through real event channels against a C ioreq server,
    measured on the Xen test bed) after the table above: another transport and another
    machine (TCG), so they get their own table and their own peer."""
    if run_dir:
        print()
        print(xen_table.format_table(Path(run_dir)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts: a smoke run")
    parser.add_argument(
        "--no-build",
        action="store_true",
        help="do not build libvfio-user's sample server (a cached build is still used)",
    )
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    parser.add_argument(
        "--plots",
        metavar="DIR",
        help="write PNG plots (latency CDFs of each figure and its peers) here, named after "
        "the JSON file (default: next to it; with --results, only when given)",
    )
    parser.add_argument("--no-plots", action="store_true", help="write no plots")
    parser.add_argument("--compare", metavar="OLD.json", help="print the ratio new/old per row")
    parser.add_argument(
        "--results", metavar="NEW.json", help="do not measure: show these results (with --compare)"
    )
    parser.add_argument(
        "--xen-results",
        metavar="DIR",
        help="also print the Xen figures of a saved xen-bench run (its run directory: "
        "tests/xen_guest/dom0-bench, bench/xen_table.py)",
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5)")
    parser.add_argument("--reads", type=int, help="trapped reads per server (default 20000)")
    parser.add_argument("--repeat", type=int, help="samples per lease figure (default 1000)")
    parser.add_argument("--idle-seconds", type=float, help="idle CPU window (default 10)")
    parser.add_argument(
        "--pin",
        choices=PINNING,
        default="split",
        help="split: servers on one CPU, clients on another (default); same: all on one CPU; "
        "none: the scheduler decides",
    )
    parser.add_argument(
        "--poll-us", type=int, default=50, help=f"{POLL_OPTION} for the polling-on row"
    )
    args = parser.parse_args(argv)
    old = None
    if args.compare:
        old = json.loads(Path(args.compare).read_text())
        if old.get("schema") != SCHEMA:
            parser.error(f"{args.compare}: not a bench/run result of schema {SCHEMA}")
    if args.results:
        data = json.loads(Path(args.results).read_text())
        print_table(from_json(data), old)
        if args.plots and not args.no_plots:
            plot(data, Path(args.plots), Path(args.results).stem)
        print_xen(args.xen_results)
        return 0
    quick = args.quick
    plan = Plan(
        rounds=args.rounds or (2 if quick else 5),
        reads=args.reads or (400 if quick else 20000),
        chunk=50 if quick else 200,
        own_reads=2000 if quick else 100_000,
        repeat=args.repeat or (16 if quick else 1000),
        starts=1 if quick else 2,
        idle=args.idle_seconds if args.idle_seconds is not None else (1.0 if quick else 10.0),
        coalesce_rounds=3 if quick else 10,
        poll_us=args.poll_us,
    )
    server, client = cpu_plan(args.pin)
    cpus = sorted(os.sched_getaffinity(0))
    bytecode = compiled_bytecode()
    t0 = perf()
    try:
        res = run(args, plan, server, client)
    except bl.BenchFailed as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    elapsed = perf() - t0
    pinning = (
        f"servers on CPU {min(server)}, clients on CPU {min(client)}"
        if server and client
        else "not pinned"
    )
    print(
        f"bench/run: {plan.rounds} interleaved rounds, {plan.reads} trapped reads per server, "
        f"{plan.repeat} samples per lease figure; {pinning}; {bytecode}; load average "
        f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}; {elapsed:.0f} s"
    )
    print_table(res, old)
    path = Path(args.json) if args.json else BENCH_CACHE / time.strftime("run-%Y%m%d-%H%M%S.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    data = to_json(res, plan, cpus, elapsed, args.pin)
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"results: {path}")
    if not args.no_plots:
        plot(data, Path(args.plots) if args.plots else path.parent, path.stem)
    print_xen(args.xen_results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
