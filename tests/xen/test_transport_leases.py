"""Lent memory behind the Xen transport: evictions, page-ins, several vCPUs faulting at once,
one vCPU stalled on a page-in while another is served, a lost lender, and the p2m seam."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import trio
import trio.testing

from devmodel.backend.device import DeviceBackend
from devmodel.leases.builtin_lender import BuiltinLender
from devmodel.leases.engine import EngineConfig
from devmodel.leases.policy import FailurePolicy
from devmodel.testing import FakeLender, SimHypervisor, memfd, pattern
from devmodel.xen.server import XenServer
from devmodel_wire.lease.constants import RevokeMode
from tests.xen.rig import APERTURE, BAR0, Rig, build_device, builtin_rig, serving

WINDOW = 64 << 10


@contextlib.asynccontextmanager
async def fake_rig(
    vcpus: int = 4, config: EngineConfig | None = None, **kwargs: object
) -> AsyncIterator[tuple[Rig, FakeLender, int]]:
    """The device with a FakeLender that lent the whole aperture in 64 KiB leases."""
    device, engine, counters = build_device(config=config)
    lender = FakeLender(engine)
    home = lender.own(memfd(APERTURE, fill=pattern(3, APERTURE)))
    for offset in range(0, APERTURE, WINDOW):
        lender.grant(offset, WINDOW, home)
    sim = SimHypervisor(vcpus=vcpus)
    try:
        async with serving(sim, device, counters, **kwargs) as server:
            rig = Rig(sim, device, engine, counters, server)
            await rig.enable()
            with trio.fail_after(10):  # a transport that stalls fails the test, never hangs it
                yield rig, lender, home
    finally:
        engine.close()
        lender.close()


async def test_evicted_window_reads_back_byte_identical_builtin_lender() -> None:
    async with builtin_rig() as rig:
        cpu = rig.cpu
        data = pattern(9, 4096)
        await cpu.write_bytes(BAR0 + 0x10000, data)
        window = rig.engine.window_at(0x10000)
        assert window is not None
        await rig.engine.revoke(window.lease_id, RevokeMode.EVICT)
        before = rig.counters.page_ins
        assert await cpu.read_bytes(BAR0 + 0x10000, 4096) == data
        assert rig.counters.page_ins == before + 1


async def test_several_vcpus_faulting_on_one_window_make_one_page_in() -> None:
    async with fake_rig() as (rig, lender, home):
        await rig.engine.revoke(lender.granted[2], RevokeMode.EVICT)
        expected = pattern(3, APERTURE)
        results: dict[int, bytes] = {}

        async def reader(v: int) -> None:
            at = 2 * WINDOW + v * 0x1000
            results[v] = (await rig.sim.cpus[v].read(BAR0 + at, 8)).to_bytes(8, "little")

        async with trio.open_nursery() as nursery:
            for v in range(4):
                nursery.start_soon(reader, v)
            pi = await lender.next_page_in()
            await trio.testing.wait_all_tasks_blocked()
            assert all(rig.server._busy)  # every vCPU is waiting on the same window
            assert lender.unanswered == []
            lender.answer(pi, home)
        assert len(lender.page_ins) == 1
        assert rig.counters.page_ins == 1
        for v in range(4):
            at = 2 * WINDOW + v * 0x1000
            assert results[v] == expected[at : at + 8]


async def test_a_vcpu_stalled_on_a_page_in_does_not_stall_another() -> None:
    async with fake_rig(vcpus=2) as (rig, lender, home):
        await rig.engine.revoke(lender.granted[0], RevokeMode.EVICT)
        stalled = rig.sim.cpus[0]
        other = rig.sim.cpus[1]
        done: list[int] = []

        async def slow() -> None:
            done.append(await stalled.read(BAR0, 8))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow)
            pi = await lender.next_page_in()
            # vCPU 0 waits for the lender; vCPU 1's accesses to a resident window complete.
            for i in range(20):
                await other.write(BAR0 + WINDOW + 8 * i, 8, i)
                assert await other.read(BAR0 + WINDOW + 8 * i, 8) == i
            assert done == []
            assert stalled.busy
            lender.answer(pi, home)
        assert done == [int.from_bytes(pattern(3, 8), "little")]


async def test_page_in_deadline_gives_the_failure_policy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = EngineConfig(page_in_timeout=1.0)
    async with fake_rig(vcpus=1, config=config) as (rig, lender, _home):
        await rig.engine.revoke(lender.granted[0], RevokeMode.EVICT)
        start = trio.current_time()
        assert await rig.cpu.read(BAR0, 4) == 0xFFFFFFFF
        assert trio.current_time() - start >= 1.0
        assert rig.counters.failed_accesses == 1


async def test_lender_lost_gives_the_failure_policy() -> None:
    for policy, expected in ((FailurePolicy.ALL_ONES, 0xFFFFFFFF), (FailurePolicy.ZEROS, 0)):
        async with fake_rig(vcpus=1, config=EngineConfig(policy=policy)) as (rig, _lender, _h):
            await rig.cpu.write(BAR0, 4, 0x12345678)
            rig.engine.lender_lost()
            assert await rig.cpu.read(BAR0, 4) == expected
            await rig.cpu.write(BAR0, 4, 1)  # dropped
            assert rig.counters.failed_accesses == 2
            assert rig.counters.lender_losses == 1


async def test_error_policy_reads_all_ones_under_xen() -> None:
    config = EngineConfig(policy=FailurePolicy.ERROR)
    async with fake_rig(vcpus=1, config=config) as (rig, _lender, _home):
        rig.engine.lender_lost()
        assert await rig.cpu.read(BAR0, 8) == (1 << 64) - 1
        await rig.cpu.write(BAR0, 8, 1)
        assert rig.counters.failed_accesses == 2


async def test_hostile_lender_evicting_after_every_grant_still_serves_every_fault() -> None:
    async with fake_rig(vcpus=2) as (rig, lender, home):
        await rig.engine.revoke(lender.granted[1], RevokeMode.EVICT)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: lender.serve(home, evict_after_grant=True))
            expected = pattern(3, APERTURE)
            for i in range(5):
                at = WINDOW + 8 * i
                got = await rig.sim.cpus[i % 2].read(BAR0 + at, 8)
                assert got.to_bytes(8, "little") == expected[at : at + 8]
            nursery.cancel_scope.cancel()
        assert rig.counters.page_ins == 5


class RecordingMapper:
    """A p2m mapper as the lending hypercall would drive it, recording what it is asked."""

    map_on_trap = True

    def __init__(self) -> None:
        self.events: list[tuple[str, int, int]] = []
        self.release = trio.Event()

    def window_trapped(self, bar0_base: int, offset: int) -> None:
        self.events.append(("trapped", bar0_base, offset))

    async def unmap(self, offset: int, length: int) -> None:
        self.events.append(("unmap", offset, length))
        await self.release.wait()

    def bar_moved(self, old_base: int | None, new_base: int | None) -> None:
        self.events.append(("moved", old_base or 0, new_base or 0))


async def test_the_p2m_seam_unmaps_before_a_revoke_completes() -> None:
    mapper = RecordingMapper()
    async with fake_rig(vcpus=1, mapper=mapper) as (rig, lender, _home):
        await rig.cpu.read(BAR0 + WINDOW, 8)
        assert mapper.events == [("moved", 0, BAR0), ("trapped", BAR0, WINDOW)]
        revoked = trio.Event()

        async def revoke() -> None:
            await rig.engine.revoke(lender.granted[1], RevokeMode.EVICT)
            revoked.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(revoke)
            await trio.testing.wait_all_tasks_blocked()
            assert mapper.events[-1] == ("unmap", WINDOW, WINDOW)
            assert not revoked.is_set()  # REVOKED waits for the p2m to be clean
            mapper.release.set()
        assert revoked.is_set()
        await rig.cpu.config_write(0x04, 2, 0)
        assert mapper.events[-1] == ("moved", BAR0, 0)
    assert rig.engine.unmap_hooks == []


async def test_builtin_lender_default_emulates_everything() -> None:
    device, engine, counters = build_device()
    lender = BuiltinLender(engine)
    lender.lend_everything()
    sim = SimHypervisor(vcpus=1)
    async with serving(sim, device, counters):
        assert len(engine.unmap_hooks) == 1
        window = engine.window_at(0)
        assert window is not None
        await engine.revoke(window.lease_id, RevokeMode.EVICT)  # the no-op unmap returns
    engine.close()
    lender.close()


async def test_a_vcpu_answered_after_a_wait_runs_the_follow_up() -> None:
    """An access that waited (a page-in) is answered by its vCPU's worker, which then runs
    what the device put off until the vCPU had its answer (DeviceBackend.follow_up: the
    page-in poll's PAGE_IN_DONE); an access answered at once needs none."""
    device, engine, counters = build_device()
    backend = DeviceBackend(device)
    lender = FakeLender(engine)
    home = lender.own(memfd(APERTURE, fill=pattern(3, APERTURE)))
    for offset in range(0, APERTURE, WINDOW):
        lender.grant(offset, WINDOW, home)
    answered: list[int] = []
    follow_ups: list[int] = []  # at each: how many requests the vCPUs had been answered
    servers: list[XenServer] = []

    def follow_up() -> None:
        workers = servers[0].workers
        assert workers is not None
        follow_ups.append(workers.served)

    backend.follow_up = follow_up
    sim = SimHypervisor(vcpus=1)
    try:
        async with serving(sim, backend, counters) as server:
            servers.append(server)
            rig = Rig(sim, device, engine, counters, server)
            await rig.enable()
            with trio.fail_after(10):
                await rig.cpu.read(BAR0, 8)  # resident: answered in the dispatcher
                assert follow_ups == []
                await rig.engine.revoke(lender.granted[0], RevokeMode.EVICT)

                async def reader() -> None:
                    answered.append(await rig.cpu.read(BAR0 + 8, 8))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(reader)
                    lender.answer(await lender.next_page_in(), home)
                assert answered == [int.from_bytes(pattern(3, APERTURE)[8:16], "little")]
                # Once, and after the answer: the answer that waited is already counted.
                assert server.workers is not None
                assert follow_ups == [server.workers.served]
    finally:
        engine.close()
        lender.close()
