"""The ioreq server's life against the simulated hypervisor: setup, readiness, teardown."""

from __future__ import annotations

import errno
import logging

import pytest
import trio

from devmodel.control.toolstack import StartupError
from devmodel.testing import FakeLender, SimHypervisor, memfd
from devmodel.xen.server import DEFAULT_SBDF, STATE_KEY, serve_xen
from devmodel_wire.lease.constants import RevokeMode
from devmodel_wire.xen import BufioreqMode
from tests.xen.rig import APERTURE, BAR0, BAR2, Rig, build_device, builtin_rig, serving

KEY = STATE_KEY.format(domid=7)


async def test_setup_claims_the_function_and_announces_readiness() -> None:
    device, engine, counters = build_device()
    sim = SimHypervisor(vcpus=3)
    async with serving(sim, device, counters) as server:
        s = sim.server()
        assert sim.restricted
        assert s.enabled
        assert s.mode == BufioreqMode.LEGACY
        assert s.pcidevs == {DEFAULT_SBDF}
        assert s.mmio == []  # decoding is off until the guest turns it on
        assert sim.xenstore == {KEY: "running"}
        assert len(server.vcpu_port) == 3
        assert sorted(sim.local_of) == [39, 40, 41, 42]  # three vCPUs and the buffered port
        # Restricted first; enabled, then the ports bound (Xen writes them at enable), and
        # announced last.
        assert sim.calls[0] == "restrict"
        order = [
            c for c in sim.calls if c in ("set_ioreq_server_state", "evtchn_bind", "xenstore_write")
        ]
        assert order == ["set_ioreq_server_state", *["evtchn_bind"] * 4, "xenstore_write"]
    engine.close()


async def test_the_first_request_is_an_invalidate_and_it_is_answered() -> None:
    """As on Xen 4.20: before the guest's first access, an IOREQ_TYPE_INVALIDATE with count 0
    (a map-cache flush broadcast); it is answered and counted as nothing wrong."""
    async with builtin_rig(enable=False) as rig:
        assert rig.sim.invalidate_pending
        assert await rig.cpu.config_read(0, 4) == 0x10E5_1234
        assert rig.sim.invalidates == 1 and not rig.sim.invalidate_pending
        assert rig.server.served == 2
        assert rig.counters.protocol_errors == 0 and rig.counters.bad_accesses == 0


async def test_after_xl_destroy_stopping_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    """Xen destroys the server with the domain: the teardown steps on it fail with ENOENT,
    which is logged once at INFO, not as one warning per step."""
    caplog.set_level(logging.INFO, logger="devmodel.xen")
    async with builtin_rig() as rig:
        rig.sim.destroy_domain()
    gone = [r for r in caplog.records if "already gone" in r.getMessage()]
    assert len(gone) == 1 and gone[0].levelno == logging.INFO, caplog.text
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == [], caplog.text
    assert rig.sim.closed and rig.sim.local_of == {}


async def test_clean_shutdown_undoes_everything() -> None:
    async with builtin_rig() as rig:
        sim = rig.sim
        assert sim.server().mmio
    s = next(iter(sim.servers.values()))
    assert s.destroyed and not s.enabled
    assert s.mmio == [] and s.pcidevs == set()
    assert sim.local_of == {} and sim.remote_of == {}
    assert sim.pages_open == 0 and sim.mappings_open == 0
    assert KEY not in sim.xenstore
    assert sim.closed
    assert rig.device.on_decode_change is None
    assert rig.engine.unmap_hooks == []
    tail = sim.calls[-1]
    assert tail == "close"


async def test_an_access_in_flight_at_shutdown_is_answered() -> None:
    """A vCPU waiting (page-in that never comes) when the server stops gets all-ones."""
    device, engine, counters = build_device()
    lender = FakeLender(engine)
    home = lender.own(memfd(APERTURE))
    lender.grant(0, APERTURE, home)
    sim = SimHypervisor()
    async with trio.open_nursery() as outer:
        async with serving(sim, device, counters) as server:
            rig = Rig(sim, device, engine, counters, server)
            await rig.enable()
            await engine.revoke(lender.granted[0], RevokeMode.EVICT)
            result: list[int] = []

            async def stuck() -> None:
                result.append(await sim.cpus[1].read(BAR0, 8))

            outer.start_soon(stuck)
            await lender.next_page_in()
        # the transport is gone; the vCPU got its answer
        with trio.fail_after(1):
            while not result:
                await trio.sleep(0.01)
    assert result == [(1 << 64) - 1]
    engine.close()
    lender.close()


