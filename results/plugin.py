"""snapproof's run-record plugin: case reports per phase, the PASS reports at the end, the YAML run record.

snapproof's plugin, snapproof/fixtures.py, loads it (``pytest_plugins``). A test of a phase
(``@pytest.mark.phase(n, title)``) gets its case report from the ``report`` fixture; each outcome pytest reports
lands in it (a failure with what its evidence says, results/explain.py); while a test runs long, what runs is
shown on the terminal (results/progress.py); at the end the reports are printed (``--reports``, pytest's width),
the run record is written (schema in results/README.md and results/schema.py), and ``--plots`` draws it.

The record can never be mistaken for another run's, nor for a whole run when it is not one:

- its path is fixed at the start (``--results-file``, or a new name in ``--results-dir``) and printed then
  and at the end;
- it is written as soon as the tests are collected, every selected case ``not run`` and ``run.status``
  ``incomplete``, and written again as each phase case finishes: a run that ends without its end
  (pytest-timeout's ``os._exit``, SIGKILL, a crash) leaves a record that says so and holds what finished;
- at the run's end ``run.status`` says whether it was complete, incomplete (stopped early: ``-x``, an
  internal error) or interrupted (results/interrupts.py: which signal, during what); only a complete run
  points ``latest`` (a symlink in the record's folder) at its record, and a signal at the very end (after
  that) puts ``latest`` back;
- pytest-xdist (``-n``) is refused at the start while a record is to be written: the timed phases need the
  host to themselves, pytest-benchmark disables itself under xdist, and each worker would write a record
  of its own share.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import sys
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
import yaml
from snapproof.results import hostbusy
from snapproof.results.explain import explain
from snapproof.results.hostload import LOADS
from snapproof.results.hostload import describe as describe_load
from snapproof.results.hostpolicy import HostPolicy
from snapproof.results.interrupts import interruption
from snapproof.results.progress import ProgressDisplay
from snapproof.results.record import (
    MIN_WIDTH,
    SCHEMA,
    CaseReport,
    PhaseReport,
    busy_count,
    render_phase,
    wrap,
    wrap_name,
)

from snapproof import CHECKOUT

RESULTS = Path(__file__).resolve().parent
ROOT = RESULTS.parent
# Where records and plots go unless told: a checkout's results/, or for an install snapproof-results/ in the
# current folder (an installed package is no place for a run's output, and may be read-only).
OUTPUT = RESULTS if CHECKOUT else Path("snapproof-results")
LATEST = "latest"  # the pointer beside the records: never matches the records' *.yaml


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("snapproof")
    g.addoption("--results-dir", default=str(OUTPUT / "runs"),
                help="where the YAML run record goes, under a new name ('' for none)")
    g.addoption("--results-file", default="", metavar="PATH",
                help="write the run record to PATH (its folder gets the 'latest' pointer); overrides --results-dir")
    g.addoption("--plots", action="store_true",
                help="write PNG plots of the run (matplotlib) into --plots-dir: see results/plots.py")
    g.addoption("--plots-dir", default=str(OUTPUT / "plots"), help="where --plots writes")
    g.addoption("--reports", choices=("full", "short", "none"), default="full",
                help="PASS reports at the end: every stage, failures only in detail, or none")


RECORDER = pytest.StashKey["RunRecorder"]()


def recorder(config: pytest.Config) -> RunRecorder:
    """This run's recorder (made at configure time)."""
    return config.stash[RECORDER]


def distributed(config: pytest.Config) -> bool:
    """This process is pytest-xdist's controller handing tests to workers (``-n N``, N > 0, or ``--dist``)."""
    if hasattr(config, "workerinput"):
        return False
    return bool(getattr(config.option, "numprocesses", None)) or getattr(config.option, "dist", "no") != "no"


