"""devmodel/metrics/: histograms, the engine's timing hook, Prometheus text, the commands."""

from __future__ import annotations

import dataclasses
import re

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.parser import text_string_to_metric_families

from devmodel.control import commands
from devmodel.control.instance import (
    LinkLenderView,
)
from devmodel.counters import DeviceCounters
from devmodel.leases.engine import LeaseEngine
from devmodel.leases.lender_link import LenderLink
from devmodel.leases.states import WindowState
from devmodel.metrics.exposition import CONTENT_TYPE, exposition
from devmodel.metrics.histogram import BUCKETS, Histogram
from devmodel_wire.control import Command, CommandFailed
from devmodel_wire.lease.constants import RevokeMode
from tests.unit.control_support import MiB, call, client, make


def test_histogram_buckets_and_quantiles() -> None:
    h = Histogram("access")
    for ns in (100, 255, 256, 1000, 1000, 1000, 10**6, 10**12):
        h.record(ns)
    assert h.count == 8 and h.min_ns == 100 and h.max_ns == 10**12
    assert h.counts[0] == 2  # under 256 ns
    assert h.counts[1] == 1  # [256, 512)
    assert h.counts[BUCKETS - 1] == 1  # overflow
    assert h.quantile_ns(0.5) == 1024  # the bucket bound over 1000 ns
    assert h.quantile_ns(1.0) == 10**12
    d = h.as_dict()
    buckets = d["buckets"]
    assert isinstance(buckets, list)
    assert d["count"] == 8 and buckets[0] == [256, 2] and buckets[-1] == [None, 1]
    assert Histogram("x").quantile_ns(0.5) == 0


def test_exposition_is_valid_prometheus_text() -> None:
    c = DeviceCounters(trapped_reads=5)
    h = Histogram("access")
    h.record(3000)
    text = exposition(
        c,
        [h],
        {"leases": ("live", 3), "windows": ("by state", {"resident": 2.0, "evicted": 1.0})},
        {"domid": '7"\\'},
    )
    assert 'devmodel_trapped_reads_total{domid="7\\"\\\\"} 5' in text
    assert "# TYPE devmodel_access_seconds histogram" in text
    assert re.search(r'devmodel_access_seconds_bucket\{domid="[^}]*",le="\+Inf"\} 1', text)
    assert 'devmodel_windows{domid="7\\"\\\\",state="evicted"} 1.0' in text
    line = re.compile(r"^(# (HELP|TYPE) \S+ .+|[a-z_]+(\{[^}]*\})? [0-9.e+-]+)$")
    for row in text.splitlines():
        assert line.match(row), row
    buckets = [int(m) for m in re.findall(r"_bucket\{[^}]*\} (\d+)", text)]
    assert buckets == sorted(buckets)  # cumulative


async def test_accesses_faults_and_revokes_are_timed() -> None:
    engine, lender, inst = make()
    timing = inst.timing  # the engine's timing hook holds the histograms
    await engine.write(0, b"abcdefgh")
    assert await engine.read(0, 8) == b"abcdefgh"
    assert timing.access_latency.count == 2 and timing.fault_latency.count == 0
    await engine.revoke(1, RevokeMode.EVICT)
    assert timing.revoke_latency.count == 1
    assert engine.window_at(0).state is WindowState.EVICTED  # type: ignore[union-attr]
    assert await engine.read(0, 8) == b"abcdefgh"  # paged in by the built-in lender
    assert timing.fault_latency.count == 1 and engine.in_flight == 0
    assert await engine.drain(0.1)
    engine.close()
    lender.close()


async def test_query_windows_filters_and_pages() -> None:
    engine, lender, inst = make()
    page = await call(inst, "query-windows", limit=2)
    assert isinstance(page, dict)
    assert [w["start"] for w in page["windows"]] == [0, 2 * MiB] and page["next"] == 4 * MiB
    rest = await call(inst, "query-windows", cursor=page["next"])
    assert isinstance(rest, dict) and len(rest["windows"]) == 2 and rest["next"] is None
    assert await call(inst, "evict", offset=2 * MiB + 5) == {"evicted": [2]}
    evicted = await call(inst, "query-windows", state="evicted")
    assert isinstance(evicted, dict) and [w["lease"] for w in evicted["windows"]] == [2]
    ranged = await call(inst, "query-windows", start=4 * MiB, end=6 * MiB)
    assert isinstance(ranged, dict) and [w["start"] for w in ranged["windows"]] == [4 * MiB]
    leases = await call(inst, "query-leases", limit=3)
    assert isinstance(leases, dict) and [x["state"] for x in leases["leases"]] == [
        "resident",
        "evicted",
        "resident",
    ]
    assert leases["live"] == 3 and leases["next"] == 6 * MiB
    engine.close()
    lender.close()


