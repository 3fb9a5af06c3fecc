"""What the plots show, prepared from run records alone (no matplotlib): results/plots.py draws it.

- one mapping from figure, test and parameter names to the plain words legends and axes use (``WORDS``);
- each series' points by guest memory size, read from the record's figures (a ratio figure is the test's own,
  over its floor measured in the same run: a baseline's point is the baseline's ratio over the baseline's floor);
- for each point a series lacks, why, from the record: skipped, failed, left out at collection (deselected),
  a measurement error, a figure not recorded, or no case at that size at all;
- WP fault service times re-bucketed from the engine's 1 µs histogram into log-spaced buckets, with their
  percentiles (results.stats.percentile, the one percentile of the project).

Every function here takes records (dicts as ``results.load.load_record`` returns them) and returns plain data,
so the tests check what a plot will show without looking at pixels.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from snapproof.results.load import host_label, incompleteness
from snapproof.results.record import LIMIT_SLACK, MEASUREMENT_ERRORS, fmt_bytes
from snapproof.results.stats import percentile

# -- plain words ------------------------------------------------------------------------------------------------

# The one place plots take their words from: a figure's (or fact's) name, a test function's name, a parameter
# id's non-size part -> what a reader calls it. A case's legend is its test's words with its parameter's
# words filled in ("live capture of memfd, 2 vCPUs writing"); a name missing here shows as the name itself,
# and tests/test_plots.py fails when a case the baseline plots has no words.
WORDS: dict[str, str] = {
    # figures and facts
    "arm_ratio_to_raw_ioctl": "engine arm / bare UFFDIO_WRITEPROTECT",
    "raw_writeprotect_ns": "bare UFFDIO_WRITEPROTECT on the same range",
    "copy_rate_ratio_to_memcpy": "copy rate / warm memcpy rate",
    "memcpy_ns": "warm memcpy of the same buffers",
    "copy_rate_ratio_to_batched_limit": "copy rate / bare batched copy + un-protect rate",
    "batched_copy_ns": "bare loop: copy a batch, un-protect it",
    "first_instruction_ratio_to_bare_map_private": "time to first instruction / bare MAP_PRIVATE + fresh VM",
    "bare_map_private_ns": "the image mapped MAP_PRIVATE by hand + a fresh VM, to HLT",
    "durable_capture_ns": "live capture into a durable snapshot file",
    "durable_capture_throughput_to_qemu_x": "durable capture throughput / QEMU background snapshot's",
    "durable_capture_ratio_to_durable_write": "durable capture / plain durable write of the same bytes",
    "plain_durable_write_ns": "plain durable write (the faster of page cache and O_DIRECT), guest running",
    "first_instruction_ratio_to_fresh_vm": "time to first instruction / fresh VM",
    "fresh_vm_ns": "a fresh VM over memory already in place, to HLT",
    "restore_to_working_set_ns": "time to the full working set",
    "pause_ratio_to_memcpy": "pause window / warm memcpy of all guest memory",
    "pause_ns": "pause window",
    "fault_service_hist_us": "WP fault service time (handler: message read -> page un-protected)",
    # test functions; {} is the parameter's words
    "test_benchmark_arm_cost": "engine arm, populated memfd",
    "test_benchmark_bulk_copy_rate": "bulk copy of memfd, guest idle",
    "test_live_snapshot_of_memfd_is_memory_at_the_arm_instant": "live capture of memfd, {}",
    "test_live_snapshot_of_other_backings_is_memory_at_the_arm_instant": "live capture of {} memory",
    "test_live_snapshot_of_thp_memory_is_memory_at_the_arm_instant_while_huge_pages_split_and_collapse":
        "live capture of {}, huge pages splitting",
    "test_live_snapshot_during_first_touch_is_memory_at_the_arm_instant": "live capture during first touch of {}",
    "test_benchmark_guest_wp_fault_round_trip": "guest write's WP fault, {}",
    "test_benchmark_time_to_first_instruction": "{}",
    "test_mid_execution_snapshot_resumes_to_the_uninterrupted_result": "{}",
    "test_benchmark_pause_window": "{}",
    # parameters (a test id without its size)
    "1vcpu": "1 vCPU writing",
    "2vcpus": "2 vCPUs writing",
    "memfd": "memfd",
    "anonymous": "anonymous",
    "hugetlb": "hugetlbfs",
    "anonymous-thp": "anonymous THP",
    "memfd-thp": "memfd THP",
    "same-cpu": "handler on the vCPU's CPU",
    "other-cpu": "handler on another CPU",
    "read-copy": "read-copy (file read into memory)",
    "map-private": "map-private (file mapped MAP_PRIVATE)",
    "lazy-uffd": "lazy-uffd (pages loaded on fault)",
    "stop-and-copy": "stop and copy",
    "wp-copy-before-write": "WP copy-before-write",
    "wp-prearmed": "WP pre-armed while the guest runs",
    "precopy-wp-async": "pre-copy, WP_ASYNC dirty tracking",
    "precopy-kvm-dirty-log": "pre-copy, KVM dirty log",
}


def words(name: str) -> str:
    """A figure's, test's or parameter's plain words; the name itself when ``WORDS`` has none."""
    return WORDS.get(name, name)