def pytest_configure(config: pytest.Config) -> None:
    run = RunRecorder(config)
    config.stash[RECORDER] = run
    config.pluginmanager.register(run, "snapproof-run-recorder")  # its hooks see the run they belong to
    if run.path is not None and distributed(config):
        raise pytest.UsageError(
            "pytest-xdist (-n/--dist) and a run record do not mix: the phases' timings need the host to "
            "themselves, pytest-benchmark turns itself off under xdist, and each worker would record only its "
            "share. Run the phases in one process (-n 0), or, for the self-tests alone, write no record "
            "(--results-dir '').")


def pytest_collection_finish(session: pytest.Session) -> None:
    run = recorder(session.config)
    run.select(session.items)
    if run.phases and run.path is not None and not session.config.option.collectonly:
        run.write()
        for line in _path_line(f"run record: {shown(run.path)}",
                               "(written now as incomplete; complete when the run ends)", _width(session.config)):
            _say(session.config, line)


def shown(path: Path) -> str:
    """A path as a person types it from here: relative below the working folder, absolute elsewhere."""
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


def _say(config: pytest.Config, line: str) -> None:
    tr = config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line(line)


@pytest.fixture
def report(request: pytest.FixtureRequest) -> CaseReport:
    """The running test's case report: ``with report.stage("arm WP") as st: st.check(...)``."""
    case = recorder(request.config).case_for(request.node)
    if case is None:
        # Self-tests outside a phase still get a report object; it is not printed.
        case = CaseReport(request.node.nodeid, request.node.name)
    return case


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    # Outermost wrapper: the outcome recorded is the one every other plugin left (a capability found
    # missing deep in a fixture is turned into a skip by conftest.py's wrapper first).
    outcome = yield
    rep: pytest.TestReport = outcome.get_result()
    run = recorder(item.config)
    run.record_outcome(item, rep)
    if rep.when == "call":
        run.benchmark_figures(item)


def _phase_of(item: pytest.Item) -> tuple[int, str] | None:
    m = item.get_closest_marker("phase")
    if m is None:
        return None
    return int(m.args[0]), str(m.args[1])


