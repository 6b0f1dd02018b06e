"""bench/bench_plots.py draws PNG files from a bench/run result (a small synthetic one here; no
timing is measured or asserted), and bench_run.py keeps what it needs: a CDF per latency row."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """bench/ is no package: load a script as a module (registered, as dataclasses need)."""
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def synthetic_result(bench_run: ModuleType) -> dict[str, Any]:
    """A result as bench/run writes it, from made-up samples (seconds), through its own code."""
    rng = random.Random(7)
    res = bench_run.Results()
    for key, mean_us in (
        ("trapped_floor", 4),
        ("trapped_dm_off_vs_floor", 30),
        ("trapped_dm_on_vs_floor", 20),
        ("resident", 30),
        ("resident_idle", 40),
        ("resident_warm", 25),
        ("fault", 90),
        ("fault_idle", 95),
        ("fault_warm", 85),
        ("ping", 25),
        ("revoke_idle", 35),
    ):
        samples = [rng.expovariate(1 / mean_us) * 1e-6 + 1e-6 for _ in range(500)]
        res.latency(key, key, samples)
    # Not measured in this run: no curve, and the plot is drawn without it.
    res.missing("trapped_lvu", "trapped read: libvfio-user samples/server", "us", "not built")
    plan = bench_run.Plan(2, 400, 50, 2000, 16, 1, 1.0, 3, 50)
    data: dict[str, Any] = bench_run.to_json(res, plan, [0, 1], 1.0, "split")
    back: dict[str, Any] = json.loads(json.dumps(data))  # as read back from the file
    return back


def test_latency_rows_keep_a_cdf(monkeypatch: pytest.MonkeyPatch) -> None:
    bench_run = load("bench_run", monkeypatch)
    data = synthetic_result(bench_run)
    rows = {r["key"]: r for r in data["rows"]}
    cdf = rows["fault"]["cdf"]
    fractions = [f for f, _ in cdf]
    values = [v for _, v in cdf]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and 0.999 in fractions
    assert values == sorted(values)
    assert values[fractions.index(0.5)] == pytest.approx(rows["fault"]["median"], rel=0.05)
    assert rows["trapped_lvu"]["cdf"] is None
    # Older results without `cdf` still load (for --compare and --results).
    for row in data["rows"]:
        del row["cdf"]
    assert bench_run.from_json(data).rows["fault"].cdf is None


def test_plots_are_png_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench_run = load("bench_run", monkeypatch)
    plots = load("bench_plots", monkeypatch)
    written = plots.write_plots(synthetic_result(bench_run), tmp_path / "plots", "run-x")
    names = sorted(p.name for p in written)
    assert names == ["run-x-fault.png", "run-x-revoke.png", "run-x-trapped-read.png"]
    for path in written:
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 10_000


def test_a_plot_with_no_measured_row_is_not_drawn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plots = load("bench_plots", monkeypatch)
    assert plots.write_plots({"rows": []}, tmp_path, "empty") == []
    assert list(tmp_path.iterdir()) == []


def test_text_plots_draw_each_curve_where_its_samples_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bench_run = load("bench_run", monkeypatch)
    plots = load("bench_plots", monkeypatch)
    path = plots.write_text_plots(synthetic_result(bench_run), tmp_path, "run-x")
    assert path == tmp_path / "run-x-plots.txt"
    text = path.read_text()
    assert "\x1b" not in text  # no colour codes: it is pasted into docs
    blocks = text.split("\n\n")
    assert [b.split(":")[0].strip() for b in blocks] == ["trapped-read", "fault", "revoke"]
    trapped = blocks[0].splitlines()
    # The legend under the plot names each measured curve with its glyph and median; the row
    # that was not measured (libvfio-user) has no curve.
    legend = [line.strip() for line in trapped if line.startswith("    ") and ": median" in line]
    assert [line[:2] for line in legend] == ["* ", "o ", "+ "]
    assert "libvfio-user" not in blocks[0]
    # Ticks at powers of ten, read as latencies.
    assert any("1 us" in line and "10 us" in line and "100 us" in line for line in trapped)
    # Where the median row crosses each curve: the floor (about 4 us) left of devmodel with
    # polling off (about 30 us) on a log axis.
    median_row = next(line for line in trapped if line.startswith("0.50"))
    assert 0 < median_row.index("*") < median_row.index("o")
    assert len(max(trapped, key=len)) <= 78


def test_no_text_plot_without_a_measured_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plots = load("bench_plots", monkeypatch)
    assert plots.write_text_plots({"rows": []}, tmp_path, "empty") is None
    assert list(tmp_path.iterdir()) == []
