"""Phase reports: what a phase records while it runs, the YAML run record, and its text rendering.

A test records numbered stages; each stage states its checks (a failed check
raises AssertionError naming expected vs seen) and its timings. A figure worth
gating is recorded once, with every sample it was measured from
(``report.figure``): the gate judges it by those samples. The plugin
results/plugin.py turns the reports into the run record (``schema:
snapproof-run/2``, documented in results/README.md) and prints them with
``render_phase``, the same function ``python -m results show`` uses on a saved
record.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

SCHEMA = "snapproof-run/2"
OK_MARK = "\u2713"
FAIL_MARK = "\u2717"
# A figure this far past the host's own limit measured in the same run (a copy 1.5x as fast as a warm memcpy of
# the same size, an arm 1.5x as fast as the bare ioctl it issues) is no measurement: the round did not do the
# work it timed, or the clock did not see it. The case marks it (CaseReport.measurement_error) and the gate
# refuses it, instead of it standing as a record.
LIMIT_SLACK = 1.5
MEASUREMENT_ERRORS = "measurement_errors"


def fmt_ns(ns: float) -> str:
    """A duration in the unit a person reads: ns, µs, ms or s."""
    if ns < 1_000:
        return f"{ns:.0f} ns"
    if ns < 1_000_000:
        return f"{ns / 1e3:.1f} \u00b5s"
    if ns < 1_000_000_000:
        return f"{ns / 1e6:.1f} ms"
    return f"{ns / 1e9:.2f} s"


def fmt_value(v: float, unit: str) -> str:
    """A figure's value in the unit a person reads (its unit: one of FIGURE_UNITS)."""
    if unit == "ns":
        return fmt_ns(v)
    if unit == "x":
        return f"{v:.3g}x"
    if unit == "B/s":
        return f"{v / 1e9:.2f} GB/s"
    return f"{v:.4g}"


def fmt_bytes(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def _hexish(v: object) -> str:
    return f"{v:#x}" if isinstance(v, int) and not isinstance(v, bool) else repr(v)


@dataclass
class Check:
    ok: bool
    text: str


@dataclass
class Timing:
    name: str
    ns: float
    note: str = ""  # what the figure includes (warm / first touch), or its ratio to a host limit


@dataclass
class Stage:
    index: int
    name: str
    checks: list[Check] = field(default_factory=list)
    timings: list[Timing] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ok: bool | None = None
    elapsed_ns: int = 0

    def check(self, ok: bool, text: str, failure: str | None = None) -> None:
        """Record a check; a false one raises AssertionError with ``failure`` (expected vs seen)."""
        __tracebackhide__ = True
        self.checks.append(Check(bool(ok), text if ok else (failure or text)))
        if not ok:
            raise AssertionError(f"[stage {self.index}] {self.name}: {failure or text}")

    def equal(self, seen: object, want: object, what: str, fmt: Callable[[object], str] = _hexish) -> None:
        __tracebackhide__ = True
        self.check(seen == want, f"{what} = {fmt(seen)}", f"{what}: expected {fmt(want)}, saw {fmt(seen)}")

    def timing(self, name: str, ns: float, note: str = "") -> None:
        self.timings.append(Timing(name, float(ns), note))

    def note(self, text: str) -> None:
        self.notes.append(text)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.index,
            "name": self.name,
            "ok": self.ok,
            "elapsed_ns": self.elapsed_ns,
            "checks": [{"ok": c.ok, "text": c.text} for c in self.checks],
            "timings": [{"name": t.name, "ns": round(t.ns), **({"note": t.note} if t.note else {})}
                        for t in self.timings],
            "notes": list(self.notes),
        }


# What a figure's samples are: nanoseconds, a ratio to a floor measured in the same run ("x"), bytes per
# second, or a plain number (a byte ratio, a count).
FIGURE_UNITS = ("ns", "x", "B/s", "number")


