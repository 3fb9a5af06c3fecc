"""PNG plots of a run record (matplotlib, Agg backend): what ``--plots`` and ``python -m results plots`` write.

Each plot reads the record only (case figures and facts), so a record from any host plots the same way:

- ``arm_cost_vs_size.png``: the engine's arm and the bare UFFDIO_WRITEPROTECT ioctl vs guest memory size (phase 1);
- ``copy_rate_vs_size.png``: bulk copy rate, quiet and with the guest writing, vs size, against warm memcpy (phase 2);
- ``fault_service_latency.png``: histogram of WP fault service times (phases 1 and 2);
- ``restore_vs_size.png``: restore time to first instruction and to the full working set vs size, per loader (phase 3);
- ``pause_window_per_strategy.png``: pause window per snapshot strategy and size (phase 5).

A plot whose figures are not in the record is skipped, and the reason is returned.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from results.load import cases, host_label
from results.record import fmt_bytes, fmt_ns

_SIZE_ID = re.compile(r"\[(?:[^\]]*-)?(\d+)(KiB|MiB|GiB)(?:-[^\]]*)?\]")
_UNIT = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
LOADERS = ("read-copy", "map-private", "lazy-uffd")  # native.restore.LOADERS (not imported: Linux-only module)


def size_of(test: str, params: dict[str, Any] | None = None) -> int | None:
    """A case's guest memory size: its ``mem_size`` parameter, else the ``[64MiB]`` part of its id."""
    if params and isinstance(params.get("mem_size"), int):
        return int(params["mem_size"])
    m = _SIZE_ID.search(test)
    return int(m.group(1)) * _UNIT[m.group(2)] if m else None


def _size_axis(ax: Any, sizes: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(sizes)))
    ax.set_xticklabels([fmt_bytes(s) for s in sorted(set(sizes))])
    ax.set_xlabel("guest memory")


def _figure(rec: dict[str, Any], title: str) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    ax.set_title(title, fontsize=12)
    fig.text(0.01, 0.01, f"snapproof run {rec['run'].get('started', '')} on {host_label(rec)}", fontsize=7,
             color="0.4")
    ax.grid(True, which="both", alpha=0.3)
    return fig, ax


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def _median_of(c: dict[str, Any], name: str) -> float | None:
    fig = c.get("figures", {}).get(name)
    return float(fig["median"]) if fig else None


def arm_cost(rec: dict[str, Any], out: Path) -> Path | str:
    rows = []
    for c in cases(rec, 1, "test_benchmark_arm_cost*"):
        size = size_of(c["test"])
        arm = _median_of(c, "arm_ns")
        if size and arm is not None:
            rows.append((size, arm, _median_of(c, "raw_writeprotect_ns")))
    if not rows:
        return "no arm-cost figures (phase 1, test_benchmark_arm_cost: arm_ns) in the record"
    rows.sort()
    fig, ax = _figure(rec, "Arm cost vs size (populated memfd)")
    sizes = [r[0] for r in rows]
    ax.plot(sizes, [r[1] / 1e6 for r in rows], "o-", label="engine arm (median)")
    floors = [r[2] for r in rows]
    if all(f is not None for f in floors):
        ax.plot(sizes, [(f or 0) / 1e6 for f in floors], "s--", label="bare UFFDIO_WRITEPROTECT (median)")
    for s, a, _ in rows:
        ax.annotate(f"{fmt_ns(a)}\n{a * (1 << 30) / s / 1e6:.1f} ms/GiB", (s, a / 1e6), textcoords="offset points",
                    xytext=(6, -18), fontsize=8)
    _size_axis(ax, sizes)
    ax.set_yscale("log")
    ax.set_ylabel("ms")
    ax.legend()
    return _save(fig, out / "arm_cost_vs_size.png")


def copy_rate(rec: dict[str, Any], out: Path) -> Path | str:
    quiet = []
    live: dict[str, list[tuple[int, float]]] = defaultdict(list)
    memcpy = None
    for c in cases(rec, 2, "test_benchmark_bulk_copy_rate*"):
        size = size_of(c["test"])
        copy_ns, memcpy_ns = _median_of(c, "bulk_copy_ns"), _median_of(c, "memcpy_ns")
        if size and copy_ns:
            quiet.append((size, size / (copy_ns / 1e9)))
            if memcpy_ns:
                memcpy = size / (memcpy_ns / 1e9)
    for c in cases(rec, 2):
        f = c.get("facts", {})
        size = f.get("mem_size") or size_of(c["test"])
        if size and "copy_rate_bytes_per_s" in f:
            kind = c["test"].split("[", 1)[0].removeprefix("test_live_snapshot_")
            kind = kind.removesuffix("_is_memory_at_the_arm_instant")
            live[kind.replace("_", " ")].append((size, f["copy_rate_bytes_per_s"]))
    if not quiet and not live:
        return "no copy-rate figures (phase 2) in the record"
    fig, ax = _figure(rec, "Bulk copy rate vs size")
    if quiet:
        quiet.sort()
        ax.plot([q[0] for q in quiet], [q[1] / 1e9 for q in quiet], "o-", label="bulk copy, guest idle (median)")
    for marker, (kind, pts) in zip("x+*^v", sorted(live.items()), strict=False):
        ax.plot([v[0] for v in pts], [v[1] / 1e9 for v in pts], marker, markersize=9, linestyle="none",
                label=f"storm guest writing: {kind}")
    if memcpy:
        ax.axhline(memcpy / 1e9, color="0.3", linestyle=":", label=f"warm memcpy {memcpy / 1e9:.1f} GB/s (host limit)")
    _size_axis(ax, [q[0] for q in quiet] + [v[0] for pts in live.values() for v in pts])
    ax.set_ylabel("GB/s")
    ax.set_ylim(bottom=0)
    ax.legend()
    return _save(fig, out / "copy_rate_vs_size.png")