@pytest.mark.parametrize(
    ("call", "code"),
    [
        ("restrict", errno.EPERM),
        ("create_ioreq_server", errno.ENOSPC),
        ("map_ioreq_pages", errno.EPERM),
        ("evtchn_bind", errno.EBUSY),
        ("map_pcidev", errno.EEXIST),
        ("set_ioreq_server_state", errno.EINVAL),
        ("xenstore_write", errno.EACCES),
    ],
)
async def test_a_setup_failure_is_a_startup_error_and_leaves_nothing(call: str, code: int) -> None:
    device, engine, counters = build_device()
    sim = SimHypervisor()
    sim.fail[call] = code
    async with trio.open_nursery() as nursery:
        with pytest.raises(StartupError, match=f"domain 7: .*{call} failed"):
            await nursery.start(
                lambda task_status: serve_xen(
                    device, counters, 7, platform=sim, task_status=task_status
                )
            )
    assert sim.closed
    assert all(s.destroyed for s in sim.servers.values())
    assert sim.local_of == {}
    assert sim.pages_open == 0
    assert sim.xenstore == {}
    assert device.on_decode_change is None
    engine.close()


async def test_more_vcpus_than_one_page_has_slots_is_refused() -> None:
    device, engine, counters = build_device()
    sim = SimHypervisor(vcpus=129)
    with pytest.raises(StartupError, match="129 vCPUs"):
        await serve_xen(device, counters, 7, platform=sim)
    assert sim.closed and sim.servers == {}
    engine.close()


async def test_without_a_platform_the_real_host_is_opened_and_its_failure_is_one_line() -> None:
    device, engine, counters = build_device()
    with pytest.raises(StartupError) as info:
        await serve_xen(device, counters, 7)
    assert "\n" not in str(info.value)
    engine.close()


async def test_bars_claimed_moved_and_released_with_decoding() -> None:
    async with builtin_rig(enable=False) as rig:
        s = rig.sim.server()
        await rig.enable()
        assert sorted(s.mmio) == [(BAR0, BAR0 + APERTURE - 1), (BAR2, BAR2 + 4095)]
        cpu = rig.cpu
        # Decoding off: nothing claimed, the guest's accesses go to the default model.
        await cpu.config_write(0x04, 2, 0)
        assert s.mmio == []
        assert await cpu.read(BAR0, 4) == 0xFFFFFFFF
        assert ("read", BAR0) in rig.sim.default_accesses
        # Move BAR0 above 4 GiB while decoding is off, then on again.
        new = 0x8_0000_0000
        await cpu.config_write(0x10, 4, new & 0xFFFFFFFF)
        await cpu.config_write(0x14, 4, new >> 32)
        await cpu.config_write(0x04, 2, 2)
        assert sorted(s.mmio) == [(BAR2, BAR2 + 4095), (new, new + APERTURE - 1)]
        # Moving a BAR with decoding on: the old range goes, the new one comes.
        await cpu.config_write(0x18, 4, 0xF100_0000)
        assert sorted(s.mmio) == [(0xF100_0000, 0xF100_0FFF), (new, new + APERTURE - 1)]
        await cpu.write(new + 8, 8, 0x1122334455667788)
        assert await cpu.read(new + 8, 8) == 0x1122334455667788
        assert await cpu.read(0xF100_0000, 4) == int.from_bytes(b"DMDL", "little")


async def test_the_guests_end_is_reported_once_and_other_domains_ends_are_not() -> None:
    """@releaseDomain fires for every domain that goes: devmodel asks whether it was its
    guest each time, and reports the end of its own once."""
    device, engine, counters = build_device()
    sim = SimHypervisor()
    ended: list[str] = []
    async with serving(sim, device, counters, on_domain_end=ended.append):
        with trio.fail_after(10):
            while "domain_ended" not in sim.calls:  # the watch's first event, at once
                await trio.sleep(0.01)
        sim.fire_release_watch()  # another domain went
        with trio.fail_after(10):
            while sim.calls.count("domain_ended") < 2:
                await trio.sleep(0.01)
        assert ended == []
        sim.destroy_domain()
        with trio.fail_after(10):
            while not ended:
                await trio.sleep(0.01)
        sim.fire_release_watch()
        await trio.sleep(0.05)
    assert ended == ["domain 7 ended"]
    assert sim.calls.count("watch_domain_end") == 1
    engine.close()


async def test_without_the_watch_the_server_serves_on_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    device, engine, counters = build_device()
    sim = SimHypervisor()
    sim.fail["watch_domain_end"] = errno.EACCES
    ended: list[str] = []
    async with serving(sim, device, counters, on_domain_end=ended.append):
        with trio.fail_after(10):
            while "cannot watch" not in caplog.text:
                await trio.sleep(0.01)
        sim.destroy_domain()
        await trio.sleep(0.05)
    assert ended == []
    assert "the toolstack must stop devmodel" in caplog.text
    engine.close()