class RunRecorder:
    """Collects case reports per phase and writes them out as the run goes."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.started = dt.datetime.now(dt.timezone.utc)
        self.t0 = time.perf_counter_ns()
        self.phases: dict[int, PhaseReport] = {}
        self.cases: dict[str, CaseReport] = {}
        self.selected: list[str] = []   # every test the run set out to run, in order
        self.finished: set[str] = set()  # those whose outcome is known
        self._written_status = ""
        self._latest_before: str | None = None  # where 'latest' pointed before this run moved it ("" nowhere)
        self.deselected: dict[str, str] = {}  # node id -> why: a capability the host lacks, its class does not require
        self._host_policy: HostPolicy | None = None
        self._engine: dict[str, Any] | None = None
        self.display: ProgressDisplay | None = None  # what runs now, on the terminal (from the session's start)
        self._host_at_start: hostbusy.Sample | None = None  # the host as the running phase case started
        self.path = self._path()

    def _path(self) -> Path | None:
        """Fixed at the start: --results-file, or a new name in --results-dir (the pid keeps two runs
        started in the same second apart)."""
        if hasattr(self.config, "workerinput"):
            return None  # an xdist worker (only with no record asked for: see pytest_configure)
        given = self.config.getoption("results_file")
        if given:
            path = Path(given)
            if path.name == LATEST:
                raise pytest.UsageError(f"--results-file {given}: {LATEST!r} is the pointer to the latest complete "
                                        "run, not a record's name")
            return path.resolve()
        folder = self.config.getoption("results_dir")
        if not folder:
            return None
        stamp = self.started.strftime("%Y%m%dT%H%M%SZ")
        return (Path(folder) / f"{stamp}-{socket.gethostname()}-{os.getpid()}.yaml").resolve()

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self.display = _progress_display(self.config)
        for case in self.cases.values():
            case.display = self.display

    # What runs now, for the display: each test's set-up, call (its stages say more) and tear-down, and nothing
    # once pytest reports on it (our line is erased before pytest writes its own).
    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        self._now_running(item, "setting up")

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_call(self, item: pytest.Item) -> None:
        self._now_running(item, "running")

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> None:
        self._now_running(item, "tearing down")

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.display is not None:
            self.display.idle()

    def _now_running(self, item: pytest.Item, what: str) -> None:
        if self.display is not None:
            self.display.now_running(item.name, what)

    def pytest_runtest_logstart(self, nodeid: str) -> None:
        if nodeid in self.cases:
            self._host_at_start = hostbusy.sample()

    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        """A test is done, its teardown reported too: rewrite the record if it is a phase case (with what
        others took of the host while it ran), so what finished so far is on disk before the next test can
        hang or crash."""
        if nodeid in self.cases:
            before, self._host_at_start = self._host_at_start, None
            if before is not None and (after := hostbusy.sample()) is not None:
                load = {x.proc.pid for x in self.config.stash.get(LOADS, [])}
                self.cases[nodeid].host_busy = hostbusy.measure(before, after, neighbours=load)
            self.write()

    def host_policy(self) -> HostPolicy:
        """The gate policy's class for this host and what it requires (probes the host the first time)."""
        if self._host_policy is None:
            from snapproof.native.host import probe

            path = self.config.getoption("policy", "")
            self._host_policy = HostPolicy.for_host(path, probe().facts, shown=_shown_path(path))
        return self._host_policy

    def record_deselected(self, item: pytest.Item, reason: str) -> None:
        self.deselected[item.nodeid] = reason
        ph = _phase_of(item)
        if ph is not None:
            phase = self.phases.setdefault(ph[0], PhaseReport(ph[0], ph[1]))
            phase.deselected.append({"test": item.name, "nodeid": item.nodeid, "reason": reason})

    def select(self, items: list[pytest.Item]) -> None:
        """The tests this run will run: each phase case is in the record, ``not run``, until it finishes."""
        self.selected = [i.nodeid for i in items]
        for item in items:
            self.case_for(item)

    def case_for(self, item: pytest.Item) -> CaseReport | None:
        ph = _phase_of(item)
        if ph is None:
            return None
        case = self.cases.get(item.nodeid)
        if case is None:
            doc = (getattr(item, "function", None).__doc__ or "").strip() if hasattr(item, "function") else ""
            case = CaseReport(item.nodeid, item.name, doc=" ".join(doc.split()), display=self.display)
            self.cases[item.nodeid] = case
            phase = self.phases.setdefault(ph[0], PhaseReport(ph[0], ph[1]))
            phase.cases.append(case)
        return case

    def record_outcome(self, item: pytest.Item, rep: pytest.TestReport) -> None:
        if rep.when == "call" or (rep.when == "setup" and not rep.passed):
            self.finished.add(item.nodeid)  # its outcome is known: the call's, or a setup that failed or skipped
        case = self.case_for(item)
        if case is None:
            return
        if rep.when == "call" or rep.outcome != "passed":
            case.duration_ns += int(rep.duration * 1e9)
        if rep.skipped:
            case.outcome = "skipped"
            longrepr = rep.longrepr
            case.skip_reason = longrepr[2].removeprefix("Skipped: ") if isinstance(longrepr, tuple) else str(longrepr)
        elif rep.failed:
            case.outcome = "failed" if rep.when == "call" else "error"
            case.failure = _short_failure(rep)
            if why := explain(case.to_dict()):
                width = _width(self.config)
                _add_section(rep, "snapproof: what the evidence says",
                             "\n".join(line for w in why for line in wrap(f"why: {w}", width)))
        elif rep.when == "call":
            case.outcome = "passed"

    def benchmark_figures(self, item: pytest.Item) -> None:
        """A benchmark's round times become the case's ``round_ns`` figure, and every figure's median goes
        into pytest-benchmark's extra_info under the figure's own name (one name for one figure)."""
        case = self.case_for(item)
        bench = getattr(item, "funcargs", {}).get("benchmark")
        if case is None or bench is None:
            return
        data = getattr(getattr(getattr(bench, "stats", None), "stats", None), "data", None)
        if data:
            case.figure("round_ns", [s * 1e9 for s in data], "ns",
                        what="pytest-benchmark's round time of the timed call")
        for name, fig in case.figures.items():
            bench.extra_info[name] = fig.to_dict()["median"]

    def record(self, at_end: bool = False) -> dict[str, Any]:
        """The run record as it stands; ``at_end``: the run reached its end (only then can it be complete)."""
        from snapproof.native.host import probe

        policy: dict[str, Any] = {}
        try:
            hostrep = probe()
            host_facts = dict(hostrep.facts)
            hp = self.host_policy()
            policy = {"file": hp.source, "host_class": hp.host_class,
                      "required_capabilities": sorted(hp.required)}
            if hp.host_class is None:
                policy["note"] = hp.label()
            caps = [{"name": c.name, "status": c.status.value, "detail": c.detail, "required": hp.requires(c.name),
                     **({"fallback": c.fallback} if c.fallback and not c.available else {})}
                    for c in hostrep.capabilities]
        except Exception as e:  # a broken probe must not lose the record
            host_facts, caps = {"probe_error": str(e)}, []
        return {
            "schema": SCHEMA,
            "run": {
                "started": self.started.isoformat(timespec="seconds"),
                "duration_s": round((time.perf_counter_ns() - self.t0) / 1e9, 3),
                "argv": sys.argv[1:],
                "strict_host": bool(self.config.getoption("strict_host", False)),
                "inject": str(self.config.getoption("inject", "none")),
                "engine": self.engine_under_test(),
                "git_commit": _git_commit(),
                "record": str(self.path) if self.path else "",
                "policy": policy,
                "background_load": describe_load(self.config),
                **self.completeness(at_end),
            },
            "host": host_facts,
            "capabilities": caps,
            "phases": [self.phases[n].to_dict() for n in sorted(self.phases)],
            "benchmarks": _benchmark_results(self.config),
        }

    def engine_under_test(self) -> dict[str, Any] | None:
        """The snapshot engine the run judged (``--engine``, else the built-in one): name, version, ABI version,
        library and sha256; None on a host without engines (Windows). Described once: the record is rewritten
        as each case finishes."""
        if sys.platform == "win32":
            return None
        if self._engine is None:
            try:
                from snapproof.native.engine import builtin_engine, load_engine

                path = self.config.getoption("engine", "")
                self._engine = (load_engine(path) if path else builtin_engine()).describe()
            except Exception as e:  # an engine that cannot be described must not lose the record
                return {"error": str(e)}
        return self._engine

    def completeness(self, at_end: bool) -> dict[str, Any]:
        """``status`` (complete / incomplete / interrupted), the test counts, and the interruption if any.
        Before the run's end it is never complete: a record the run never finished says so."""
        finished = sum(1 for n in self.selected if n in self.finished)
        out: dict[str, Any] = {"status": "complete", "tests": {"selected": len(self.selected), "finished": finished}}
        got = interruption(self.config)
        if got is not None:
            out["status"] = "interrupted"
            out["interrupted"] = {"signal": got.signal, "during": got.during}
        elif not at_end or finished < len(self.selected):
            out["status"] = "incomplete"  # not at its end yet, or stopped early (-x, --maxfail, an internal error)
        return out

    def write(self, record: dict[str, Any] | None = None) -> Path | None:
        """Write the record (atomically: a reader never sees half of it); None when no record is wanted.
        A complete one moves ``latest`` to it; one rewritten as not complete (a signal at the very end) puts
        ``latest`` back where it was."""
        if self.path is None or not self.phases:
            return None
        record = record if record is not None else self.record()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml: the record is rewritten per case
        with open(tmp, "w") as f:
            yaml.dump(record, f, Dumper=dumper, sort_keys=False, allow_unicode=True, width=120)
        os.replace(tmp, self.path)
        self._written_status = record["run"]["status"]
        if self._written_status == "complete":
            if self._latest_before is None:
                self._latest_before = _point_latest(self.path)
        elif self._latest_before is not None:
            _unpoint_latest(self.path, self._latest_before)
            self._latest_before = None
        return self.path

    def rewrite_if_interrupted_since(self) -> Path | None:
        """A signal that came after the record was written (the end of the session): write it again, marked."""
        if not self._written_status or self._written_status == "interrupted" or interruption(self.config) is None:
            return None
        return self.write(self.record(at_end=True))


