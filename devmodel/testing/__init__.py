"""Fakes and helpers for testing devmodel and the programs around it, in the style of
`trio.testing`: what the tests, the benchmarks and the examples share.

- A vfio-user client that plays QEMU over a real socket: `VfioUserClient`.
- vfio-user without sockets: raw messages, negotiated sans-IO pairs, fds that travel as with
  SCM_RIGHTS (`FdBag`).
- The lease engine's lender side, in process: `FakeLender`, with `make_engine`, and `spawn` to
  run a task whose outcome (`Box`) a test reads; a slow or stuck hypervisor's unmaps:
  `delay_unmaps`, `hold_unmaps`.
- A real `LenderLink` against a lender the test scripts step by step: `lender_link_rig`, and
  `lender_session` with the first session open and a memfd to grant from.
- Lenders on real sockets in threads of their own: `ThreadedLender`, `StallingLender`.
- A simulated Xen hypervisor the Xen transport cannot tell from a host: `SimHypervisor`.
- Sealed memfds, and looks at the fds and mappings this process holds.

Nothing here imports pytest, and nothing in devmodel outside this package imports it.
"""

from devmodel.testing._private.device import memory_backend
from devmodel.testing._private.fds import (
    F_ADD_SEALS,
    F_SEAL_FUTURE_WRITE,
    F_SEAL_GROW,
    F_SEAL_SHRINK,
    F_SEAL_WRITE,
    fd_is_open,
    fds_naming,
    fds_of_memfd,
    file_key,
    mapped,
    memfd,
    memfd_is_mapped,
    open_fds,
    sealed_memfd,
)
from devmodel.testing._private.lease_fakes import (
    PAGE,
    RO,
    RW,
    Answer,
    Box,
    FakeLender,
    RecordedPageIn,
    answer_from,
    delay_unmaps,
    hold_unmaps,
    make_engine,
    pattern,
    spawn,
)
from devmodel.testing._private.lender_link_rig import (
    LINK_APERTURE,
    LINK_GRANULE,
    LINK_GUEST,
    LINK_STEP,
    LenderLinkRig,
    LenderListener,
    ScriptedLender,
    lender_link_rig,
    lender_session,
)
from devmodel.testing._private.sim_hypervisor import (
    REMOTE_BUF_PORT,
    REMOTE_PORT_BASE,
    SimHypervisor,
    SimMapping,
    SimPages,
    SimServer,
    SimVcpu,
)
from devmodel.testing._private.stalling_lender import StallingLender
from devmodel.testing._private.threaded_lender import ThreadedLender
from devmodel.testing._private.vfio_user_client import ErrorReplyReceived, VfioUserClient
from devmodel.testing._private.vfio_user_sansio import (
    QEMU_CAPS,
    QEMU_KEYS,
    QEMU_VERSION_JSON,
    FdBag,
    chunked,
    deliver,
    drain,
    expect_fatal,
    negotiated_pair,
    one_event,
    posted,
    pump_all,
    raw,
    raw_reply,
    ready_server,
    region_read,
    region_read_payload,
    state,
)

__all__ = [
    "F_ADD_SEALS",
    "F_SEAL_FUTURE_WRITE",
    "F_SEAL_GROW",
    "F_SEAL_SHRINK",
    "F_SEAL_WRITE",
    "LINK_APERTURE",
    "LINK_GRANULE",
    "LINK_GUEST",
    "LINK_STEP",
    "PAGE",
    "QEMU_CAPS",
    "QEMU_KEYS",
    "QEMU_VERSION_JSON",
    "REMOTE_BUF_PORT",
    "REMOTE_PORT_BASE",
    "RO",
    "RW",
    "Answer",
    "Box",
    "ErrorReplyReceived",
    "FakeLender",
    "FdBag",
    "LenderLinkRig",
    "LenderListener",
    "RecordedPageIn",
    "ScriptedLender",
    "SimHypervisor",
    "SimMapping",
    "SimPages",
    "SimServer",
    "SimVcpu",
    "StallingLender",
    "ThreadedLender",
    "VfioUserClient",
    "answer_from",
    "chunked",
    "delay_unmaps",
    "deliver",
    "drain",
    "expect_fatal",
    "fd_is_open",
    "fds_naming",
    "fds_of_memfd",
    "file_key",
    "hold_unmaps",
    "lender_link_rig",
    "lender_session",
    "make_engine",
    "mapped",
    "memfd",
    "memfd_is_mapped",
    "memory_backend",
    "negotiated_pair",
    "one_event",
    "open_fds",
    "pattern",
    "posted",
    "pump_all",
    "raw",
    "raw_reply",
    "ready_server",
    "region_read",
    "region_read_payload",
    "sealed_memfd",
    "spawn",
    "state",
]
