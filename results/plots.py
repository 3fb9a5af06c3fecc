"""PNG plots of a run record, with a baseline beside it (matplotlib, Agg backend): what ``--plots`` and
``snapproof results plots`` write. What each shows is prepared in results/plotdata.py; this module only draws.

- ``arm_cost_vs_size.png``: the engine's arm over the bare UFFDIO_WRITEPROTECT of the same run, vs size (phase 1);
- ``copy_rate_vs_size.png``: bulk copy and live capture rates over warm memcpy of the same run, vs size (phase 2);
- ``fault_service_latency.png``: WP fault service times in log-spaced buckets, p50 and p99 marked (phases 1, 2);
- ``restore_vs_size.png``: time to first instruction over a fresh VM of the same run, and time to the full
  working set, per loader and size (phase 3);
- ``pause_window_per_strategy.png``: pause window over warm memcpy of all guest memory, per strategy and size
  (phase 5).

Each plot names the run and the baseline it shows (file, start time, commit, host), draws the baseline's value
beside each of the run's (hollow, dashed), and says under the axes which points are missing and why. A plot
with no figures in the record is not written; the reason is returned instead.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapproof.results.load import RecordError
from snapproof.results.plotdata import (
    BULK_COPY,
    COPY_RATIO,
    OVERFLOW_US,
    Latency,
    Point,
    Series,
    arm_series,
    baseline_only,
    baseline_refusal,
    copy_series,
    describe,
    latency_panels,
    missing_notes,
    pause_series,
    restore_series,
    words,
)
from snapproof.results.record import fmt_bytes, fmt_ns

# The baseline's marker sits this factor to the right of the run's on a log2 size axis: beside it, not on it.
BASE_SHIFT = 2 ** 0.12
BASE_STYLE: dict[str, Any] = {"markerfacecolor": "white", "linestyle": "--", "linewidth": 1, "alpha": 0.75}
NOTE_WIDTH = 150   # characters a footer line holds at the figure's width
LINE_IN = 0.15     # inches a footer line takes


@dataclass
class Sources:
    """The run a plot shows, the baseline beside it (or None), and how the footer names each."""

    run: dict[str, Any]
    base: dict[str, Any] | None = None
    run_name: str | None = None
    base_name: str | None = None

    def footer(self, notes: list[str]) -> list[tuple[str, str]]:
        """A plot's footer lines, wrapped, each with its colour: what is missing (``notes``), then the run and
        the baseline."""
        lines = [(f"missing: {n}", "firebrick") for n in notes]
        lines.append((f"run: {describe(self.run, self.run_name)}", "0.2"))
        lines.append((f"baseline: {describe(self.base, self.base_name)}" if self.base is not None
                      else "baseline: none given (snapproof results plots RUN.yaml --baseline BASE.yaml draws one)",
                      "0.2"))
        return [(w, color) for line, color in lines for w in textwrap.wrap(line, NOTE_WIDTH, subsequent_indent="    ")]


def _figure(src: Sources, notes: list[str], title: str, nrows: int = 1, ncols: int = 1, height: float = 5.0,
            width: float = 10.0, **kw: Any) -> tuple[Any, Any]:
    """A figure with room under its axes for the footer (``notes``, then which run and baseline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    footer = len(src.footer(notes))
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height + footer * LINE_IN + 0.2), dpi=110,
                             squeeze=False, **kw)
    fig.suptitle(title, fontsize=12)
    for ax in axes.flat:
        ax.grid(True, which="both", alpha=0.3)
    return fig, axes


def _save(fig: Any, src: Sources, notes: list[str], path: Path) -> Path:
    import matplotlib.pyplot as plt

    lines = src.footer(notes)
    height = fig.get_size_inches()[1]
    bottom = (len(lines) * LINE_IN + 0.25) / height
    fig.tight_layout(rect=(0, bottom, 1, 1))
    for i, (line, color) in enumerate(reversed(lines)):
        fig.text(0.01, (0.08 + i * LINE_IN) / height, line, fontsize=7, color=color)
    fig.savefig(path)
    plt.close(fig)
    return path


