"""Lent memory under a real guest: evicted and paged back in without losing or tearing a byte.

The reference lender (examples/reference_lender.py) runs as its own process and lends the
device model its whole aperture; the guest's bartest writes over several lease windows while
the lender takes them back:

- all at once, between the guest's fill and its read-back (SIGUSR1, "evict everything"): the
  data comes back identical with exactly one page-in per window touched;
- at random, continuously (--revoke-rate), while two threads on two vCPUs write and check
  self-describing records (thread, pass, offset): none lost, none torn, and the run really did
  revoke and page in while they wrote.

The host follows the device model through its control socket (window states) and takes the
final counters from three places that must agree: BAR2 as the guest read it, the device
model's "stopped; counters:" line, and the lender's own summary.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from .lender_stack import GRANULE, STARTUP_TIMEOUT, WINDOWS, LenderStack
from .testbed import DevmodelServer, LenderProcess, Reaper, RunningGuest

pytestmark = pytest.mark.qemu

# The lender's VRAM holds the whole aperture: the only evictions are the ones a test asks for.
VRAM = "256M"

# Fill-evict-verify: a piece at the start and one against the end of each of these windows.
TOUCHED = 8
PIECE = 8 << 10

# Churn: two threads writing records into these windows for RUN_MS while the lender revokes
# a resident window REVOKE_RATE times a second and puts half its page-ins somewhere else.
CHURN_WINDOWS = 16
CHURN_SLOTS = 32
RUN_MS = 12_000
REVOKE_RATE = 40
MOVE_PROBABILITY = 0.5


def _is_event(name: str) -> Callable[[dict[str, Any]], bool]:
    return lambda line: line.get("event") == name


@contextmanager
def _explained(lender: LenderProcess) -> Iterator[None]:
    """Failures carry the lender's logs (the conftest reports only the guest's and devmodel's)."""
    try:
        yield
    except AssertionError as exc:
        logs = "\n".join(f"----- {t} -----\n{x}" for t, x in lender.log_sections())
        raise AssertionError(f"{exc}\n{logs}") from exc


class Stack(LenderStack):
    """The shared stack with this module's VRAM, which holds the whole aperture."""

    def __init__(self, reaper: Reaper, tmp_path: Path,
                 start_devmodel: Callable[..., DevmodelServer], *lender_args: str,
                 transport: str = "vfio-user", devmodel_args: tuple[str, ...] = ()) -> None:
        super().__init__(reaper, tmp_path, start_devmodel, *lender_args, vram=VRAM,
                         transport=transport, devmodel_args=devmodel_args)

    def wait_windows(self, predicate: Callable[[dict[str, int]], bool], what: str,
                     timeout: float = STARTUP_TIMEOUT) -> dict[str, int]:
        """Window counts by state, once `predicate` holds for them."""
        deadline = time.monotonic() + timeout
        while True:
            windows: dict[str, int] = self.stats()["windows"]
            if predicate(windows):
                return windows
            assert time.monotonic() < deadline, f"never {what}: windows {windows}"
            time.sleep(0.05)


@pytest.fixture
def stacks(reaper: Reaper, tmp_path: Path, start_devmodel: Callable[..., DevmodelServer]
           ) -> Iterator[Callable[..., Stack]]:
    made: list[Stack] = []

    def make(*lender_args: str, transport: str = "vfio-user",
             devmodel_args: tuple[str, ...] = ()) -> Stack:
        made.append(Stack(reaper, tmp_path, start_devmodel, *lender_args, transport=transport,
                          devmodel_args=devmodel_args))
        return made[-1]

    yield make
    for stack in made:
        stack.control.close()
        stack.lender.stop()


def _delta(after: dict[str, int], before: dict[str, int], key: str) -> int:
    return after[key] - before[key]


