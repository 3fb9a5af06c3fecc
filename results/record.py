"""Phase reports: what a phase records while it runs, the YAML run record, and its text rendering.

A test records numbered stages; each stage states its checks (a failed check
raises AssertionError naming expected vs seen), its timings, the performance
targets it judged (``st.target``: never an assertion, a miss is drawn MISSED)
and, for long work, its progress (``st.progress``, results/progress.py). A
figure worth gating is recorded once, with every sample it was measured from
(``report.figure``): the gate judges it by those samples. The plugin
results/plugin.py turns the reports into the run record (``schema:
snapproof-run/2``, documented in results/README.md) and prints them with
``render_phase``, the same function ``snapproof results show`` uses on a saved
record: each case's claim (its docstring), its stages, why it failed in words
(results/explain.py), every line within the terminal's width.
"""

from __future__ import annotations

import contextlib
import math
import re
import shutil
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from snapproof.results.explain import explain
from snapproof.results.hostbusy import summary as hostbusy_summary

if TYPE_CHECKING:
    from snapproof.results.progress import Progress, ProgressDisplay

SCHEMA = "snapproof-run/2"
OK_MARK = "\u2713"
FAIL_MARK = "\u2717"
# A figure this far past the host's own limit measured in the same run (a copy 1.5x as fast as a warm memcpy of
# the same size, an arm 1.5x as fast as the bare ioctl it issues) is no measurement: the round did not do the
# work it timed, or the clock did not see it. The case marks it (CaseReport.measurement_error) and the gate
# refuses it, instead of it standing as a record.
LIMIT_SLACK = 1.5
MEASUREMENT_ERRORS = "measurement_errors"
# Performance targets a case was judged against (CaseReport.target), a list in its facts: never assertions
# (timings never are), but a miss is drawn MISSED and counted in the phase's summary.
TARGETS = "targets"

