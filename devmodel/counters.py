"""Counters shared by the transports, the aperture and the register BAR the guest can read.

Plain integer attributes rather than a dict: the trapped-access hot path bumps them, and an
attribute increment on a slotted object is the cheapest thing Python offers.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(slots=True)
class DeviceCounters:
    trapped_reads: int = 0
    trapped_writes: int = 0
    # Accesses refused for their shape: out of range, unaligned, bad size, wrong region.
    bad_accesses: int = 0
    # Malformed or unsupported protocol messages answered with an error or refused.
    protocol_errors: int = 0
    page_ins: int = 0
    # Accesses answered with the failure policy (all-ones reads, dropped writes).
    failed_accesses: int = 0
    resets: int = 0
    client_connects: int = 0
    # Lease engine.
    grants: int = 0
    grant_nacks: int = 0
    revokes: int = 0
    # Accesses that met their memory not resident and had to wait for a revoke or a page-in;
    # one that asked for its page-in from the fast path's miss counts once, there, even when
    # the grant came before it reached the wait (LeaseEngine._ask_early).
    faults: int = 0
    lender_losses: int = 0
    # Adaptive polling of the transport's socket (devmodel/polling.py): spins that caught a
    # message, spins that ran out of budget, and the time spent spinning (CPU time, in ns).
    poll_hits: int = 0
    poll_misses: int = 0
    poll_ns: int = 0
    # The same for the lender's socket, polled by an access waiting for its page-in's GRANT
    # (devmodel/leases/lender_link.py, `poll_answer`).
    page_in_poll_hits: int = 0
    page_in_poll_misses: int = 0
    page_in_poll_ns: int = 0
    # Interrupts the device raised (the BAR2 doorbell): MSI/MSI-X messages signalled or left
    # pending, INTx assertions.
    interrupts: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