def _point_latest(path: Path) -> str:
    """``latest`` beside the record names it (a relative symlink, replaced atomically); where symlinks are
    not allowed (Windows without the privilege), a copy of the record. Returns where it pointed before
    ("" for nowhere, or a copy)."""
    link = path.parent / LATEST
    try:
        before = os.readlink(link)
    except OSError:
        before = ""
    tmp = path.parent / f".{LATEST}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(path.name, tmp)
    except OSError:
        import shutil

        shutil.copyfile(path, tmp)
    os.replace(tmp, link)
    return before


def _unpoint_latest(path: Path, before: str) -> None:
    """``latest`` back to ``before`` (removed when it pointed nowhere), if it still names ``path``."""
    link = path.parent / LATEST
    try:
        if os.readlink(link) != path.name:
            return
    except OSError:
        if not link.exists():
            return  # gone, or a copy: a copy of a record that is no longer complete must go too
    if before:
        tmp = path.parent / f".{LATEST}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(before, tmp)
        os.replace(tmp, link)
    else:
        link.unlink(missing_ok=True)


def _shown_path(path: str) -> str:
    """A path relative to the checkout when it is inside it (messages and the record stay host-neutral)."""
    if not path:
        return ""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def _benchmark_results(config: pytest.Config) -> list[dict[str, Any]]:
    """This run's pytest-benchmark results as its JSON has them (stats in seconds), for the record and its
    plots; each timed figure with its samples is in its case (``figures``), which is what the gate judges."""
    bs = getattr(config, "_benchmarksession", None)
    out = []
    for bench in getattr(bs, "benchmarks", None) or []:
        if not bench:  # errored or never ran
            continue
        d = bench.as_dict(include_data=False)
        stats = {k: d["stats"][k] for k in ("min", "max", "mean", "stddev", "median", "iqr", "rounds", "ops")}
        out.append({"name": d["name"], "fullname": d["fullname"], "params": _plain(d["params"]), "stats": stats,
                    "extra_info": _plain(d["extra_info"])})
    return out