@dataclass
class Figure:
    """One figure of a case, with every sample it was measured from (one a round).

    A ratio ("x") is each round's value over the median of its floor (memcpy, the bare ioctl, a plain
    run) measured in the same run, so a host's state between runs divides out; ``what`` says which floor.
    """

    samples: list[float]
    unit: str
    better: str = "lower"
    what: str = ""

    def __post_init__(self) -> None:
        if self.unit not in FIGURE_UNITS:
            raise ValueError(f"figure unit {self.unit!r}: one of {', '.join(FIGURE_UNITS)}")
        if self.better not in ("lower", "higher"):
            raise ValueError(f"figure better={self.better!r}: lower or higher")
        if not self.samples or not all(math.isfinite(v) for v in self.samples):
            raise ValueError(f"figure samples must be finite numbers, at least one: {self.samples[:5]!r}")

    def to_dict(self) -> dict[str, Any]:
        from results.stats import median

        return {"unit": self.unit, "better": self.better, "what": self.what,
                "median": _rounded(median(self.samples)), "samples": [_rounded(v) for v in self.samples]}


def _rounded(v: float) -> float | int:
    """Nanoseconds and byte rates as integers; ratios to 5 significant digits (the record stays readable)."""
    if float(v).is_integer() or abs(v) >= 1e5:
        return int(round(v))
    return float(f"{v:.5g}")


@dataclass
class CaseReport:
    nodeid: str
    name: str
    doc: str = ""
    outcome: str = "not run"  # passed / failed / skipped / error; not run: has not finished (yet)
    duration_ns: int = 0
    stages: list[Stage] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Figure] = field(default_factory=dict)
    failure: str = ""
    skip_reason: str = ""

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[Stage]:
        st = Stage(len(self.stages) + 1, name)
        self.stages.append(st)
        t0 = time.perf_counter_ns()
        try:
            yield st
        except BaseException:
            st.ok = False
            raise
        finally:
            st.elapsed_ns = time.perf_counter_ns() - t0
        st.ok = all(c.ok for c in st.checks)

    def fact(self, key: str, value: Any) -> None:
        self.facts[key] = value

    def measurement_error(self, figure: str, value: float, why: str) -> None:
        """Mark the case's ``figure`` a measurement error (``why``: the limit it is past, measured in the same run).
        The report shows it whatever the outcome, the record keeps it under ``measurement_errors``, and the gate
        refuses a run that has one: such a figure must never stand as a record."""
        self.facts.setdefault(MEASUREMENT_ERRORS, []).append({"figure": figure, "value": round(value, 4), "why": why})

    def figure(self, name: str, samples: list[float] | list[int], unit: str, better: str = "lower",
               what: str = "") -> Figure:
        """A figure the gate can judge: every round's sample, under the one name the policy and
        pytest-benchmark's extra_info use for it (the plugin copies its median there)."""
        fig = Figure([float(v) for v in samples], unit, better, what)
        self.figures[name] = fig
        return fig

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "test": self.name,
            "nodeid": self.nodeid,
            "claim": self.doc,
            "outcome": self.outcome,
            "duration_ns": self.duration_ns,
            "stages": [s.to_dict() for s in self.stages],
        }
        if self.facts:
            d["facts"] = self.facts
        if self.figures:
            d["figures"] = {name: f.to_dict() for name, f in self.figures.items()}
        if self.failure:
            d["failure"] = self.failure
        if self.skip_reason:
            d["skip_reason"] = self.skip_reason
        return d


@dataclass
class PhaseReport:
    number: int
    title: str
    cases: list[CaseReport] = field(default_factory=list)
    # Cases left out at collection for a capability the host lacks and its class does not require:
    # {test, nodeid, reason}. Not cases of the verdict: a phase of only these is NOT RUN, never PASS.
    deselected: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        cases = [c.to_dict() for c in self.cases]
        d: dict[str, Any] = {
            "phase": self.number,
            "title": self.title,
            "outcome": phase_outcome(cases),
            "duration_ns": sum(c.duration_ns for c in self.cases),
            "cases": cases,
        }
        if self.deselected:
            d["deselected"] = list(self.deselected)
        return d


