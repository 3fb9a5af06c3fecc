"""snapproof's run-record plugin: case reports per phase, the PASS reports at the end, the YAML run record.

The root conftest.py loads it (``pytest_plugins``). A test of a phase (``@pytest.mark.phase(n, title)``)
gets its case report from the ``report`` fixture; each outcome pytest reports lands in it; at the end
the reports are printed (``--reports``) and written as one run record (``--results-dir``, schema in
results/README.md), and ``--plots`` draws it.

Every selected case is in the record from the start, ``not run`` until it finishes, and the record's
``run.status`` says whether the run was complete, incomplete (stopped early: ``-x``, an internal
error) or interrupted (results/interrupts.py: which signal, during what): a record is never mistaken
for a whole run when it is not one.
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

from results.hostload import describe as describe_load
from results.hostpolicy import HostPolicy
from results.interrupts import interruption
from results.record import SCHEMA, CaseReport, PhaseReport, render_phase

RESULTS = Path(__file__).resolve().parent
ROOT = RESULTS.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("snapproof")
    g.addoption("--results-dir", default=str(RESULTS / "runs"),
                help="where the YAML run record goes ('' for none)")
    g.addoption("--plots", action="store_true",
                help="write PNG plots of the run (matplotlib) into --plots-dir: see results/plots.py")
    g.addoption("--plots-dir", default=str(RESULTS / "plots"), help="where --plots writes")
    g.addoption("--reports", choices=("full", "short", "none"), default="full",
                help="PASS reports at the end: every stage, failures only in detail, or none")


RECORDER = pytest.StashKey["RunRecorder"]()


def recorder(config: pytest.Config) -> RunRecorder:
    """This run's recorder (made at configure time)."""
    return config.stash[RECORDER]


def pytest_configure(config: pytest.Config) -> None:
    config.stash[RECORDER] = RunRecorder(config)


def pytest_collection_finish(session: pytest.Session) -> None:
    recorder(session.config).select(session.items)


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
    recorder(item.config).record_outcome(item, outcome.get_result())


def _phase_of(item: pytest.Item) -> tuple[int, str] | None:
    m = item.get_closest_marker("phase")
    if m is None:
        return None
    return int(m.args[0]), str(m.args[1])


class RunRecorder:
    """Collects case reports per phase and writes them out at the end of the run."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.started = dt.datetime.now(dt.timezone.utc)
        self.t0 = time.perf_counter_ns()
        self.phases: dict[int, PhaseReport] = {}
        self.cases: dict[str, CaseReport] = {}
        self.selected: list[str] = []   # every test the run set out to run, in order
        self.finished: set[str] = set()  # those whose outcome is known
        self.record_path: Path | None = None
        self._written_status = ""
        self.deselected: dict[str, str] = {}  # node id -> why: a capability the host lacks, its class does not require
        self._host_policy: HostPolicy | None = None

    def host_policy(self) -> HostPolicy:
        """The gate policy's class for this host and what it requires (probes the host the first time)."""
        if self._host_policy is None:
            from native.host import probe

            path = self.config.getoption("policy")
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
            case = CaseReport(item.nodeid, item.name, doc=" ".join(doc.split()))
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
        elif rep.when == "call":
            case.outcome = "passed"

    def record(self) -> dict[str, Any]:
        from native.host import probe

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
                "strict_host": bool(self.config.getoption("strict_host")),
                "inject": self.config.getoption("inject"),
                "engine": self.engine_under_test(),
                "git_commit": _git_commit(),
                "policy": policy,
                "background_load": describe_load(self.config),
                **self.completeness(),
            },
            "host": host_facts,
            "capabilities": caps,
            "phases": [self.phases[n].to_dict() for n in sorted(self.phases)],
            "benchmarks": _benchmark_results(self.config),
        }

    def engine_under_test(self) -> dict[str, Any] | None:
        """The snapshot engine the run judged (``--engine``, else the built-in one): name, version, ABI version,
        library and sha256; None on a host without engines (Windows)."""
        if sys.platform == "win32":
            return None
        try:
            from native.engine import builtin_engine, load_engine

            path = self.config.getoption("engine", "")
            return (load_engine(path) if path else builtin_engine()).describe()
        except Exception as e:  # an engine that cannot be described must not lose the record
            return {"error": str(e)}

    def completeness(self) -> dict[str, Any]:
        """``status`` (complete / incomplete / interrupted), the test counts, and the interruption if any."""
        finished = sum(1 for n in self.selected if n in self.finished)
        out: dict[str, Any] = {"status": "complete", "tests": {"selected": len(self.selected), "finished": finished}}
        got = interruption(self.config)
        if got is not None:
            out["status"] = "interrupted"
            out["interrupted"] = {"signal": got.signal, "during": got.during}
        elif finished < len(self.selected):
            out["status"] = "incomplete"  # stopped early (-x, --maxfail, an internal error): not a whole run
        return out

    def write(self, record: dict[str, Any]) -> Path | None:
        out = self.config.getoption("results_dir")
        if not out or not self.phases:
            return None
        d = Path(out)
        d.mkdir(parents=True, exist_ok=True)
        stamp = self.started.strftime("%Y%m%dT%H%M%SZ")
        path = self.record_path or d / f"{stamp}-{socket.gethostname()}.yaml"
        with open(path, "w") as f:
            yaml.safe_dump(record, f, sort_keys=False, allow_unicode=True, width=120)
        self.record_path = path
        self._written_status = record["run"]["status"]
        return path

    def rewrite_if_interrupted_since(self) -> Path | None:
        """A signal that came after the record was written (the end of the session): write it again, marked."""
        if self.record_path is None or self._written_status == "interrupted" or interruption(self.config) is None:
            return None
        return self.write(self.record())