# Report widths, in columns: the terminal's (pytest's own, for the run's report), never below MIN_WIDTH;
# DEFAULT_WIDTH where there is no terminal to ask.
DEFAULT_WIDTH = 120
MIN_WIDTH = 60
# A stage's label takes LABEL_COLUMN columns with its checks beside it when the report is at least
# COLUMN_LAYOUT_MIN_WIDTH wide; narrower, the label gets a line of its own and its checks go under it.
LABEL_COLUMN = 34
COLUMN_LAYOUT_MIN_WIDTH = 100


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
    case: CaseReport | None = field(default=None, repr=False, compare=False)

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

    def target(self, what: str, seen: float, target: float, unit: str, better: str = "lower",
               source: str = "") -> bool:
        """Judge ``seen`` against a performance target of this stage (``CaseReport.target``); returns whether it
        was met. Never an assertion: a miss is drawn ``MISSED target`` here and counted in the phase summary."""
        if self.case is None:
            raise ValueError(f"[stage {self.index}] {self.name}: a target needs the stage's case report")
        return self.case.target(what, seen, target, unit, better, source, stage=self.index)

    def progress(self, total: int, what: str = "", poll: Callable[[], int] | None = None) -> Progress:
        """How far this stage's long work got, shown on the terminal while the stage runs longer than a few
        seconds: call the result with the bytes just done, or give ``poll`` (bytes done so far, called from the
        display's thread: it must be safe while the work runs, and what it reads must outlive the stage)."""
        from snapproof.results.progress import Progress

        progress = Progress(total, what, poll)
        if self.case is not None and self.case.display is not None:
            self.case.display.attach(progress)
        return progress

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
        from snapproof.results.stats import median

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
    host_busy: dict[str, Any] | None = None  # what others took of the host while it ran (results/hostbusy.py)
    # Where the run shows what is running now (results/plugin.py sets it); None: nothing is shown.
    display: ProgressDisplay | None = field(default=None, repr=False, compare=False)
    _open_stage: int | None = field(default=None, init=False, repr=False, compare=False)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[Stage]:
        st = Stage(len(self.stages) + 1, name, case=self)
        self.stages.append(st)
        outer, self._open_stage = self._open_stage, st.index
        if self.display is not None:
            self.display.now_running(self.name, f"[stage {st.index}] {name}")
        t0 = time.perf_counter_ns()
        try:
            yield st
        except BaseException:
            st.ok = False
            raise
        finally:
            st.elapsed_ns = time.perf_counter_ns() - t0
            self._open_stage = outer
            if self.display is not None:
                self.display.now_running(self.name, f"after [stage {st.index}]")
        st.ok = all(c.ok for c in st.checks)

    def fact(self, key: str, value: Any) -> None:
        self.facts[key] = value

    def measurement_error(self, figure: str, value: float, why: str) -> None:
        """Mark the case's ``figure`` a measurement error (``why``: the limit it is past, measured in the same run).
        The report shows it whatever the outcome, the record keeps it under ``measurement_errors``, and the gate
        refuses a run that has one: such a figure must never stand as a record."""
        self.facts.setdefault(MEASUREMENT_ERRORS, []).append({"figure": figure, "value": round(value, 4), "why": why})

    def target(self, what: str, seen: float, target: float, unit: str, better: str = "lower", source: str = "",
               stage: int | None = None) -> bool:
        """Judge ``seen`` against a performance target (``target``, in ``unit``, one of FIGURE_UNITS; ``better``
        lower: met when seen <= target, higher: when seen >= target; ``source`` says whose target it is). Timings
        are never assertions, so the case passes either way; the record keeps it under ``targets`` in the facts,
        and the report draws a miss ``MISSED target`` in its stage (the open one, unless ``stage`` names one) and
        counts it in the phase's summary. Returns whether it was met."""
        if unit not in FIGURE_UNITS:
            raise ValueError(f"target unit {unit!r}: one of {', '.join(FIGURE_UNITS)}")
        if better not in ("lower", "higher"):
            raise ValueError(f"target better={better!r}: lower or higher")
        if not (math.isfinite(seen) and math.isfinite(target)):
            raise ValueError(f"target {what!r}: seen {seen!r} and target {target!r} must be finite numbers")
        met = seen <= target if better == "lower" else seen >= target
        self.facts.setdefault(TARGETS, []).append({
            "what": what, "stage": self._open_stage if stage is None else stage, "seen": _rounded(seen),
            "target": _rounded(target), "unit": unit, "better": better, "met": met,
            **({"source": source} if source else {})})
        return met

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
        if self.host_busy is not None:
            d["host_busy"] = self.host_busy
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


def terminal_width(fallback: int = DEFAULT_WIDTH) -> int:
    """This terminal's width in columns (``fallback`` when output is not a terminal and COLUMNS is unset), at
    least MIN_WIDTH."""
    return max(MIN_WIDTH, shutil.get_terminal_size((fallback, 24)).columns)


_PADDING = re.compile(r"  +")
# Where a test's name may break across lines: after '_' or '-', before its parameters' '['.
_NAME_BREAKS = re.compile(r"(?<=[_-])|(?=\[)")


def wrap(text: str, width: int, first: str = "", rest: str | None = None) -> list[str]:
    """``text`` in lines of at most ``width`` columns, the first after ``first``, the others after ``rest``
    (``first``'s width in spaces and two more: a continuation hangs under its text). Runs of spaces inside a
    line that fits are kept (a table row stays aligned), one that does not is closed up first; a word longer than
    a line (a hash) is broken."""
    rest = " " * (len(first) + 2) if rest is None else rest
    if len(first) + len(text) > width:  # a padded row (a table's) that cannot stay aligned: no padding to wrap
        text = _PADDING.sub(" ", text)
    return textwrap.wrap(text, width=width, initial_indent=first, subsequent_indent=rest, break_long_words=True,
                         break_on_hyphens=False) or [first.rstrip()]