def _plain(value: Any) -> Any:
    """JSON-shaped (what pytest-benchmark writes): tuples become lists, odd objects their str()."""
    import json

    return json.loads(json.dumps(value, default=str))


def _progress_display(config: pytest.Config) -> ProgressDisplay | None:
    """The display of what runs now, writing where pytest's terminal output goes through a handle of its own (pytest
    captures the tests' own); none without pytest's terminal reporter, in an xdist worker, with ``-s`` (the tests
    write to the terminal themselves), or without a real stdout (pytest run inside another program)."""
    tr = config.pluginmanager.get_plugin("terminalreporter")
    if tr is None or hasattr(config, "workerinput") or config.option.collectonly or \
            config.getoption("capture", "fd") == "no":
        return None
    try:
        fd = os.dup(sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):
        return None
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    config.add_cleanup(lambda: os.close(fd))

    def write(text: str) -> None:
        data = text.encode(encoding, "replace")
        try:
            while data:
                data = data[os.write(fd, data):]
        except OSError:  # the terminal went away (a closed pipe): a progress line must never fail a test
            pass

    # ANSI cursor movement only where it works: a terminal that is not "dumb", and not Windows' console.
    tty = os.isatty(fd) and os.environ.get("TERM") != "dumb" and sys.platform != "win32"
    tw = tr._tw
    display = ProgressDisplay(write, tty, width=lambda: max(MIN_WIDTH, tw.fullwidth),
                              column=lambda: tw.width_of_current_line)
    config.add_cleanup(display.stop)  # runs before the fd's close (cleanups run last in, first out)
    return display.start()


def _width(config: pytest.Config) -> int:
    """pytest's terminal width (what its own output is wrapped to), at least MIN_WIDTH."""
    tr = config.pluginmanager.get_plugin("terminalreporter")
    return max(MIN_WIDTH, tr._tw.fullwidth) if tr is not None else MIN_WIDTH


