"""Random request streams from several vCPUs at once: the device never crashes, every slot is
answered, and plain BAR0 accesses keep behaving like memory whatever else is going on.

Config cycles to our function stay away from the command register and the BARs: turning
decoding off is legal, and would (rightly) send the checker's accesses elsewhere."""

from __future__ import annotations

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devmodel_wire.xen import IoReq, IoreqState
from tests.xen.rig import APERTURE, BAR0, BAR2, builtin_rig

ADDRS = st.one_of(
    st.integers(BAR0 - 16, BAR0 + 64),
    st.integers(BAR0 + APERTURE - 64, BAR0 + APERTURE + 16),
    st.integers(BAR2 - 8, BAR2 + 4100),
    st.sampled_from([0, 0x1000, (0x1E << 35) | 0x2C, (0x1E << 35) | 0x3C, (3 << 35), 2**64 - 8]),
    st.integers(0, 2**64 - 1),
)

REQUESTS = st.builds(
    IoReq,
    addr=ADDRS,
    data=st.one_of(st.integers(0, 0x1F000), st.integers(0, 2**64 - 1)),
    count=st.one_of(st.integers(0, 5), st.sampled_from([4096, 2**32 - 1])),
    size=st.one_of(st.sampled_from([1, 2, 4, 8]), st.integers(0, 2**32 - 1)),
    vp_eport=st.just(0),
    state=st.just(IoreqState.READY),
    data_is_ptr=st.booleans(),
    dir=st.integers(0, 1),
    df=st.booleans(),
    type=st.one_of(st.sampled_from([0, 1, 2, 7, 8]), st.integers(0, 255)),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(streams=st.lists(st.lists(REQUESTS, max_size=12), min_size=3, max_size=3))
def test_random_streams_are_all_answered(streams: list[list[IoReq]]) -> None:
    async def main() -> None:
        async with builtin_rig(vcpus=4) as rig:
            answered = [0, 0, 0]
            memory_ok: list[bool] = []

            async def stream(v: int, reqs: list[IoReq]) -> None:
                for req in reqs:
                    done = await rig.sim.cpus[v].send(req)
                    assert done.state == IoreqState.RESP_READY
                    answered[v] += 1

            async def checker() -> None:
                cpu = rig.sim.cpus[3]
                for i in range(10):
                    at = BAR0 + 0x20000 + 8 * i
                    await cpu.write(at, 8, i * 0x0101010101010101)
                    memory_ok.append(await cpu.read(at, 8) == i * 0x0101010101010101)

            async with trio.open_nursery() as nursery:
                for v in range(3):
                    nursery.start_soon(stream, v, streams[v])
                nursery.start_soon(checker)
            assert answered == [len(s) for s in streams]
            assert all(memory_ok) and len(memory_ok) == 10
            assert rig.sim.mappings_open == 0
            assert not any(rig.server._busy)

    trio.run(main)