def wrap_name(name: str, width: int, indent: str = "", hang: str | None = None) -> list[str]:
    """A test's name or node id (no spaces to break at) in lines of at most ``width`` columns, broken after its
    words' ``_`` or ``-`` and before its parameters' ``[``; continuation lines after ``hang`` (``indent`` and two
    spaces)."""
    hang = indent + "  " if hang is None else hang
    base, bracket, params = name.partition("[")
    pieces = _NAME_BREAKS.split(base)
    if bracket:  # the parameters whole on a line of their own when they fit one, else broken like the rest
        whole = bracket + params
        pieces += [whole] if len(hang) + len(whole) <= width else _NAME_BREAKS.split(whole)
    lines: list[str] = []
    line = indent
    for piece in filter(None, pieces):
        while piece:
            if line.strip() and len(line) + len(piece) > width:
                lines.append(line)
                line = hang
            take = piece[:width - len(line)]
            line, piece = line + take, piece[len(take):]
    return [*lines, line]


def dotted(left: str, right: str, width: int, indent: str = "") -> list[str]:
    """``left ...... right`` in ``width`` columns; a ``left`` too long for one line breaks as ``wrap_name`` breaks
    a test's name, and the dots and ``right`` end its last line (or a line of their own)."""
    if len(indent) + len(left) + len(right) + 5 <= width:
        return [f"{indent}{left} {'.' * (width - len(indent) - len(left) - len(right) - 2)} {right}"]
    *lines, last = wrap_name(left, width, indent)
    base, bracket, params = left.partition("[")
    hang = indent + "  "
    if len(last) + len(right) + 5 > width and bracket and len(hang) + len(params) + len(right) + 6 <= width:
        *lines, last = [*wrap_name(base, width, indent), hang + bracket + params]  # parameters beside the verdict
    if len(last) + len(right) + 5 > width:
        lines.append(last)
        last = hang
    return [*lines, f"{last} {'.' * max(3, width - len(last) - len(right) - 2)} {right}"]


def target_text(t: dict[str, Any]) -> str:
    """A target as the report draws it: ``MISSED target: ...`` or ``target met: ...``, the bound, what was seen."""
    bound = "<=" if t["better"] == "lower" else ">="
    source = f" ({t['source']})" if t.get("source") else ""
    verdict = "target met" if t["met"] else "MISSED target"
    return (f"{verdict}: {t['what']} {bound} {fmt_value(t['target'], t['unit'])}{source}, saw "
            f"{fmt_value(t['seen'], t['unit'])}")


def timed(case: dict[str, Any]) -> bool:
    """The case measured something: figures, or targets judged."""
    return bool(case.get("figures") or case.get("facts", {}).get(TARGETS))


def busy_timed(case: dict[str, Any]) -> bool:
    """The case measured something while others kept the host busy (results/hostbusy.py): what it measured
    measured them too. A busy case that timed nothing is only in the record."""
    return timed(case) and bool(case.get("host_busy", {}).get("busy"))


def busy_count(phases: list[dict[str, Any]]) -> tuple[int, int]:
    """(cases that measured something on a busy host, cases that measured something), over ``phases``."""
    measured = [c for p in phases for c in p["cases"] if timed(c)]
    return sum(busy_timed(c) for c in measured), len(measured)


def missed_targets(case: dict[str, Any]) -> list[dict[str, Any]]:
    return [t for t in case.get("facts", {}).get(TARGETS, []) if not t["met"]]


CASE_MARKS = {"passed": "PASS", "failed": "FAIL", "error": "ERROR", "skipped": "SKIP", "not run": "NOT RUN"}


def render_phase(phase: dict[str, Any], verbose: bool = True, width: int = DEFAULT_WIDTH) -> str:
    """The PASS report of one phase, from its record (live or loaded from YAML), every line at most ``width``
    columns (at least MIN_WIDTH). ``verbose``: every case's claim and stages; otherwise a passed case is one line
    (and its missed targets), the others in full."""
    width = max(MIN_WIDTH, width)
    cases = phase["cases"]
    counts: dict[str, int] = {}
    for c in cases:
        counts[c["outcome"]] = counts.get(c["outcome"], 0) + 1
    if phase.get("deselected"):
        counts["deselected"] = len(phase["deselected"])
    summary = ", ".join(f"{n} {o}" for o, n in sorted(counts.items()))
    missed = sum(len(missed_targets(c)) for c in cases)
    missed_text = f"{missed} target{'s' if missed != 1 else ''} MISSED" if missed else ""
    summary += f"; {missed_text}" if missed else ""
    verdict = phase["outcome"] + (f", {missed_text}" if missed else "")
    lines = dotted(f"[phase {phase['phase']}] {phase['title']}", f"{verdict}  {fmt_ns(phase['duration_ns'])}", width)
    lines += wrap(f"({summary})", width, "  ")
    for c in cases:
        lines += _case_lines(c, verbose, width)
    for d in phase.get("deselected", []):
        lines += dotted(d["test"], "DESELECTED", width, "  ")
        lines += wrap(d["reason"], width, "      ")
    return "\n".join(lines)