def test_fill_evict_everything_verify(
    stacks: Callable[..., Stack], launch: Callable[..., RunningGuest], transport: str
) -> None:
    """The guest fills TOUCHED windows and waits; the lender evicts all WINDOWS leases; the
    guest reads everything back identical, and each touched window was paged in exactly once
    (devmodel, BAR2 and the lender agree), the untouched ones never. Over both vfio-user
    transports: under libvfio-user each page-in is a fault served from its worker thread."""
    t0 = time.monotonic()
    stack = stacks("--seed", "1", transport=transport)
    with _explained(stack.lender):
        stack.wait_windows(lambda w: w["resident"] == WINDOWS, "all resident")
        guest = launch(["evict"], server=stack.server,
                       append=f"devmodel.windows={TOUCHED} devmodel.piece={PIECE} "
                              f"devmodel.revokes={WINDOWS} devmodel.wait_ms=30000")
        filled = guest.wait_for(_is_event("filled"), 60)
        assert filled["windows"] == TOUCHED and filled["granule"] == GRANULE
        assert filled["counters"]["page_ins"] == 0 and filled["counters"]["revokes"] == 0
        # Nothing was evicted yet: the guest's writes all went straight to lent memory.
        assert stack.stats()["windows"]["resident"] == WINDOWS
        stack.lender.evict_all()
        # The guest reads once it has seen every REVOKE counted (the REVOKEs come at once, the
        # guest's page-ins then race the lender's copying out: both are part of the test).
        evicted = guest.wait_for(_is_event("evicted"), 30)
        assert evicted["timed_out"] is False and evicted["revokes_seen"] == WINDOWS
        run = guest.finish()
        # Paged back in: the touched windows, and only those.
        after = stack.wait_windows(lambda w: w["resident"] + w["evicted"] == WINDOWS, "settled")
        assert (after["resident"], after["evicted"]) == (TOUCHED, WINDOWS - TOUCHED)
        line = run.line("evict")
        assert line["mismatches"] == 0 and line["bad_windows"] == 0, line.get("first_mismatch")
        assert line["bytes"] == 2 * TOUCHED * PIECE and line["reads"] > 0
        assert line["ok"] is True
        bar2 = line["counters"]
        assert _delta(bar2, evicted["counters"], "page_ins") == TOUCHED
        assert bar2["page_ins"] == TOUCHED and bar2["revokes"] == WINDOWS
        # One vCPU: the first access to each window waits for its page-in, nothing else does.
        assert bar2["faults"] == TOUCHED and bar2["failed_accesses"] == 0
        end = run.event("end")
        assert end is not None and end["status"] == 0 and run.returncode == 0
        counters, lender = stack.stop()
        assert counters["page_ins"] == TOUCHED and counters["revokes"] == WINDOWS
        assert counters["grants"] == WINDOWS + TOUCHED
        assert counters["failed_accesses"] == counters["grant_nacks"] == 0
        assert counters["protocol_errors"] == counters["bad_accesses"] == 0
        assert counters["lender_losses"] == 0
        assert lender["page_ins"] == TOUCHED and lender["page_in_failures"] == 0
        assert lender["revokes"] == lender["evictions"] == WINDOWS
        assert lender["grants"] == WINDOWS + TOUCHED and lender["grant_nacks"] == 0
        assert lender["random_evictions"] == lender["staged"] == 0
        assert lender["protocol_errors"] == lender["quarantined"] == 0
        assert lender["bytes_out"] == WINDOWS * GRANULE
        assert lender["bytes_in"] == TOUCHED * GRANULE
    print(f"fill-evict-verify: {TOUCHED} of {WINDOWS} windows, {line['bytes']} bytes, "
          f"{line['reads']} reads, {line['mismatches']} mismatches, page-ins {bar2['page_ins']}, "
          f"revokes {bar2['revokes']}, faults {bar2['faults']}, waited {evicted['ms']} ms for "
          f"the revokes, {time.monotonic() - t0:.1f} s")