def _add_section(rep: pytest.TestReport, title: str, text: str) -> None:
    """A section of the failure's own report (so pytest's summary and JUnit's <failure> show it too)."""
    add = getattr(rep.longrepr, "addsection", None)
    if callable(add):
        add(title, text)
    else:
        rep.sections.append((title, text))


def _short_failure(rep: pytest.TestReport) -> str:
    crash = getattr(rep.longrepr, "reprcrash", None)
    if crash is not None:
        return str(crash.message).splitlines()[0] if crash.message else ""
    text = str(rep.longrepr).strip().splitlines()
    return text[-1] if text else ""


_commit: str | None = None


def _git_commit() -> str:
    global _commit
    if CHECKOUT is None:  # an install: ROOT may lie inside another project's git checkout, whose commit is not ours
        return ""
    if _commit is None:
        try:
            _commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            _commit = ""
    return _commit


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    run = recorder(config)
    width = _width(config)  # pytest's own: the report lines up with its output

    def say(lines: list[str], **markup: bool) -> None:
        for line in lines:
            terminalreporter.write_line(line, **markup)

    if run.deselected:
        # Printed whatever --reports says: a case left out for the host is part of the verdict, never a pass.
        terminalreporter.section(f"deselected for this host: {run.host_policy().label()}")
        for nodeid, reason in run.deselected.items():
            say(wrap_name(nodeid, width) + wrap(reason, width, "    "))
    if not run.phases or config.option.collectonly:  # --collect-only ran nothing: no record of it
        return
    mode = config.getoption("reports")
    record = run.record(at_end=True)
    if mode != "none":
        terminalreporter.section("snapproof phase reports")
        if (engine := record["run"].get("engine")) and "name" in engine:
            say(wrap(f"engine under test: {engine['name']} {engine['version']} (ABI {engine['abi_version']}, "
                     f"{engine['library']}, sha256 {engine['sha256']})", width))
            terminalreporter.write_line("")
        for phase in record["phases"]:
            terminalreporter.write_line(render_phase(phase, verbose=(mode == "full"), width=width))
            terminalreporter.write_line("")
    path = run.write(record)  # the record just printed, not a second gathering of it
    busy, measured = busy_count(record["phases"])
    if busy:
        say(wrap(f"host busy during {busy} of the {measured} phase cases that measured something (others took "
                 f"{hostbusy.BUSY_CPUS} CPU or more while they ran; each report names who): the gate judges none of "
                 "their figures", width), yellow=True)
    status = record["run"]
    if status["status"] != "complete":
        why = f": {status['interrupted']['signal']} during {status['interrupted']['during']}" \
            if "interrupted" in status else ""
        say(wrap(f"run {status['status']}{why}; {status['tests']['finished']} of {status['tests']['selected']} tests "
                 "finished; the gate refuses this record", width), red=True, bold=True)
    if path is not None:
        # The path whole on its line, to be pasted; what follows it wraps.
        latest = f"(results {LATEST!r} points here)" if status["status"] == "complete" else ""
        say(_path_line(f"run record: {shown(path)}", latest, width))
    if config.getoption("plots"):
        from snapproof.results.plots import write_plots

        for name, got in write_plots(record, config.getoption("plots_dir")):
            terminalreporter.write_line(f"plot {name}: {got if isinstance(got, str) else os.path.relpath(got)}")


def _path_line(head: str, tail: str, width: int) -> list[str]:
    """``head`` (ending in a path, never broken) and ``tail`` on one line when they fit, else ``tail`` wrapped below."""
    if not tail:
        return [head]
    if len(head) + 1 + len(tail) <= width:
        return [f"{head} {tail}"]
    return [head, *wrap(tail, width, "  ")]


def pytest_unconfigure(config: pytest.Config) -> None:
    run = config.stash.get(RECORDER, None)
    if run is not None:
        run.rewrite_if_interrupted_since()
        if config.pluginmanager.is_registered(run):
            config.pluginmanager.unregister(run)
