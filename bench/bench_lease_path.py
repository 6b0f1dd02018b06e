"""The lease path, this tree against an older checkout, interleaved in one run.

The three figures issue 12 sets targets for, measured as `bench/run` measures them (a lender
process, `devmodel run` borrowing from it, a vfio-user client process), for two device models
side by side: this tree's and the one found in `--baseline-src DIR` (for example
`git worktree add /tmp/leasebase <old-commit>`). Each round measures every figure for both, in
alternating order, so that the machine's noise hits them alike:

  - a fault (a read of a window the lender just evicted, served by a page-in) next to a resident
    read (the vfio-user round trip);
  - PING -> PONG and REVOKE -> REVOKED of an idle window as the lender sees them;
  - REVOKE -> REVOKED and PING -> PONG while a client process reads (`reads`) or reads and
    posts writes (`posted`) to other windows.

Prints the median and p99 of each figure per device model, and the targets. With
`--compare-lenders` instead, it measures this tree twice, once from each bench lender
(bench_leases.LENDERS: the lean blocking one bench/run uses, and the first one, a trio program):
the difference is the lender's own share of each figure.
Usage: bench/bench_lease_path.py (--baseline-src DIR | --compare-lenders) [--rounds N]
[--repeat N] [--pin ...].
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import bench_leases as bl
from bench_run import PINNING, cpu_plan

FIGURES = (
    ("resident", "resident read (vfio-user RT)"),
    ("resident_idle", "  first after the evict (parked)"),
    ("resident_warm", "  right after a fault"),
    ("ping", "PING -> PONG, idle"),
    ("fault", "fault (evicted read, instant lender)"),
    ("fault_idle", "  first after the evict (parked)"),
    ("fault_warm", "  right after a resident read"),
    ("revoke", "REVOKE -> REVOKED, idle window"),
    ("revoke_reads", "REVOKE -> REVOKED, load: reads"),
    ("revoke_posted", "REVOKE -> REVOKED, load: reads + posted writes"),
    ("ping_reads", "PING -> PONG, load: reads"),
    ("ping_posted", "PING -> PONG, load: reads + posted writes"),
)


def us(samples: list[float], q: float | None = None) -> float:
    if q is None:
        return statistics.median(samples) * 1e6
    return bl.pct(samples, q) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--baseline-src", help="the older checkout to compare")
    which.add_argument(
        "--compare-lenders", action="store_true", help="this tree, from the trio and lean lenders"
    )
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=1000, help="samples per figure and tree")
    parser.add_argument("--pin", choices=PINNING, default="split")
    args = parser.parse_args()
    server, client = cpu_plan(args.pin)
    per_round = max(2, args.repeat // args.rounds)
    # name: (the checkout to run, the bench lender)
    trees: dict[str, tuple[str | None, str]] = (
        {"trio lender": (None, "trio"), "lean lender": (None, "lean")}
        if args.compare_lenders
        else {"baseline": (args.baseline_src, "lean"), "new": (None, "lean")}
    )
    samples: dict[str, dict[str, list[float]]] = {t: {k: [] for k, _ in FIGURES} for t in trees}
    tmp = Path(tempfile.mkdtemp(prefix="devmodel-lease-path-"))
    setups: dict[str, bl.EndToEnd] = {}
    try:
        for i, (tree, (src, lender)) in enumerate(trees.items()):
            (tmp / str(i)).mkdir()
            setups[tree] = bl.EndToEnd(
                tmp / str(i), server_cpus=server, client_cpus=client, src=src, lender=lender
            )
        order = list(trees)
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}: {', '.join(order)}", file=sys.stderr)
            for tree in order:
                bl.lease_round(setups[tree], per_round, samples[tree])
            order.reverse()
    finally:
        for e2e in setups.values():
            e2e.close()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"lease path, {args.rounds} interleaved rounds, {per_round * args.rounds} samples each")
    names = [f"{t} med/p99 us" for t in trees]
    print(f"{'figure':48} {names[0]:>22} {names[1]:>22}")
    for key, label in FIGURES:
        cells = [f"{us(samples[t][key]):8.1f} /{us(samples[t][key], 0.99):8.1f}" for t in trees]
        print(f"{label:48} {cells[0]:>22} {cells[1]:>22}")
    for tree in trees:
        s = samples[tree]
        rt = us(s["ping"])
        res = us(s["resident_idle"])
        print(
            f"{tree}: ping/resident(parked) {rt / res:.2f} (target <= 1.30); "
            f"fault {us(s['fault_idle']):.0f} vs resident + RT + 20 = {res + rt + 20:.0f} us "
            f"(both first after the evict; right after the other read: "
            f"{us(s['fault_warm']):.0f} vs {us(s['resident_warm']) + rt + 20:.0f}); "
            f"idle revoke {us(s['revoke']):.0f} vs RT + 20 = {rt + 20:.0f} us; "
            f"revoke under load {us(s['revoke_reads']):.0f}/{us(s['revoke_posted']):.0f} "
            f"vs 2 x (RT + 20) = {2 * (rt + 20):.0f} us"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