def _size_axis(ax: Any, sizes: set[int]) -> None:
    ax.set_xscale("log", base=2)
    ticks = sorted(sizes)
    ax.set_xticks(ticks)
    ax.set_xticklabels([fmt_bytes(s) for s in ticks])
    ax.minorticks_off()
    if ticks:
        ax.set_xlim(ticks[0] / 2 ** 0.5, ticks[-1] * 2 ** 0.6)
    ax.set_xlabel("guest memory")


def _sizes(*groups: list[Series[Point]]) -> set[int]:
    return {s for g in groups for x in g for s in [*x.points, *x.missing] if s is not None}


def _plot_series(ax: Any, series: Series[Point], color: str, base: Series[Point] | None,
                 style: str = "o-") -> list[tuple[int, Point]]:
    """The run's points of a series, bars over the middle half of their rounds, the baseline's beside them;
    returns the run's points."""
    pts = sorted((s, p) for s, p in series.points.items() if s is not None)
    if not pts:   # still in the legend, so a baseline point of it has a name
        ax.errorbar([], [], fmt=style, color=color, label=f"{series.label} (none in this run: see below)")
    for marker_at, got, kw in ((1.0, pts, {"fmt": style, "label": series.label}),
                               (BASE_SHIFT, sorted((s, p) for s, p in (base.points if base else {}).items()
                                                   if s is not None), {"fmt": style[0], **BASE_STYLE})):
        if not got:
            continue
        xs = [s * marker_at for s, _ in got]
        ys = [p.value for _, p in got]
        err = [[p.value - p.spread[0] for _, p in got], [p.spread[1] - p.value for _, p in got]]
        ax.errorbar(xs, ys, yerr=err, color=color, capsize=3, markersize=7, **kw)
    return pts


def _baseline_legend(src: Sources, marker: str = "o", linestyle: str = "--") -> list[Any]:
    """A legend entry saying what the hollow markers are (none without a baseline)."""
    if src.base is None:
        return []
    from matplotlib.lines import Line2D

    style: dict[str, Any] = {"marker": marker, "linestyle": linestyle}
    return [Line2D([], [], color="0.4", markerfacecolor="white", **style,
                   label=f"baseline, commit {src.base['run'].get('git_commit') or '?'} (hollow"
                         f"{', dashed' if linestyle != 'none' else ''})")]


def _legend(ax: Any, src: Sources, outside: bool = False, marker: str = "o", linestyle: str = "--",
            **kw: Any) -> None:
    handles, _ = ax.get_legend_handles_labels()
    handles += _baseline_legend(src, marker, linestyle)
    if outside:
        ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), **kw)
    else:
        ax.legend(handles=handles, fontsize=8, **kw)


def _base_by_key(series: list[Series[Point]] | None) -> dict[tuple[str, str], Series[Point]]:
    return {x.key: x for x in series or []}


def _no_points(series: list[Series[Point]]) -> bool:
    return not any(s is not None for x in series for s in x.points)


def _skip_reason(what: str, notes: list[str]) -> str:
    return f"{what}{': ' + notes[0] if notes else ''}"


# -- the plots ----------------------------------------------------------------------------------------------------

def arm_cost(src: Sources, out: Path) -> Path | str:
    run, base = arm_series(src.run), arm_series(src.base) if src.base else None
    notes = missing_notes(run) + baseline_only(run, base or [])
    if _no_points(run):
        return _skip_reason("no arm-cost figures (phase 1, test_benchmark_arm_cost: arm_ratio_to_raw_ioctl) in the "
                            "record", notes)
    fig, axes = _figure(src, notes, "Arm cost over the bare UFFDIO_WRITEPROTECT ioctl of the same run")
    ax = axes[0][0]
    bases = _base_by_key(base)
    top = 1.5
    for i, x in enumerate(run):
        for size, p in _plot_series(ax, x, f"C{i}", bases.get(x.key)):
            top = max(top, p.spread[1] * 1.15)
            floor = f"\nioctl {fmt_ns(p.floor)}" if p.floor is not None else ""
            ax.annotate(f"{p.value:.2f}x{floor}", (size, p.spread[1]), textcoords="offset points",
                        xytext=(0, 8), ha="center", fontsize=8)
    ax.axhline(1, color="0.3", linestyle=":", label="1 = the bare ioctl on the same range, same run")
    _size_axis(ax, _sizes(run, base or []))
    ax.set_ylim(0, top)
    ax.set_ylabel(f"{words('arm_ratio_to_raw_ioctl')}\n(median; bars: middle half of the rounds)")
    _legend(ax, src, loc="upper left")
    return _save(fig, src, notes, out / "arm_cost_vs_size.png")


