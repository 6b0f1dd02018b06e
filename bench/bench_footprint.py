"""Start-up footprint and own time of `devmodel run`, this tree against another, interleaved.

For each round, alternately for this tree and for `--baseline-src DIR` (a tree with devmodel/
and protocol/, e.g. `git worktree add /tmp/base OLD`): exec to READY=1 on --ready-fd; the
instance's memory with an attached, idle vfio-user client (VmRSS, its anonymous part, Pss);
and the device model's own time per trapped read (bench_vfio_user.py's in-process loop of
this tree, run in a child process on that tree's sources). Prints medians per tree.
Usage: bench/bench_footprint.py [--rounds N] [--baseline-src DIR]
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from devmodel.testing import VfioUserClient

HERE = Path(__file__).resolve().parent
TOP = HERE.parent

# Run a module of another source tree (the editable install's finder dropped, that tree first).
_FROM = (
    "import runpy, sys; "
    "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
    "sys.path[:0] = [{src!r}, {src!r} + '/protocol', {bench!r}]; sys.argv[0] = {name!r}; "
    "runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
)
_OWN = (
    "import statistics, bench_vfio_user as bv; "
    "t = bv.device_model_own_times({reads}); print(statistics.median(t)); "
    "t = bv.device_model_own_times({reads}, lent=True); print(statistics.median(t))"
)


def python_argv(src: str, module: str, *args: str) -> list[str]:
    # This tree's benchmark code measures either tree's devmodel: the same loop for both.
    code = _FROM.format(src=src, bench=str(HERE), name=module, module=module)
    return [sys.executable, "-c", code, *args]


def start(src: str, sock: str) -> tuple[subprocess.Popen[bytes], float]:
    r, w = os.pipe()
    argv = python_argv(src, "devmodel", "run", "--socket-path", sock, "--log-level", "warning")
    t0 = time.perf_counter()
    proc = subprocess.Popen([*argv, "--ready-fd", str(w)], pass_fds=(w,))
    os.close(w)
    got = b""
    while not got.endswith(b"\n"):
        ready, _, _ = select.select([r], [], [], 20)
        chunk = os.read(r, 64) if ready else b""
        if not chunk:
            proc.kill()
            raise SystemExit(f"{src}: never ready")
        got += chunk
    took = time.perf_counter() - t0
    os.close(r)
    return proc, took


def memory_kb(pid: int) -> tuple[int, int, int]:
    """(VmRSS, RssAnon, Pss) in KiB: all resident pages, the process's own anonymous ones, and
    its proportional share (shared libraries divided among the processes mapping them)."""
    fields = {}
    for name in (f"/proc/{pid}/status", f"/proc/{pid}/smaps_rollup"):
        with open(name) as f:
            for line in f:
                key, _, value = line.partition(":")
                fields[key] = value
    return tuple(int(fields[k].split()[0]) for k in ("VmRSS", "RssAnon", "Pss"))  # type: ignore[return-value]


def idle_memory(src: str, sock: str) -> tuple[float, int, int, int]:
    proc, took = start(src, sock)
    try:
        with VfioUserClient(sock) as client:
            client.attach()
            client.read(0, 0, 8)
            time.sleep(0.5)
            rss, anon, pss = memory_kb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)
    return took, rss, anon, pss


def own_time(src: str, reads: int) -> tuple[float, float]:
    """Seconds per read: anonymous memory, and lent by the built-in lender (the engine)."""
    code = _OWN.format(reads=reads)
    argv = [*python_argv(src, "bench_footprint_own"), code]
    argv[2] = argv[2].replace(
        "runpy.run_module('bench_footprint_own', run_name='__main__', alter_sys=True)",
        "exec(sys.argv[1])",
    )
    done = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=src)
    memory, lent = done.stdout.split()[-2:]
    return float(memory), float(lent)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--own-reads", type=int, default=50_000)
    parser.add_argument("--no-own", action="store_true", help="skip the own-time figure")
    parser.add_argument("--baseline-src", help="the other tree")
    args = parser.parse_args()
    trees = {"new": str(TOP)}
    if args.baseline_src:
        trees = {"old": os.path.abspath(args.baseline_src), **trees}
    tmp = Path(tempfile.mkdtemp(prefix="devmodel-footprint-"))
    # Both trees as installed, with their bytecode compiled (bench_run.compiled_bytecode): one
    # untimed start each writes it.
    if os.environ.pop("PYTHONDONTWRITEBYTECODE", None) is not None:
        cache = os.environ.get("DEVMODEL_CACHE") or str(
            Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "devmodel"
        )
        os.environ.setdefault("PYTHONPYCACHEPREFIX", str(Path(cache) / "bench" / "pycache"))
    for name, src in trees.items():
        idle_memory(src, str(tmp / f"{name}-warm.sock"))
    got: dict[str, dict[str, list[float]]] = {
        name: {"ready": [], "rss": [], "anon": [], "pss": [], "own": [], "lent": []}
        for name in trees
    }
    try:
        for r in range(args.rounds):
            for name, src in trees.items():
                took, rss, anon, pss = idle_memory(src, str(tmp / f"{name}{r}.sock"))
                got[name]["ready"].append(took)
                got[name]["rss"].append(rss / 1024)
                got[name]["anon"].append(anon / 1024)
                got[name]["pss"].append(pss / 1024)
                if not args.no_own:
                    memory, lent = own_time(src, args.own_reads)
                    got[name]["own"].append(memory * 1e6)
                    got[name]["lent"].append(lent * 1e6)
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"medians of {args.rounds} interleaved rounds (load {os.getloadavg()[0]:.1f}):")
    for name, figs in got.items():
        line = (
            f"  {name}: ready {statistics.median(figs['ready']):.3f} s "
            f"(max {max(figs['ready']):.3f}), idle RSS {statistics.median(figs['rss']):.1f} MiB "
            f"(anon {statistics.median(figs['anon']):.1f}, "
            f"Pss {statistics.median(figs['pss']):.1f})"
        )
        if figs["own"]:
            line += (
                f", own time per read {statistics.median(figs['own']):.2f} us "
                f"(lent by the built-in lender: {statistics.median(figs['lent']):.2f} us)"
            )
        print(line)


if __name__ == "__main__":
    main()