def fault_latency(rec: dict[str, Any], out: Path) -> Path | str:
    series: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for c in cases(rec):
        hist = c.get("facts", {}).get("fault_service_hist_us")
        if not hist:
            continue
        label = "phase 1 guest WP fault round trip" if "round_trip" in c["test"] else "phase 2 live snapshot faults"
        for us, n in hist.items():
            series[label][int(us)] += int(n)
    if not series:
        return "no fault service histograms (fact fault_service_hist_us, phases 1 and 2) in the record"
    fig, ax = _figure(rec, "WP fault service latency (handler: message read -> page un-protected)")
    for label, hist in sorted(series.items()):
        xs = sorted(hist)
        total = sum(hist.values())
        # Bucket i holds [i, i+1) µs: drawn as bars over that interval on a log axis.
        ax.bar([x + 1 for x in xs], [hist[x] for x in xs], width=[-1.0 if x else -0.5 for x in xs], align="edge",
               alpha=0.6, label=f"{label} ({total} faults)")
    ax.set_yscale("log")
    ax.set_xscale("log")
    ax.set_xlabel("service time, µs (1 µs buckets; the last bucket is overflow)")
    ax.set_ylabel("faults")
    ax.legend()
    return _save(fig, out / "fault_service_latency.png")


def restore(rec: dict[str, Any], out: Path) -> Path | str:
    first: dict[str, list[tuple[int, float]]] = defaultdict(list)
    full: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for c in cases(rec, 3):
        f = c.get("facts", {})
        loader = f.get("loader") or next((x for x in LOADERS if f"[{x}-" in c["test"] or f"-{x}]" in c["test"]), None)
        size = f.get("mem_size") or size_of(c["test"])
        if not loader or not size:
            continue
        if (first_ns := _median_of(c, "first_instruction_ns")) is not None:
            first[loader].append((size, first_ns))
        ws = f.get("time_to_full_working_set_ns", f.get("restore_to_working_set_ns"))
        if ws is not None:
            full[loader].append((size, ws))
    if not first and not full:
        return ("no restore figures in the record (phase 3 case figure first_instruction_ns, facts "
                "time_to_full_working_set_ns or restore_to_working_set_ns, per loader and size)")
    fig, ax = _figure(rec, "Restore: time to first instruction and to full working set, per loader")
    sizes = []
    for i, loader in enumerate(sorted(set(first) | set(full))):
        color = f"C{i}"
        for data, style, what in ((first, "o-", "first instruction"), (full, "s--", "full working set")):
            pts = sorted(data.get(loader, []))
            if pts:
                sizes += [p[0] for p in pts]
                ax.plot([p[0] for p in pts], [p[1] / 1e6 for p in pts], style, color=color, label=f"{loader}: {what}")
    _size_axis(ax, sizes)
    ax.set_yscale("log")
    ax.set_ylabel("ms")
    ax.legend(fontsize=8)
    return _save(fig, out / "restore_vs_size.png")


def pause_windows(rec: dict[str, Any], out: Path) -> Path | str:
    rows = [r for c in cases(rec, 5) for r in c.get("facts", {}).get("strategies", [])]
    if not rows:
        return "no strategy rows (phase 5 fact strategies) in the record"
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    sizes = sorted({r["size"] for r in rows})
    fig, ax = _figure(rec, "Pause window per snapshot strategy (storm guest writing)")
    width = 0.8 / len(strategies)
    for i, s in enumerate(strategies):
        ys = [next((r["pause_ns"] / 1e6 for r in rows if r["strategy"] == s and r["size"] == z), 0) for z in sizes]
        xs = [k + (i - (len(strategies) - 1) / 2) * width for k in range(len(sizes))]
        bars = ax.bar(xs, ys, width, label=s)
        for bar, y in zip(bars, ys, strict=True):
            if y:
                ax.annotate(f"{y:.2f}" if y < 10 else f"{y:.0f}", (bar.get_x() + bar.get_width() / 2, y),
                            ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(sizes)))
    ax.set_xticklabels([fmt_bytes(z) for z in sizes])
    ax.set_xlabel("guest memory")
    ax.set_yscale("log")
    ax.set_ylabel("pause window, ms (kick -> resume)")
    ax.legend(fontsize=8)
    return _save(fig, out / "pause_window_per_strategy.png")


PLOTS = (arm_cost, copy_rate, fault_latency, restore, pause_windows)


def write_plots(rec: dict[str, Any], out_dir: str | Path) -> list[tuple[str, Path | str]]:
    """Every plot the record has figures for: (plot name, PNG path or the reason it was skipped)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [(fn.__name__, fn(rec, out)) for fn in PLOTS]