def copy_rate(src: Sources, out: Path) -> Path | str:
    run, base = copy_series(src.run), copy_series(src.base) if src.base else None
    notes = missing_notes(run) + baseline_only(run, base or [])
    if _no_points(run):
        return _skip_reason("no copy-rate figures (phase 2: copy_rate_ratio_to_memcpy) in the record", notes)
    fig, axes = _figure(src, notes, "Copy rate over warm memcpy of the same run: bulk copy (guest idle) and live "
                        "captures", width=12)
    ax = axes[0][0]
    bases = _base_by_key(base)
    top = 1.2
    markers = "osD^v<>ph*"
    for i, x in enumerate(run):
        style = f"{markers[i % len(markers)]}{'-' if x.key[0] == BULK_COPY else ':'}"
        for size, p in _plot_series(ax, x, f"C{i}", bases.get(x.key), style=style):
            top = max(top, p.spread[1] * 1.1)
            if p.floor is not None and size:
                ax.annotate(f"memcpy {size / p.floor:.1f} GB/s", (size, p.value), textcoords="offset points",
                            xytext=(0, 10), ha="center", fontsize=7)
    ax.axhline(1, color="0.3", linestyle=":", label="1 = warm memcpy, same size, same run (host limit)")
    _size_axis(ax, _sizes(run, base or []))
    ax.set_ylim(0, top)
    ax.set_title("bulk copy: median, bars the middle half of its rounds; live capture: one capture each",
                 fontsize=9)
    ax.set_ylabel(words(COPY_RATIO))
    _legend(ax, src, outside=True)
    return _save(fig, src, notes, out / "copy_rate_vs_size.png")


def fault_latency(src: Sources, out: Path) -> Path | str:
    run, notes = latency_panels(src.run)
    base = {b.label: b for b in latency_panels(src.base)[0]} if src.base else {}
    have = {p.label for p in run}
    notes = notes + [f"{label}: in the baseline, not in this run" for label in base if label not in have]
    if not run:
        return _skip_reason("no fault service histograms (fact fault_service_hist_us, phases 1 and 2) in the record",
                            notes)
    fig, axes = _figure(src, notes, words("fault_service_hist_us"), nrows=len(run), height=1.2 + 2.3 * len(run),
                        sharex=True)
    step = 2 ** 0.25
    for i, (ax, panel) in enumerate(zip(axes[:, 0], run, strict=True)):
        color = f"C{i}"
        title = f"{panel.label}: {_faults(panel)}"
        _hist(ax, panel, color)
        # p50 on the top row, p99 on the next: close percentiles never print over each other.
        for row, m in enumerate(panel.marks()):
            ax.axvline(m.x, color=color, linewidth=1.5)
            ax.annotate(m.label, (m.x, 1), xycoords=("data", "axes fraction"), xytext=(3, -12 - 12 * row),
                        textcoords="offset points", fontsize=8, color=color, fontweight="bold",
                        bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})
        if (b := base.get(panel.label)) is not None:
            _hist(ax, b, "0.3", outline=True)
            for m in b.marks():
                ax.axvline(m.x, color="0.3", linestyle="--", linewidth=1)
            title += f"\nbaseline (dashed outline and lines): {_faults(b)}, {', '.join(m.label for m in b.marks())}"
        ax.set_title(title, fontsize=9, loc="left")
        ax.set_yscale("log")
        ax.set_ylim(0.5 / max(panel.faults, 1), 1.5)
        ax.set_ylabel("share of faults")
    ax = axes[-1][0]
    ax.set_xscale("log", base=2)
    ax.set_xlim(1 / step, OVERFLOW_US * step)
    ticks = [2 ** k for k in range(11)]
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel(f"service time, µs: log-spaced buckets, 4 per doubling (under 8 µs each is the engine's 1 µs bucket; "
                  f"the last holds >= {OVERFLOW_US} µs)", fontsize=9)
    return _save(fig, src, notes, out / "fault_service_latency.png")