def _case_lines(c: dict[str, Any], verbose: bool, width: int) -> list[str]:
    passed = c["outcome"] == "passed"
    lines = dotted(c["test"], f"{CASE_MARKS.get(c['outcome'], '----')}  {fmt_ns(c['duration_ns'])}", width, "  ")
    detailed = verbose or not passed
    if detailed and c.get("claim"):
        label = "    proven: " if passed else "    claim: "
        lines += wrap(c["claim"], width, label, " " * len(label))
    if c.get("skip_reason"):
        lines += wrap(f"skipped: {c['skip_reason']}", width, "      ")
    for e in c.get("facts", {}).get(MEASUREMENT_ERRORS, []):
        lines += wrap(f"MEASUREMENT ERROR: {e['figure']} = {e['value']}: {e['why']}", width, "      ")
    if busy_timed(c):
        lines += wrap(f"HOST BUSY: {hostbusy_summary(c['host_busy'])}; the gate judges none of its figures", width,
                      "      ")
    if not detailed:
        for t in missed_targets(c):
            lines += wrap(target_text(t), width, "      ")
        return lines
    targets = c.get("facts", {}).get(TARGETS, [])
    column = width >= COLUMN_LAYOUT_MIN_WIDTH
    detail = " " * (LABEL_COLUMN + 1 if column else 6)
    for s in c["stages"]:
        lines += _stage_lines(s, c["outcome"], [t for t in targets if t.get("stage") == s["stage"]], width, column,
                              detail)
    stages = {s["stage"] for s in c["stages"]}
    for t in targets:
        if t.get("stage") not in stages:
            lines += wrap(target_text(t), width, detail)
    medians = [f"{name} {fmt_value(f['median'], f['unit'])}" for name, f in c.get("figures", {}).items()
               if name != "round_ns"]
    if medians:
        rounds = len(next(iter(c["figures"].values()))["samples"])
        lines += wrap(f"figures (median of {rounds}): {'; '.join(medians)}", width, detail)
    if c.get("failure"):
        lines += wrap(f"failure: {c['failure']}", width, "      ")
    for why in explain(c):
        lines += wrap(f"why: {why}", width, "      ")
    return lines


def _stage_lines(s: dict[str, Any], outcome: str, targets: list[dict[str, Any]], width: int, column: bool,
                 detail: str) -> list[str]:
    """One stage: its label, then its checks, timings, notes and targets, each wrapped under ``detail``; in the
    column layout the first beside the label when the label fits its column."""
    label = f"    [stage {s['stage']}] {s['name']}"
    if not s["checks"] and outcome == "skipped":  # stopped by the skip itself: not a failed stage
        rows = ["skipped"]
    else:
        checks = s["checks"] or [{"ok": s["ok"] is not False, "text": "done"}]
        rows = [f"{chk['text']} {OK_MARK if chk['ok'] else FAIL_MARK}" for chk in checks]
        rows += [f"timing: {t['name']} {fmt_ns(t['ns'])}" + (f" ({t['note']})" if t.get("note") else "")
                 for t in s["timings"]]
        rows += [f"note: {n}" for n in s.get("notes", [])]
        rows += [target_text(t) for t in targets]
    if column and len(label) < LABEL_COLUMN:
        lines = wrap(rows[0], width, f"{label:<{LABEL_COLUMN}} ", detail + "  ")
        rows = rows[1:]
    else:
        lines = wrap(label.strip(), width, "    ", "      ")
    for row in rows:
        lines += wrap(row, width, detail)
    return lines