def phase_outcome(cases: list[dict[str, Any]]) -> str:
    """PASS only when every case passed: a skip is never counted as a pass, nor a case that has not
    finished (``not run``: the record is written from the start of the run, and a run may end early)."""
    outcomes = [c["outcome"] for c in cases]
    if not outcomes or all(o == "not run" for o in outcomes):
        return "NOT RUN"
    if any(o in ("failed", "error") for o in outcomes):
        return "FAIL"
    if all(o == "passed" for o in outcomes):
        return "PASS"
    if any(o in ("passed", "not run") for o in outcomes):
        return "INCOMPLETE"
    return "SKIP"


def _dots(left: str, right: str, width: int = 78) -> str:
    pad = max(3, width - len(left) - len(right) - 2)
    return f"{left} {'.' * pad} {right}"


def render_phase(phase: dict[str, Any], verbose: bool = True) -> str:
    """The PASS report of one phase, from its record (live or loaded from YAML)."""
    cases = phase["cases"]
    counts: dict[str, int] = {}
    for c in cases:
        counts[c["outcome"]] = counts.get(c["outcome"], 0) + 1
    if phase.get("deselected"):
        counts["deselected"] = len(phase["deselected"])
    summary = ", ".join(f"{n} {o}" for o, n in sorted(counts.items()))
    head = _dots(f"[phase {phase['phase']}] {phase['title']}", f"{phase['outcome']}  {fmt_ns(phase['duration_ns'])}")
    lines = [head, f"  ({summary})"]
    for c in cases:
        mark = {"passed": "PASS", "failed": "FAIL", "error": "ERROR", "skipped": "SKIP",
                "not run": "NOT RUN"}.get(c["outcome"], "----")
        lines.append("  " + _dots(c["test"], f"{mark}  {fmt_ns(c['duration_ns'])}", 76))
        if c.get("skip_reason"):
            lines.append(f"      skipped: {c['skip_reason']}")
        for e in c.get("facts", {}).get(MEASUREMENT_ERRORS, []):
            lines.append(f"      MEASUREMENT ERROR: {e['figure']} = {e['value']}: {e['why']}")
        if not verbose and c["outcome"] == "passed":
            continue
        for s in c["stages"]:
            label = f"    [stage {s['stage']}] {s['name']}"
            if not s["checks"] and c["outcome"] == "skipped":  # stopped by the skip itself: not a failed stage
                lines.append(f"{label:<34} skipped")
                continue
            checks = s["checks"] or [{"ok": s["ok"] is not False, "text": "done"}]
            for i, chk in enumerate(checks):
                mark = OK_MARK if chk["ok"] else FAIL_MARK
                prefix = label if i == 0 else " " * len(label)
                lines.append(f"{prefix:<34} {chk['text']} {mark}" if i == 0 or len(label) <= 34
                             else f"{prefix} {chk['text']} {mark}")
            if s["timings"]:
                shown = "; ".join(f"{t['name']} {fmt_ns(t['ns'])}" + (f" ({t['note']})" if t.get("note") else "")
                                  for t in s["timings"])
                lines.append(f"{'':<34} timings: {shown}")
            for n in s.get("notes", []):
                lines.append(f"{'':<34} note: {n}")
        medians = [f"{name} {fmt_value(f['median'], f['unit'])}" for name, f in c.get("figures", {}).items()
                   if name != "round_ns"]
        if medians:
            rounds = len(next(iter(c["figures"].values()))["samples"])
            lines.append(f"{'':<34} figures (median of {rounds}): {'; '.join(medians)}")
        if c.get("failure"):
            lines.append(f"      failure: {c['failure']}")
    for d in phase.get("deselected", []):
        lines.append("  " + _dots(d["test"], "DESELECTED", 76))
        lines.append(f"      {d['reason']}")
    return "\n".join(lines)