def _faults(panel: Latency) -> str:
    return f"{panel.faults} faults in {panel.cases} case{'s' if panel.cases != 1 else ''}"


def _hist(ax: Any, panel: Latency, color: str, outline: bool = False) -> None:
    """The panel's log-spaced buckets as bars over their intervals, each its share of the panel's faults (so a
    baseline with another number of faults compares)."""
    buckets = panel.buckets()
    shares = [b.count / panel.faults for b in buckets]
    style: dict[str, Any] = ({"fill": False, "edgecolor": color, "linestyle": "--", "linewidth": 1} if outline
                             else {"color": color, "alpha": 0.6})
    ax.bar([b.drawn[0] for b in buckets], shares, width=[b.drawn[1] - b.drawn[0] for b in buckets], align="edge",
           **style)


def restore(src: Sources, out: Path) -> Path | str:
    first, ws = restore_series(src.run)
    base_first, base_ws = restore_series(src.base) if src.base else ([], [])
    notes = (missing_notes(first, "first instruction, ", "loaders") + missing_notes(ws, "full working set, ", "loaders")
             + baseline_only(first, base_first) + baseline_only(ws, base_ws))
    if _no_points(first) and _no_points(ws):
        return _skip_reason("no restore figures in the record (phase 3: first_instruction_ratio_to_fresh_vm, fact "
                            "restore_to_working_set_ns)", notes)
    fig, axes = _figure(src, notes, "Restore into a fresh VM, per loader", ncols=2, height=5.2, width=13)
    sizes = _sizes(first, ws, base_first, base_ws)
    colors = {loader: f"C{i}" for i, loader in enumerate(dict.fromkeys(x.key[1] for x in [*first, *ws]))}
    ax = axes[0][0]
    for x in first:
        _plot_series(ax, x, colors[x.key[1]], _base_by_key(base_first).get(x.key))
    floor = _floor_range(first)
    if src.base is not None and (base_floor := _floor_range(base_first)):
        floor += f", baseline's {base_floor}"
    ax.axhline(1, color="0.3", linestyle=":", label=f"1 = a fresh VM over memory in place, same run ({floor})")
    ax.set_yscale("log")
    ax.set_title("time to first instruction / fresh VM\n(median; bars: middle half of the rounds)", fontsize=10)
    ax.set_ylabel(words("first_instruction_ratio_to_fresh_vm"))
    _size_axis(ax, sizes)
    handles = ax.get_legend_handles_labels()[0]
    ax = axes[0][1]
    for x in ws:
        _plot_series(ax, x, colors[x.key[1]], _base_by_key(base_ws).get(x.key), style="s--")
    ax.set_yscale("log")
    ax.set_title("time to the full working set, ms\n(one resume each; no floor is measured for it)", fontsize=10)
    ax.set_ylabel("ms")
    ax.yaxis.set_major_formatter(_scaled(1e-6))
    _size_axis(ax, sizes)
    # One legend for both panels (a loader has one colour in each): right of them, clear of the points.
    ax.legend(handles=handles + _baseline_legend(src), fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return _save(fig, src, notes, out / "restore_vs_size.png")


def _floor_range(series: list[Series[Point]]) -> str:
    """The floor's median over a plot's cases (a range when they differ by more than 5%), or ''."""
    floors = [p.floor for x in series for p in x.points.values() if p.floor is not None]
    if not floors:
        return ""
    lo, hi = min(floors), max(floors)
    return fmt_ns(lo) + (f" to {fmt_ns(hi)}" if hi > lo * 1.05 else "")


def _scaled(factor: float) -> Any:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _pos: f"{v * factor:g}")


