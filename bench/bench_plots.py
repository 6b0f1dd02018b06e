"""PNG plots of a bench/run result: latency distributions, each figure next to its peers.

A median and a p99 per row say little about the shape: whether devmodel is slower everywhere
or only in its tail, whether polling moves the whole distribution or a mode of it. So each
plot shows, for every row it names, the latency CDF (left) and its tail as 1 - CDF on a log
scale (right), drawn from the quantiles bench/run keeps per latency row (`cdf`: pairs of
fraction and microseconds, 0 to 1 in steps of 0.005 and then 0.995, 0.999, 0.9999 and the
maximum). The rows of one plot were measured in the same run, interleaved, so they can be
compared; plots of different runs can not be, unless the runs used the same `--pin`.

matplotlib draws off screen (its object-oriented API on the Agg canvas: no display, no pyplot
state); it is the `bench` extra, imported only here.

The same CDFs are also drawn as text (plotext, also the `bench` extra): a PNG of one machine's
run is a generated file and stays out of the repository, but a text plot can be pasted into
docs/performance.md, read in a terminal, in a diff or over ssh, and compared line by line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

__all__ = ["PLOTS", "text_plots", "write_plots", "write_text_plots"]

# (file suffix, title, [(row key, label)]): the rows of one plot, measured in the same run.
PLOTS: Final[tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...]] = (
    (
        "trapped-read",
        "Trapped 8-byte BAR0 read from a C client, per server",
        (
            ("trapped_floor", "C do-nothing server (floor)"),
            ("trapped_lvu", "libvfio-user samples/server"),
            ("trapped_dm_off_vs_floor", "devmodel, polling off"),
            ("trapped_dm_on_vs_floor", "devmodel, polling on"),
        ),
    ),
    (
        "fault",
        "Lease path: a fault on an evicted window (instant lender process)",
        (
            ("resident_idle", "resident read, first after the evict"),
            ("resident_warm", "resident read, right after a fault"),
            ("fault_idle", "fault, first after the evict"),
            ("fault_warm", "fault, right after a resident read"),
        ),
    ),
    (
        "revoke",
        "Lease path: REVOKE -> REVOKED as the lender sees it",
        (
            ("ping", "PING -> PONG, idle (lease round trip)"),
            ("revoke_idle", "revoke, idle"),
            ("revoke_reads", "revoke under a client's reads"),
            ("revoke_posted", "revoke under reads + posted writes"),
        ),
    ),
)


def _curves(
    rows: Mapping[str, Mapping[str, Any]], wanted: Sequence[tuple[str, str]]
) -> list[tuple[str, int, list[float], list[float]]]:
    """(label with median and sample count, the count, microseconds, fractions) of each row
    measured."""
    out = []
    for key, label in wanted:
        row = rows.get(key)
        cdf = row.get("cdf") if row else None
        if not row or not cdf:
            continue
        fractions = [float(f) for f, _ in cdf]
        values = [float(v) for _, v in cdf]
        median, n = row.get("median"), int(row.get("n") or 0)
        shown = f"{label}: median {median:.1f} us" if median is not None else label
        out.append((f"{shown}, n={n}", n, values, fractions))
    return out


def write_plots(result: Mapping[str, Any], out_dir: Path, stem: str) -> list[Path]:
    """Draw every plot of PLOTS that has at least one measured row; the PNG files written
    (`out_dir/STEM-SUFFIX.png`)."""
    from matplotlib.figure import Figure  # noqa: PLC0415 (the bench extra, only when plotting)

    rows = {r["key"]: r for r in result.get("rows", [])}
    plan = result.get("plan") or {}
    pin = result.get("pin") or "split"
    subtitle = (
        f"{result.get('host', '?')}, {result.get('when', '?')}, "
        f"{plan.get('rounds', '?')} interleaved rounds, pinning: {pin}"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for suffix, title, wanted in PLOTS:
        curves = _curves(rows, wanted)
        if not curves:
            continue
        fig = Figure(figsize=(12, 4.8), layout="constrained")
        fig.suptitle(f"{title}\n{subtitle}", fontsize=10)
        cdf_ax, tail_ax = fig.subplots(1, 2)
        for label, n, values, fractions in curves:
            cdf_ax.step(values, fractions, where="post", label=label)
            # The tail: 1 - F, as far as the samples can tell (down to 1/n; beyond that a
            # quantile is just the maximum again).
            floor = 1.0 / max(1, n)
            tail = [(v, 1.0 - f) for v, f in zip(values, fractions, strict=True) if 1 - f >= floor]
            tail_ax.step([v for v, _ in tail], [t for _, t in tail], where="post", label=label)
        cdf_ax.set_xscale("log")
        cdf_ax.set_xlabel("latency (us, log scale)")
        cdf_ax.set_ylabel("fraction of samples <= latency")
        cdf_ax.set_ylim(0, 1)
        cdf_ax.grid(True, which="both", alpha=0.3)
        cdf_ax.legend(fontsize=7, loc="lower right")
        tail_ax.set_xscale("log")
        tail_ax.set_yscale("log")
        tail_ax.set_xlabel("latency (us, log scale)")
        tail_ax.set_ylabel("fraction of samples > latency (tail)")
        tail_ax.grid(True, which="both", alpha=0.3)
        path = out_dir / f"{stem}-{suffix}.png"
        fig.savefig(path, dpi=100)
        written.append(path)
    return written


# One glyph per curve, so the text plots need no colour.
_TEXT_MARKERS: Final = ("*", "o", "+", "x", "#", "%")


def _decades(lo: float, hi: float) -> list[int]:
    """The powers of ten (exponents) from below lo to above hi: ticks a reader can place on a
    log axis."""
    first = math.floor(math.log10(max(lo, 1e-3)))
    last = max(first + 1, math.ceil(math.log10(max(hi, 1e-3))))
    return list(range(first, last + 1))


def _quantile(values: Sequence[float], fractions: Sequence[float], q: float) -> float:
    """The smallest latency whose fraction reaches q (the maximum if none does)."""
    for value, fraction in zip(values, fractions, strict=True):
        if fraction >= q:
            return value
    return values[-1]


def _us_label(us: float) -> str:
    if us >= 1e6:
        return f"{us / 1e6:g} s"
    if us >= 1e3:
        return f"{us / 1e3:g} ms"
    return f"{us:g} us"


def text_plots(result: Mapping[str, Any], width: int = 78, height: int = 20) -> str:
    """Every plot of PLOTS that has a measured row, as text: the CDF on a log latency axis,
    one glyph per curve (the tail panel of the PNG is left out: its 1/n floor is too coarse
    to read in a few text rows)."""
    import plotext  # type: ignore[import-untyped]  # noqa: PLC0415 (untyped; the bench extra)

    rows = {r["key"]: r for r in result.get("rows", [])}
    blocks: list[str] = []
    for suffix, title, wanted in PLOTS:
        curves = _curves(rows, wanted)
        if not curves:
            continue
        fig = plotext.figure
        fig.clear()
        fig.plot_size(width, height)
        fig.theme("colorless")
        # The axis ends at the slowest curve's 99.9th percentile: the few samples beyond it
        # would squeeze the body of every curve into a few columns (the PNG's tail panel
        # shows them).
        lo = min(min(values) for _, _, values, _ in curves)
        hi = max(_quantile(values, fractions, 0.999) for _, _, values, fractions in curves)
        # The log axis is drawn as log10 of the latency on a linear one, with ticks at the
        # powers of ten: plotext's own log scale picks odd tick values.
        for (_, _, values, fractions), marker in zip(curves, _TEXT_MARKERS, strict=False):
            points = [(math.log10(max(v, 1e-3)), f) for v, f in zip(values, fractions, strict=True)
                      if v <= hi]
            fig.draw(fig.signal([x for x, _ in points], [f for _, f in points], marker=marker))
        # The legend goes under the plot, not over the curves (plotext draws it inside).
        legend = [
            f"    {marker} {label}"
            for (label, *_), marker in zip(curves, _TEXT_MARKERS, strict=False)
        ]
        exponents = _decades(lo, hi)
        axis = fig.ruler("x")
        axis.lim(exponents[0], exponents[-1])
        axis.ticks(exponents, [_us_label(10.0**e) for e in exponents])
        fig.ruler("y").lim(0, 1)
        fig.title(f"{suffix}: {title}")
        fig.label("latency (log scale, to the 99.9th percentile); y: fraction <= latency")
        text = plotext.uncolorize(str(fig.build()))
        blocks.append("\n".join([line.rstrip() for line in text.splitlines()] + legend))
    return "\n\n".join(blocks) + ("\n" if blocks else "")


def write_text_plots(result: Mapping[str, Any], out_dir: Path, stem: str) -> Path | None:
    """`out_dir/STEM-plots.txt` with text_plots' drawing, or None when nothing was measured."""
    text = text_plots(result)
    if not text:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}-plots.txt"
    path.write_text(text)
    return path