def case_words(function: str, variant: str) -> str | None:
    """A case's plain words (its test's, with its parameter's filled in), or None when ``WORDS`` lacks either."""
    template = WORDS.get(function)
    if template is None or (variant and variant not in WORDS) or ("{}" in template) != bool(variant):
        return None
    return template.format(WORDS[variant]) if variant else template


# -- cases: which series, which size ----------------------------------------------------------------------------

_SIZE = re.compile(r"\d+(?:KiB|MiB|GiB)")
_UNIT = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


@dataclass(frozen=True)
class CaseKey:
    """Where a case's value goes: its series (test function and parameter id without the size) and its size."""

    function: str
    variant: str
    size: int | None

    @property
    def series(self) -> tuple[str, str]:
        return (self.function, self.variant)

    @property
    def label(self) -> str:
        return case_words(self.function, self.variant) or (
            f"{self.function}[{self.variant}]" if self.variant else self.function)


def case_key(test: str, facts: dict[str, Any] | None = None, params: dict[str, Any] | None = None) -> CaseKey:
    """``test_benchmark_pause_window[64MiB-stop-and-copy]`` -> (test_benchmark_pause_window, stop-and-copy, 64 MiB).
    The size is the case's ``mem_size`` parameter or fact when it has one, else the size in its id."""
    function, _, rest = test.partition("[")
    parts = rest.removesuffix("]").split("-") if rest else []
    sizes = [p for p in parts if _SIZE.fullmatch(p)]
    variant = "-".join(p for p in parts if not _SIZE.fullmatch(p))
    size = None
    for source in (params, facts):
        if source and isinstance(source.get("mem_size"), int):
            size = int(source["mem_size"])
            break
    else:
        if len(sizes) == 1:
            size = int(sizes[0][:-3]) * _UNIT[sizes[0][-3:]]
    return CaseKey(function, variant, size)