def pause_windows(src: Sources, out: Path) -> Path | str:
    run, base = pause_series(src.run), pause_series(src.base) if src.base else None
    notes = missing_notes(run) + baseline_only(run, base or [])
    if _no_points(run):
        return _skip_reason("no pause-window figures (phase 5, test_benchmark_pause_window: pause_ratio_to_memcpy) "
                            "in the record", notes)
    sizes = sorted(_sizes(run))
    fig, axes = _figure(src, notes, "Pause window over a warm memcpy of all guest memory (same run), storm guest "
                        "writing", height=5.5, width=11)
    ax = axes[0][0]
    bases = _base_by_key(base)
    width = 0.8 / len(run)
    top = 1.0
    for i, x in enumerate(run):
        xs = [k + (i - (len(run) - 1) / 2) * width for k in range(len(sizes))]
        b = bases.get(x.key)
        for at, size in zip(xs, sizes, strict=True):
            p = x.points.get(size)
            if p is None:
                ax.annotate("missing\n(below)", (at, 0), xycoords=("data", "axes fraction"), xytext=(0, 4),
                            textcoords="offset points", ha="center", fontsize=6, color="firebrick")
                continue
            ax.bar(at, p.value, width, color=f"C{i}", yerr=[[p.value - p.spread[0]], [p.spread[1] - p.value]],
                   capsize=2, error_kw={"elinewidth": 0.8})
            top = max(top, p.spread[1])
            text = fmt_ns(p.absolute) if p.absolute is not None else f"{p.value:.2g}x"
            ax.annotate(text, (at, p.spread[1]), xytext=(0, 2), textcoords="offset points", ha="center",
                        fontsize=7)
            if b is not None and (bp := b.points.get(size)) is not None:
                ax.plot(at + width * 0.3, bp.value, "D", color="0.25", markerfacecolor="white", markersize=5)
    ax.axhline(1, color="0.3", linestyle=":", label="1 = a warm memcpy of all guest memory, same run")
    ax.set_xticks(range(len(sizes)))
    ax.set_xticklabels([fmt_bytes(z) for z in sizes])
    ax.set_xlabel("guest memory (bar labels: the pause window's median)")
    ax.set_yscale("log")
    ax.set_ylim(top=top * 40)   # room above the bars for the legend
    ax.set_ylabel(f"{words('pause_ratio_to_memcpy')}\n(median; bars: middle half of the snapshots)")
    # Each strategy's legend entry, whether or not it has a bar (a strategy the host lacks is named below).
    from matplotlib.patches import Patch

    handles = [*ax.get_legend_handles_labels()[0],
               *[Patch(color=f"C{i}", label=x.label if x.points else f"{x.label} (none in this run: see below)")
                 for i, x in enumerate(run)], *_baseline_legend(src, "D", "none")]
    ax.legend(handles=handles, fontsize=8, loc="upper left", ncols=2)
    return _save(fig, src, notes, out / "pause_window_per_strategy.png")


PLOTS: tuple[Callable[[Sources, Path], Path | str], ...] = (arm_cost, copy_rate, fault_latency, restore, pause_windows)


def write_plots(rec: dict[str, Any], out_dir: str | Path, baseline: dict[str, Any] | None = None, *,
                run_name: str | None = None, baseline_name: str | None = None) -> list[tuple[str, Path | str]]:
    """Every plot the record has figures for: (plot name, PNG path or the reason it was skipped). ``baseline``
    (a record of the same host class, else RecordError) is drawn beside the run; the names say where each
    record is (default: the path the record was written to)."""
    if baseline is not None and (why := baseline_refusal(rec, baseline)):
        raise RecordError(why)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    got: list[tuple[str, Path | str]] = []
    for fn in PLOTS:
        got.append((fn.__name__, fn(Sources(rec, baseline, run_name, baseline_name), out)))
    return got