@pytest.mark.parametrize("polling", ["on", "off"])
def test_two_vcpus_write_through_random_revocation(
    stacks: Callable[..., Stack], launch: Callable[..., RunningGuest], transport: str,
    polling: str,
) -> None:
    """Two writer threads, one per vCPU, for RUN_MS while the lender revokes windows at random
    and pages them back in (half of them elsewhere in its VRAM): every record each thread reads
    back is the one it wrote last, and so is every record at the end; none lost or torn, no
    access fell back to the failure policy, and revokes and page-ins happened while they ran.
    With polling on (the defaults) and off (the client's socket and the lender's, for a
    page-in's answer: `--poll-max-us 0 --page-in-poll-max-us 0`)."""
    t0 = time.monotonic()
    off = ("--poll-max-us", "0", "--page-in-poll-max-us", "0")
    stack = stacks("--revoke-rate", str(REVOKE_RATE), "--move-probability",
                   str(MOVE_PROBABILITY), "--seed", "2", "--poison", transport=transport,
                   devmodel_args=off if polling == "off" else ())
    with _explained(stack.lender):
        stack.wait_windows(lambda w: w["resident"] + w["evicted"] == WINDOWS, "all lent")
        guest = launch(["churn"], server=stack.server, smp=2,
                       append=f"devmodel.windows={CHURN_WINDOWS} devmodel.slots={CHURN_SLOTS} "
                              f"devmodel.run_ms={RUN_MS}")
        start = guest.wait_for(_is_event("churning"), 60)
        assert start["cpus"] == 2 and start["threads"] == 2
        run = guest.finish()
        churned = run.event("churned")
        assert churned is not None
        lines = run.lines("churn")
        threads = sorted((r for r in lines if "thread" in r), key=lambda r: r["thread"])
        summary = next(r for r in lines if r.get("summary"))
        assert [t["thread"] for t in threads] == [0, 1]
        assert sorted(t["cpu"] for t in threads) == [0, 1], "each thread on its own vCPU"
        for t in threads:
            assert (t["mismatches"], t["lost"], t["torn"], t["other"]) == (0, 0, 0, 0), t
            assert t["passes"] >= 3 and t["reads"] == t["writes"] > 0, t
            assert t["writes"] == t["passes"] * CHURN_WINDOWS * CHURN_SLOTS
        final = summary["final"]
        assert final["records"] == 2 * CHURN_WINDOWS * CHURN_SLOTS == final["reads"]
        assert (final["mismatches"], final["lost"], final["torn"], final["other"]) == (
            0, 0, 0, 0), final
        assert summary["ok"] is True and summary["cpus"] == 2
        # The run proves something only if the windows really came and went under the writers.
        during = {k: _delta(churned["counters"], start["counters"], k)
                  for k in ("revokes", "page_ins", "faults", "failed_accesses")}
        assert during["revokes"] > 0 and during["page_ins"] > 0 and during["faults"] > 0, during
        assert summary["counters"]["failed_accesses"] == 0
        end = run.event("end")
        assert end is not None and end["status"] == 0 and run.returncode == 0
        counters, lender = stack.stop()
        assert counters["failed_accesses"] == counters["grant_nacks"] == 0
        assert counters["protocol_errors"] == counters["bad_accesses"] == 0
        assert counters["lender_losses"] == 0
        assert counters["page_ins"] == lender["page_ins"] >= during["page_ins"]
        assert lender["random_evictions"] > 0 and lender["moves"] > 0
        assert lender["page_in_failures"] == lender["protocol_errors"] == 0
        assert lender["grant_nacks"] == lender["quarantined"] == 0
        if polling == "off":  # nothing polled at all
            spins = ("poll_hits", "poll_misses", "page_in_poll_hits", "page_in_poll_misses")
            assert all(counters[k] == 0 for k in spins), counters
    print(f"churn ({polling}, {transport}): {threads[0]['passes']}+{threads[1]['passes']} passes, "
          f"{threads[0]['reads'] + threads[1]['reads']} records checked by the writers and "
          f"{final['reads']} at the end, 0 lost/torn; during the run revokes {during['revokes']}, "
          f"page-ins {during['page_ins']}, faults {during['faults']}; totals: devmodel page-ins "
          f"{counters['page_ins']}, revokes {counters['revokes']}; lender random evictions "
          f"{lender['random_evictions']}, moves {lender['moves']}; "
          f"{time.monotonic() - t0:.1f} s")