def _params(rec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A benchmark case's pytest parameters, by test name (the record keeps them with its benchmarks)."""
    return {b["name"]: b.get("params") or {} for b in rec.get("benchmarks", [])}


# -- series of sized points ---------------------------------------------------------------------------------------

T = TypeVar("T")

# A size no case of the series was selected at: the record keeps why for cases its host or engine could not run
# (deselected), not for cases left out at collection by the command line or not parametrized at that size.
NOT_SELECTED = ("no case at this size in the run, and the record names no reason (left out at collection: opt-in "
                "--long, --max-size, -k, or a size only --sizes adds)")


@dataclass(frozen=True)
class Point:
    """A figure of one case: its median, the middle half of its rounds, and its floor's median in the same case."""

    value: float
    low: float | None = None       # the rounds' first and third quartiles (None: one value, no rounds)
    high: float | None = None
    floor: float | None = None     # the floor figure's median in the same case of the same run (its unit)
    absolute: float | None = None  # the median of the figure the ratio is of, same case (its unit)

    @property
    def spread(self) -> tuple[float, float]:
        """The middle half of the rounds; the value itself when there are no rounds."""
        return (self.value if self.low is None else self.low, self.value if self.high is None else self.high)


@dataclass
class Series(Generic[T]):
    """One line (or bar group) of a plot: its points by size, and why each size it lacks is missing."""

    key: tuple[str, str]
    label: str
    points: dict[int | None, T] = field(default_factory=dict)
    missing: dict[int | None, str] = field(default_factory=dict)   # size (None: a case of no known size) -> why


def _why_not_passed(case: dict[str, Any], rec: dict[str, Any]) -> str:
    outcome = case["outcome"]
    if outcome == "skipped":
        return f"skipped: {case.get('skip_reason', 'no reason recorded')}"
    if outcome == "not run":
        return f"did not finish: the run's record is {rec['run']['status']}"
    first = str(case.get("failure", "")).strip().splitlines()
    return f"{outcome}: {first[0] if first else 'no failure text recorded'}"


def measurement_error(case: dict[str, Any], figure: str) -> str | None:
    """Why the case's ``figure`` is a measurement error (the case marked it so), or None."""
    return next((e["why"] for e in case.get("facts", {}).get(MEASUREMENT_ERRORS, []) if e["figure"] == figure), None)


def gather(rec: dict[str, Any], phase: int, functions: Collection[str],
           value: Callable[[dict[str, Any]], T | str]) -> list[Series[T]]:
    """Series of ``phase``'s cases of the test ``functions``, in ``WORDS`` order: each passed case's ``value`` (or,
    as a string, why it has none), and why each case that did not pass, or was deselected, has no point."""
    out: dict[tuple[str, str], Series[T]] = {}
    params = _params(rec)

    def series(key: CaseKey) -> Series[T]:
        return out.setdefault(key.series, Series(key.series, key.label))

    for p in rec["phases"]:
        if p["phase"] != phase:
            continue
        for c in p["cases"]:
            key = case_key(c["test"], c.get("facts"), params.get(c["test"]))
            if key.function not in functions:
                continue
            got = value(c) if c["outcome"] == "passed" else _why_not_passed(c, rec)
            if isinstance(got, str):
                series(key).missing[key.size] = got
            else:
                series(key).points[key.size] = got
        for d in p.get("deselected", []):
            key = case_key(d["test"])
            if key.function in functions:
                series(key).missing[key.size] = f"left out: {d['reason']}"
    return sorted(out.values(), key=_word_order)


def _word_order(series: Series[Any]) -> tuple[int, int]:
    """Series in the order ``WORDS`` names their tests and parameters (a strategy keeps its colour whether or
    not the host could run the ones before it); names it lacks last, in record order (the sort is stable)."""
    order = {name: i for i, name in enumerate(WORDS)}
    function, variant = series.key
    return (order.get(function, len(order)), order.get(variant, len(order)))


def past_limit(name: str, value: float, limit: float | None) -> str | None:
    """Why a ratio to a host limit of the same run is no measurement (past ``limit``: a copy faster than the
    host's own warm memcpy), or None. The record's rule (results.record.LIMIT_SLACK), for figures a test records
    without checking it."""
    if limit is None or value <= limit:
        return None
    return (f"measurement error: {words(name)} = {value:.3g}, past the host's own limit measured in the same run "
            f"(at most {limit:g}): not a measurement")


def figure_value(name: str, floor: str | None = None, absolute: str | None = None,
                 limit: float | None = None) -> Callable[[dict[str, Any]], Point | str]:
    """A case's figure ``name`` as a point (median, its rounds' quartiles, and the medians of ``floor`` and
    ``absolute`` in the same case), or why there is none: a measurement error the case marked, a median past
    ``limit``, or no such figure."""
    def get(case: dict[str, Any]) -> Point | str:
        if (why := measurement_error(case, name)) is not None:
            return f"measurement error: {why}"
        figures = case.get("figures", {})
        if name not in figures:
            return f"the case recorded no {name}"
        fig = figures[name]
        if (why := past_limit(name, float(fig["median"]), limit)) is not None:
            return why

        def other(n: str | None) -> float | None:
            return float(figures[n]["median"]) if n is not None and n in figures else None

        samples = fig["samples"]
        return Point(float(fig["median"]), percentile(samples, 0.25), percentile(samples, 0.75), other(floor),
                     other(absolute))
    return get


def fact_value(name: str, limit: float | None = None) -> Callable[[dict[str, Any]], Point | str]:
    """A case's fact ``name`` (one number, no rounds) as a point, or why there is none (``limit``: as
    ``figure_value``'s)."""
    def get(case: dict[str, Any]) -> Point | str:
        if (why := measurement_error(case, name)) is not None:
            return f"measurement error: {why}"
        got = case.get("facts", {}).get(name)
        if not isinstance(got, int | float):
            return f"the case recorded no {name}"
        return past_limit(name, float(got), limit) or Point(float(got))
    return get


def expect_every_size(series: list[Series[T]]) -> list[Series[T]]:
    """Every series is expected at every size any series of the plot has: a size one lacks, with no case at
    all in the record, is missing for ``NOT_SELECTED``."""
    sizes = {s for x in series for s in [*x.points, *x.missing] if s is not None}
    for x in series:
        for size in sizes - set(x.points) - set(x.missing):
            x.missing[size] = NOT_SELECTED
    return series


def _short(text: str, limit: int = 170) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "\u2026"


def missing_notes(series: list[Series[Any]], what: str = "", kind: str = "series") -> list[str]:
    """One note per reason and the series it keeps out: which series lack a point, at which sizes, and why
    (``what``: the measure, when a plot shows more than one; ``kind``: what its series are, to say "all 3
    loaders"). In size order, then legend order."""
    by_size: dict[tuple[int, str], list[str]] = {}
    for x in series:
        for size, why in x.missing.items():
            by_size.setdefault((-1 if size is None else size, why), []).append(x.label)
    merged: dict[tuple[str, str], list[int]] = {}
    for (size, why), labels in sorted(by_size.items(), key=lambda kv: kv[0][0]):
        who = f"all {len(labels)} {kind}" if len(labels) > 1 and len(labels) == len(series) else "; ".join(labels)
        merged.setdefault((who, why), []).append(size)
    notes = []
    for (who, why), sizes in merged.items():
        named = [fmt_bytes(s) for s in sizes if s >= 0]
        where = f" at {', '.join(named[:-1])} and {named[-1]}" if len(named) > 1 else f" at {named[0]}" if named else ""
        notes.append(f"{what}{who}{where}: {_short(why)}")
    return notes


def baseline_only(run: Iterable[Series[Any]], base: Iterable[Series[Any]]) -> list[str]:
    """A note for each series the baseline has points of and the run has no case of at all."""
    have = {x.key for x in run}
    return [f"{x.label}: in the baseline, no case of it in this run" for x in base if x.key not in have and x.points]


# -- what each plot shows ---------------------------------------------------------------------------------------

ARM = "test_benchmark_arm_cost"
BULK_COPY = "test_benchmark_bulk_copy_rate"
# Phase 2's live captures: each records its copy rate over this run's warm memcpy (fact copy_rate_ratio_to_memcpy).
LIVE_CAPTURES = ("test_live_snapshot_of_memfd_is_memory_at_the_arm_instant",
                 "test_live_snapshot_of_other_backings_is_memory_at_the_arm_instant",
                 "test_live_snapshot_of_thp_memory_is_memory_at_the_arm_instant_while_huge_pages_split_and_collapse",
                 "test_live_snapshot_during_first_touch_is_memory_at_the_arm_instant")
COPY_RATIO = "copy_rate_ratio_to_memcpy"
FIRST_INSTRUCTION = "test_benchmark_time_to_first_instruction"
WORKING_SET = "test_mid_execution_snapshot_resumes_to_the_uninterrupted_result"
PAUSE_WINDOW = "test_benchmark_pause_window"


def arm_series(rec: dict[str, Any]) -> list[Series[Point]]:
    """Phase 1: the engine's arm over the bare UFFDIO_WRITEPROTECT on the same range in the same run."""
    return gather(rec, 1, {ARM}, figure_value("arm_ratio_to_raw_ioctl", floor="raw_writeprotect_ns",
                                              absolute="arm_ns"))


def copy_series(rec: dict[str, Any]) -> list[Series[Point]]:
    """Phase 2: the bulk copy (guest idle), then each live capture, at its rate over the same run's warm memcpy; a
    rate past ``LIMIT_SLACK`` times that memcpy is no measurement (the bulk copy's test marks it so itself, the
    live captures record theirs as facts unchecked)."""
    live = set(LIVE_CAPTURES) | {c["test"].partition("[")[0] for p in rec["phases"] if p["phase"] == 2
                                 for c in p["cases"] if COPY_RATIO in c.get("facts", {})}
    return (gather(rec, 2, {BULK_COPY}, figure_value(COPY_RATIO, floor="memcpy_ns", limit=LIMIT_SLACK))
            + gather(rec, 2, live, fact_value(COPY_RATIO, limit=LIMIT_SLACK)))


def restore_series(rec: dict[str, Any]) -> tuple[list[Series[Point]], list[Series[Point]]]:
    """Phase 3, per loader: the time to the first instruction over a fresh VM of the same run; the time to the full
    working set (no floor is measured for it). Both share one size axis: a size either has, every loader of each
    is expected at."""
    first = gather(rec, 3, {FIRST_INSTRUCTION}, figure_value("first_instruction_ratio_to_fresh_vm",
                                                             floor="fresh_vm_ns", absolute="first_instruction_ns"))
    ws = gather(rec, 3, {WORKING_SET}, fact_value("restore_to_working_set_ns"))
    expect_every_size(first + ws)
    return first, ws


def pause_series(rec: dict[str, Any]) -> list[Series[Point]]:
    """Phase 5, per strategy: the pause window over a warm memcpy of all guest memory in the same run; every
    strategy is expected at every size."""
    return expect_every_size(gather(rec, 5, {PAUSE_WINDOW}, figure_value("pause_ratio_to_memcpy", floor="memcpy_ns",
                                                                         absolute="pause_ns")))


# -- which run, which baseline ------------------------------------------------------------------------------------


def describe(rec: dict[str, Any], path: str | None = None) -> str:
    """A record named for a plot's footer: where it is, when it ran, its commit and host; and when it is no
    release run (incomplete, interrupted, fault-injection switches on), that too."""
    run = rec["run"]
    where = path or run.get("record") or "?"
    started = str(run.get("started", "?")).replace("T", " ").replace("+00:00", " UTC")
    out = f"{where} (run {started}, commit {run.get('git_commit') or '?'}, {host_label(rec)})"
    if why := incompleteness(rec):
        out += f"; NOT A WHOLE RUN: {_short(why, 90)}"
    if run.get("inject", "none") != "none":
        out += f"; fault injection {run['inject']}"
    return out


def baseline_refusal(run: dict[str, Any], base: dict[str, Any]) -> str | None:
    """Why ``base`` cannot be drawn beside ``run`` (a baseline of another host class: the gate's rule, figures
    of another class of host prove nothing about this one), or None."""
    from snapproof.results.gate import host_facts

    a, b = host_facts(run)["host_class"], host_facts(base)["host_class"]
    if a != b:
        return (f"the baseline's host {host_label(base)} is of host class {b!r}, the run's {host_label(run)} of "
                f"{a!r}: a baseline of another class of host is never drawn beside a run")
    return None


# -- fault service latency: log-spaced buckets and percentiles --------------------------------------------------

# The engine's histogram has 1 µs buckets, the last holding every longer service (native/snapproof_engine.h
# SPE_HIST_BUCKETS = 1024): its key 1023 means ">= 1023 µs".
OVERFLOW_US = 1023
# Buckets per doubling of the service time: fine enough to show a mode, coarse enough that a tail of a few
# faults in hundreds of microseconds still reads as a bar.
BUCKETS_PER_OCTAVE = 4


@dataclass(frozen=True)
class Bucket:
    """Services of ``low`` <= t < ``high`` µs. The first may hold < 1 µs (low 0) and the last the overflow (high
    infinite): on a log axis each is drawn one step wide beside the others (``drawn``)."""

    low: float
    high: float
    count: int
    what: str

    @property
    def drawn(self) -> tuple[float, float]:
        step = 2 ** (1 / BUCKETS_PER_OCTAVE)
        return (self.low or self.high / step, self.high if math.isfinite(self.high) else self.low * step)


def bucket_edges() -> list[int]:
    """Log-spaced bucket edges in whole µs from 1 to ``OVERFLOW_US``: 2^(i/4) rounded, so below 8 µs, where that
    step is under 1 µs, each bucket is one of the engine's 1 µs buckets."""
    edges = {round(2 ** (i / BUCKETS_PER_OCTAVE)) for i in range(BUCKETS_PER_OCTAVE * 10 + 1)}
    return sorted({e for e in edges if e < OVERFLOW_US} | {OVERFLOW_US})


def log_buckets(hist: dict[int, int]) -> list[Bucket]:
    """The engine's 1 µs histogram (µs -> faults) in log-spaced buckets; empty buckets left out."""
    edges = bucket_edges()
    counts = [0] * (len(edges) + 1)   # [< 1 µs], [edges[i], edges[i+1]) ..., [>= OVERFLOW_US]
    for us, n in hist.items():
        us = int(us)
        if us < 0:
            raise ValueError(f"fault service histogram: bucket {us} µs is negative")
        counts[0 if us < 1 else len(edges) if us >= OVERFLOW_US else _edge_index(edges, us) + 1] += int(n)
    out = []
    if counts[0]:
        out.append(Bucket(0, 1, counts[0], "< 1 µs"))
    for i in range(len(edges) - 1):
        if counts[i + 1]:
            out.append(Bucket(edges[i], edges[i + 1], counts[i + 1], f"{edges[i]}-{edges[i + 1]} µs"))
    if counts[-1]:
        out.append(Bucket(OVERFLOW_US, math.inf, counts[-1], f">= {OVERFLOW_US} µs (overflow)"))
    return out


def _edge_index(edges: list[int], us: int) -> int:
    """The i with edges[i] <= us < edges[i+1]."""
    lo, hi = 0, len(edges) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if edges[mid] <= us else (lo, mid)
    return lo


@dataclass(frozen=True)
class Mark:
    """A percentile of a 1 µs histogram: the engine's bucket it falls in, where to draw it, its label."""

    q: float
    bucket_us: int    # the percentile lies in [bucket_us, bucket_us + 1) µs; OVERFLOW_US: at or past it
    x: float          # where on the log axis: the middle of that 1 µs bucket, in log space
    label: str


def hist_mark(hist: dict[int, int], q: float) -> Mark:
    """Percentile ``q`` of the histogram, by results.stats.percentile over one sample per fault (its bucket)."""
    samples = [int(us) for us, n in sorted(hist.items(), key=lambda kv: int(kv[0])) for _ in range(int(n))]
    k = min(int(percentile(samples, q)), OVERFLOW_US)
    name = f"p{q * 100:g}"
    if k >= OVERFLOW_US:
        return Mark(q, k, OVERFLOW_US * 2 ** (1 / (2 * BUCKETS_PER_OCTAVE)), f"{name} >= {OVERFLOW_US} µs")
    if k < 1:
        return Mark(q, k, 2 ** (-1 / (2 * BUCKETS_PER_OCTAVE)), f"{name} < 1 µs")
    return Mark(q, k, math.sqrt(k * (k + 1)), f"{name} {k}-{k + 1} µs")


@dataclass
class Latency:
    """One histogram panel: the faults of its cases, merged."""

    label: str
    hist: dict[int, int]
    cases: int

    @property
    def faults(self) -> int:
        return sum(self.hist.values())

    def buckets(self) -> list[Bucket]:
        return log_buckets(self.hist)

    def marks(self) -> list[Mark]:
        return [hist_mark(self.hist, 0.5), hist_mark(self.hist, 0.99)]


HIST = "fault_service_hist_us"
ROUND_TRIP = "test_benchmark_guest_wp_fault_round_trip"


def latency_panels(rec: dict[str, Any]) -> tuple[list[Latency], list[str]]:
    """The fault-latency panels of a record: phase 1's round trip per handler placement, then every phase 2 live
    capture's faults merged; and a note for each round-trip case that has no histogram, or phase 2 having none."""
    panels: list[Latency] = []
    trips = gather(rec, 1, {ROUND_TRIP}, lambda c: c.get("facts", {}).get(HIST) or f"the case recorded no {HIST}")
    for s in trips:
        hist: dict[int, int] = {}
        for h in s.points.values():
            for us, n in h.items():
                hist[int(us)] = hist.get(int(us), 0) + int(n)
        if hist:
            panels.append(Latency(s.label, hist, len(s.points)))
    notes = missing_notes(trips)
    live: dict[int, int] = {}
    count = 0
    for p in rec["phases"]:
        if p["phase"] != 2:
            continue
        for c in p["cases"]:
            if h := c.get("facts", {}).get(HIST):
                count += 1
                for us, n in h.items():
                    live[int(us)] = live.get(int(us), 0) + int(n)
    if live:
        panels.append(Latency("live captures, storm guest writing (every phase 2 case)", live, count))
    else:
        outcome = next((p["outcome"] for p in rec["phases"] if p["phase"] == 2), "not in the record")
        notes.append(f"live captures (phase 2): no fault histogram in the run (phase 2 {outcome})")
    return panels, notes
