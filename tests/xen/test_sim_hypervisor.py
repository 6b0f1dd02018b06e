"""The simulated hypervisor itself: the transport's tests are only as good as its routing,
its event channel and its guest memory."""

from __future__ import annotations

import errno
import os

import pytest

from devmodel.testing import REMOTE_BUF_PORT, REMOTE_PORT_BASE, SimHypervisor
from devmodel.xen.platform import XenError
from devmodel_wire.xen import BufioreqMode, read_slot


def test_slots_carry_each_vcpus_port_only_once_enabled_and_the_ring_its_own() -> None:
    """As Xen 4.20: the page is zero until enable, which writes each vCPU's vp_eport."""
    sim = SimHypervisor(vcpus=3)
    sid = sim.create_ioreq_server(BufioreqMode.LEGACY)
    s = sim.servers[sid]
    assert [read_slot(s.ioreq, v).vp_eport for v in range(3)] == [0, 0, 0]
    sim.set_ioreq_server_state(sid, True)
    assert [read_slot(s.ioreq, v).vp_eport for v in range(3)] == [40, 41, 42]
    assert read_slot(s.ioreq, 0).state == 0
    assert sim.bufioreq_port(sid) == REMOTE_BUF_PORT
    off = sim.create_ioreq_server(BufioreqMode.OFF)
    assert sim.bufioreq_port(off) is None
    sim.close()


def test_routing_reaches_only_claimed_ranges_of_an_enabled_server() -> None:
    sim = SimHypervisor()
    sid = sim.create_ioreq_server(BufioreqMode.LEGACY)
    sim.map_io_range(sid, True, 0x1000, 0x1FFF)
    assert sim.mmio_server(0x1000, 4) is None  # not enabled yet
    sim.set_ioreq_server_state(sid, True)
    assert sim.mmio_server(0x1000, 4) is sim.servers[sid]
    assert sim.mmio_server(0x1FFC, 8) is None  # runs past the range
    assert sim.mmio_server(0x2000, 1) is None
    with pytest.raises(XenError):
        sim.map_io_range(sid, True, 0x1800, 0x27FF)  # overlaps
    sim.map_pcidev(sid, 0, 0, 0x1E, 0)
    assert sim.config_server((0, 0, 0x1E, 0)) is sim.servers[sid]
    assert sim.config_server((0, 0, 0x1E, 1)) is None
    sim.close()


def test_binding_before_enable_fails_as_on_xen() -> None:
    """The order devmodel used before it ran on real Xen (bind each vCPU's slot port, then
    enable) reads port 0 and fails as xenevtchn_bind_interdomain does there, with EINVAL."""
    sim = SimHypervisor()
    sid = sim.create_ioreq_server(BufioreqMode.LEGACY)
    pages = sim.map_ioreq_pages(sid, sim.vcpus)
    with pytest.raises(XenError) as info:
        sim.evtchn_bind(read_slot(pages.ioreq, 0).vp_eport)
    assert info.value.errno == errno.EINVAL
    sim.set_ioreq_server_state(sid, True)
    assert sim.evtchn_bind(read_slot(pages.ioreq, 0).vp_eport) == 1
    pages.close()
    sim.close()


def test_after_domain_destruction_server_calls_fail_with_enoent() -> None:
    sim = SimHypervisor()
    sid = sim.create_ioreq_server(BufioreqMode.LEGACY)
    sim.set_ioreq_server_state(sid, True)
    sim.destroy_domain()
    with pytest.raises(XenError) as info:
        sim.set_ioreq_server_state(sid, False)
    assert info.value.errno == errno.ENOENT
    with pytest.raises(XenError) as info:
        sim.unmap_pcidev(sid, 0, 0, 0x1E, 0)
    assert info.value.errno == errno.ENOENT
    with pytest.raises(XenError) as info:
        sim.destroy_ioreq_server(sid)
    assert info.value.errno == errno.ENOENT
    sim.close()


def test_event_channel_masks_a_delivered_port_until_unmasked() -> None:
    sim = SimHypervisor()
    sim.set_ioreq_server_state(sim.create_ioreq_server(BufioreqMode.LEGACY), True)
    fd = sim.evtchn_fd()
    local = sim.evtchn_bind(REMOTE_PORT_BASE)
    assert sim.evtchn_pending() is None
    sim.guest_notify(REMOTE_PORT_BASE)
    sim.guest_notify(REMOTE_PORT_BASE)  # while masked: remembered, not delivered twice
    assert os.read(fd, 16) == b"\0"  # one wake-up byte on the real fd
    os.write(sim._wfd, b"\0")  # put it back for evtchn_pending
    assert sim.evtchn_pending() == local
    assert sim.evtchn_pending() is None
    sim.evtchn_unmask(local)  # the event that came while masked is delivered now
    assert sim.evtchn_pending() == local
    sim.evtchn_unbind(local)
    sim.guest_notify(REMOTE_PORT_BASE)  # nobody bound: dropped
    assert sim.evtchn_pending() is None
    sim.close()


def test_guest_mappings_are_live_ram_and_never_anything_else() -> None:
    sim = SimHypervisor(ram=64 << 10)
    m = sim.map_guest([2, 3], writable=True)
    m.view[4095:4097] = b"ab"
    assert sim.ram[2 * 4096 + 4095 : 2 * 4096 + 4097] == b"ab"
    m.close()
    ro = sim.map_guest([0], writable=False)
    assert ro.view.readonly
    ro.close()
    with pytest.raises(XenError) as info:
        sim.map_guest([16], writable=False)
    assert info.value.errno == errno.EFAULT
    assert sim.mappings_open == 0
    sim.close()


def test_injected_failures_and_use_after_close() -> None:
    sim = SimHypervisor()
    sim.fail["restrict"] = errno.EPERM
    with pytest.raises(XenError):
        sim.restrict()
    sim.close()
    with pytest.raises(XenError):
        sim.vcpu_count()