def _shown_path(path: str) -> str:
    """A path relative to the checkout when it is inside it (messages and the record stay host-neutral)."""
    if not path:
        return ""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def _benchmark_results(config: pytest.Config) -> list[dict[str, Any]]:
    """This run's pytest-benchmark results as its JSON has them (stats in seconds), for the record: the gate
    compares them with a baseline record's by pytest-benchmark's own checks."""
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


def _short_failure(rep: pytest.TestReport) -> str:
    crash = getattr(rep.longrepr, "reprcrash", None)
    if crash is not None:
        return str(crash.message).splitlines()[0] if crash.message else ""
    text = str(rep.longrepr).strip().splitlines()
    return text[-1] if text else ""


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    run = recorder(config)
    if run.deselected:
        # Printed whatever --reports says: a case left out for the host is part of the verdict, never a pass.
        terminalreporter.section(f"deselected for this host: {run.host_policy().label()}")
        for nodeid, reason in run.deselected.items():
            terminalreporter.write_line(f"{nodeid}\n    {reason}")
    if not run.phases or config.option.collectonly:  # --collect-only ran nothing: no record of it
        return
    mode = config.getoption("reports")
    record = run.record()
    if mode != "none":
        terminalreporter.section("snapproof phase reports")
        if (engine := record["run"].get("engine")) and "name" in engine:
            terminalreporter.write_line(f"engine under test: {engine['name']} {engine['version']} (ABI "
                                        f"{engine['abi_version']}, {engine['library']}, sha256 {engine['sha256']})")
            terminalreporter.write_line("")
        for phase in record["phases"]:
            terminalreporter.write_line(render_phase(phase, verbose=(mode == "full")))
            terminalreporter.write_line("")
    path = run.write(record)  # the record just printed, not a second gathering of it
    status = record["run"]
    if status["status"] != "complete":
        why = f": {status['interrupted']['signal']} during {status['interrupted']['during']}" \
            if "interrupted" in status else ""
        terminalreporter.write_line(f"run {status['status']}{why}; {status['tests']['finished']} of "
                                    f"{status['tests']['selected']} tests finished", red=True, bold=True)
    if path is not None:
        terminalreporter.write_line(f"run record: {os.path.relpath(path)}")
    if config.getoption("plots"):
        from results.plots import write_plots

        for name, got in write_plots(record, config.getoption("plots_dir")):
            terminalreporter.write_line(f"plot {name}: {got if isinstance(got, str) else os.path.relpath(got)}")


def pytest_unconfigure(config: pytest.Config) -> None:
    run = config.stash.get(RECORDER, None)
    if run is not None:
        run.rewrite_if_interrupted_since()
