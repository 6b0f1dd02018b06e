"""Record a running devmodel's control-socket events, one JSON line each, until it stops.

Run in dom0 by dom0-suite beside the devmodel that serves the churn guest
(`python3 -m tests.xen_guest.record_events SOCKET OUT`). The host-side test reads the lines
afterwards to see what no counter says: whether page-ins overlapped, that is, whether two
windows were being paged in at the same moment (each with a vCPU waiting on it, since a vCPU
has one access outstanding at a time on Xen). Counters only give totals, and sampling
`query-stats` under TCG would miss a window of a few milliseconds; the event stream is in
the order devmodel emitted it.

The first line, `{"recording": true}`, says the subscription is up, so the caller can wait for
it before the guest runs; the last, `{"ended": "..."}`, says why recording stopped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from devmodel.control.client import ConnectionLost, ControlClient


def record(socket: str, out: Path) -> int:
    with out.open("w", buffering=1) as f:
        try:
            client = ControlClient(socket)
        except OSError as exc:
            f.write(json.dumps({"ended": f"cannot connect: {exc}"}) + "\n")
            return 1
        f.write(json.dumps({"recording": True}) + "\n")
        why = "?"
        with client:
            while True:
                try:
                    event = client.read_event(timeout=3600.0)
                except (ConnectionLost, OSError) as exc:
                    why = f"{type(exc).__name__}: {exc}"
                    break
                f.write(json.dumps({"event": event.name, "data": event.data,
                                    "time": event.time}) + "\n")
        f.write(json.dumps({"ended": why}) + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python3 -m tests.xen_guest.record_events CONTROL_SOCKET OUT")
    sys.exit(record(sys.argv[1], Path(sys.argv[2])))