async def test_testing_aids_policy_and_unknown_commands() -> None:
    engine, lender, inst = make()
    assert await call(inst, "evict", all=True) == {"evicted": [1, 2, 3, 4]}
    assert engine.lease_count == 0
    assert await call(inst, "set-policy", policy="zeros") == {"old": "all-ones", "policy": "zeros"}
    await engine.read(0, 8)  # pages lease 1's range back in under a new lease
    revoked = await call(inst, "revoke", lease=5, mode="release")
    assert revoked == {"revoked": [5], "mode": "release"}
    assert await engine.read(0, 8) == bytes(8)  # vacant now: the zeros policy
    cases: list[tuple[str, dict[str, object], str]] = [
        ("evict", {}, "exactly one"),
        ("revoke", {"lease": 99}, "no lease 99"),
        ("nope", {}, "has not been found"),
        ("python", {"code": "1"}, "--debug-console"),
        ("set-policy", {"policy": "maybe"}, "must be one of"),
    ]
    for name, args, words in cases:
        try:
            await call(inst, name, **args)
        except CommandFailed as exc:
            assert words in exc.desc
        else:
            raise AssertionError(f"{name} {args} did not fail")
    # An external lender owns its leases: the same instance, with the lender link instead.
    link = LenderLink(LeaseEngine(8 * MiB, 2 * MiB, DeviceCounters()), "/nonexistent", 1)
    inst = dataclasses.replace(inst, lender=LinkLenderView(link))
    try:
        await call(inst, "evict", all=True)
    except CommandFailed as exc:
        assert exc.error_class == "NotSupported"
    engine.close()
    lender.close()


async def test_stats_metrics_config_and_console() -> None:
    engine, lender, inst = make()
    inst.settings.debug_console = True
    stats = await call(inst, "query-stats")
    assert isinstance(stats, dict) and set(stats["latency"]) == {"access", "fault", "revoke"}
    assert stats["polling"] == {
        "max_us": inst.settings.poll_max_us,
        "hits": 0,
        "misses": 0,
        "cpu_ns": 0,
        "page_in": {
            "max_us": inst.settings.page_in_poll_max_us,
            "hits": 0,
            "misses": 0,
            "cpu_ns": 0,
        },
    }
    assert {"poll_hits", "poll_misses", "poll_ns"} <= set(stats["counters"])
    assert {"page_in_poll_hits", "page_in_poll_misses", "page_in_poll_ns"} <= set(
        stats["counters"]
    )
    metrics = await call(inst, "query-metrics")
    assert isinstance(metrics, dict) and "devmodel_grants_total" in str(metrics["text"])
    names = await call(inst, "query-commands")
    assert isinstance(names, list) and "python" in {c["name"] for c in names}
    c = client()
    one = await commands.execute(inst, c, Command("python", {"code": "x = engine.lease_count"}))
    two = await commands.execute(inst, c, Command("python", {"code": "x"}))
    assert one == {"output": ""} and two == {"output": "", "result": "4"}
    boom = await commands.execute(inst, c, Command("python", {"code": "1/0"}))
    assert isinstance(boom, dict) and "ZeroDivisionError" in str(boom["error"])
    tree = await commands.execute(inst, c, Command("python", {"code": "print(tasks())"}))
    assert isinstance(tree, dict) and "test_stats_metrics_config_and_console" in str(tree)
    await call(inst, "quit")
    engine.close()
    lender.close()


async def test_collector_output_reads_back_with_prometheus_clients_own_parser() -> None:
    engine, lender, inst = make()
    await engine.read(0, 8)
    await engine.revoke(2, RevokeMode.EVICT)
    await engine.read(2 * MiB, 8)  # a fault: paged in again
    text = inst.metrics.render().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    # Counters: the parser names the family without _total; every device counter is there.
    for name, value in inst.counters.as_dict().items():
        family = families[f"devmodel_{name}"]
        assert family.type == "counter"
        (sample,) = family.samples
        assert sample.name == f"devmodel_{name}_total" and sample.value == value
        assert sample.labels == {"domid": "0"}
        assert not [s for s in family.samples if s.name.endswith("_created")]
    windows = families["devmodel_windows"]
    assert windows.type == "gauge"
    by_state = {s.labels["state"]: s.value for s in windows.samples}
    assert by_state["resident"] == 4 and set(by_state) == set(commands.STATES)
    assert families["devmodel_leases"].samples[0].value == 4
    assert families["devmodel_aperture_bytes"].samples[0].value == 8 * MiB
    for name, count in (("access", 2), ("fault", 1), ("revoke", 1)):
        family = families[f"devmodel_{name}_seconds"]
        assert family.type == "histogram"
        buckets = [s for s in family.samples if s.name.endswith("_bucket")]
        assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == count
        values = [s.value for s in buckets]
        assert values == sorted(values)  # cumulative
        bounds = [float(s.labels["le"]) for s in buckets]
        assert bounds == sorted(bounds) and bounds[0] == 256e-9
        by_name = {s.name: s.value for s in family.samples}
        assert by_name[f"devmodel_{name}_seconds_count"] == count
        assert by_name[f"devmodel_{name}_seconds_sum"] > 0
    engine.close()
    lender.close()


def test_gauges_are_read_at_every_collect() -> None:
    engine, lender, inst = make()
    before = {f.name: f for f in inst.metrics.collect()}
    assert before["devmodel_control_clients"].samples[0].value == 0
    engine.lender_lost()
    after = {f.name: f for f in inst.metrics.collect()}
    assert after["devmodel_leases"].samples[0].value == 0
    lost = {s.labels["state"]: s.value for s in after["devmodel_windows"].samples}
    assert lost["lost"] == 4
    engine.close()
    lender.close()


def test_content_type_is_prometheus_clients_text_format() -> None:
    # Declared without importing prometheus_client (it is imported at the first rendering).
    assert CONTENT_TYPE == CONTENT_TYPE_PLAIN_0_0_4
