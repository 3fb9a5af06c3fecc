"""snapproof's pytest plugin: options, host capabilities, VM fixtures, PASS reports and run records.

Fixtures are layered by lifecycle, after Firecracker: ``make_memory`` and
``make_vm`` are factories that own cleanup; ``report`` is the running test's
case report. A missing host capability skips with the exact reason from
``native.host`` (``--strict-host`` turns it into a failure) when the gate
policy's class for this host requires it; one it does not require deselects
the cases that need it, naming it (results/hostpolicy.py).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from results.hostpolicy import HostPolicy
from results.record import SCHEMA, CaseReport, PhaseReport, render_phase

ROOT = Path(__file__).resolve().parent
_SIZE_RE = re.compile(r"^(\d+)([KMG]?)(i?B)?$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """'64M', '1G', '4096' -> bytes (binary units)."""
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise ValueError(f"size {text!r} is not a number with an optional K/M/G suffix")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


# -- options --------------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("snapproof")
    g.addoption("--strict-host", action="store_true",
                help="fail, instead of skip, every test missing a host capability its host class requires (release "
                     "gates); what the class does not require is deselected, naming it")
    g.addoption("--policy", default=str(ROOT / "results" / "gate.yaml"), metavar="PATH",
                help="the gate policy whose host class says which capabilities are required ('' for none: all are)")
    g.addoption("--sizes", default="", metavar="LIST",
                help="extra guest memory sizes for the sized phases, e.g. 1G,4G (default: the phase's own)")
    g.addoption("--inject", default="none", metavar="SWITCH[,SWITCH]",
                help="engine fault-injection switches (see native.wp.FaultInjection): the phases must FAIL")
    g.addoption("--long", action="store_true", help="run the opt-in long runs (marked slow)")
    g.addoption("--fuzz-examples", type=int, default=500, help="hypothesis examples for the file fuzzers")
    g.addoption("--results-dir", default=str(ROOT / "results" / "runs"),
                help="where the YAML run record goes ('' for none)")
    g.addoption("--plots", action="store_true",
                help="write PNG plots of the run (matplotlib) into --plots-dir: see results/plots.py")
    g.addoption("--plots-dir", default=str(ROOT / "results" / "plots"), help="where --plots writes")
    g.addoption("--reports", choices=("full", "short", "none"), default="full",
                help="PASS reports at the end: every stage, failures only in detail, or none")
    g.addoption("--reserve-hugepages", type=int, default=0, metavar="N",
                help="reserve N more 2 MiB hugepages for the hugetlb cases; vm.nr_hugepages is restored at exit")


NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")


def pytest_configure(config: pytest.Config) -> None:
    config._snapproof = Session(config)  # type: ignore[attr-defined]
    want = config.getoption("reserve_hugepages")
    if want > 0 and not hasattr(config, "workerinput"):
        # Only on request, and undone in pytest_unconfigure: the suite never changes host settings on its own.
        before = int(NR_HUGEPAGES.read_text())
        try:
            NR_HUGEPAGES.write_text(f"{before + want}\n")
        except OSError as e:
            # Not fatal: the hugetlb cases then skip naming the missing hugepages (fail under --strict-host).
            import warnings

            warnings.warn(pytest.PytestWarning(f"--reserve-hugepages {want}: cannot write {NR_HUGEPAGES}: {e}"),
                          stacklevel=1)
            return
        config._snapproof_hugepages_before = before  # type: ignore[attr-defined]


def pytest_unconfigure(config: pytest.Config) -> None:
    before = getattr(config, "_snapproof_hugepages_before", None)
    if before is not None:
        NR_HUGEPAGES.write_text(f"{before}\n")


# Modules that drive KVM or userfaultfd: a Windows host does not collect them (its gate is phases 0 and 4).
LINUX_ONLY_MODULES = ["phases/test_phase1_*.py", "phases/test_phase2_*.py", "phases/test_phase3_*.py",
                      "phases/test_phase5_*.py",
                      "tests/test_phase[1235]_*.py", "tests/test_guests_on_kvm.py", "tests/test_reliability*.py"]
collect_ignore_glob = LINUX_ONLY_MODULES if sys.platform == "win32" else []


def on_platform(name: str) -> bool:
    return sys.platform.startswith(name)


@pytest.hookimpl(trylast=True)  # after -k / -m: only what would run is probed for, and deselected for the host
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests for another OS's backend, and long runs nobody asked for (--long), are deselected, not
    # skipped: a skip means a missing host capability, and a phase with one is not a PASS.
    long = config.getoption("long")
    unwanted = [i for i in items if ((m := i.get_closest_marker("platform")) and not on_platform(m.args[0]))
                or (not long and i.get_closest_marker("slow"))]
    if unwanted:
        config.hook.pytest_deselected(items=unwanted)
        items[:] = [i for i in items if i not in unwanted]
    deselect_unavailable(config, items)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``@pytest.mark.sizes(...)`` parametrizes ``mem_size``; ``--sizes`` adds to it."""
    marker = metafunc.definition.get_closest_marker("sizes")
    if marker is None or "mem_size" not in metafunc.fixturenames:
        return
    sizes = list(marker.args)
    if marker.kwargs.get("extendable", True):
        for text in filter(None, metafunc.config.getoption("sizes").split(",")):
            s = parse_size(text)
            if s not in sizes:
                sizes.append(s)
    from results.record import fmt_bytes

    metafunc.parametrize("mem_size", sizes, ids=[fmt_bytes(s).replace(" ", "") for s in sizes])


# -- host capabilities ----------------------------------------------------------------------------


def skip_or_fail(config: pytest.Config, reason: str) -> None:
    """A capability the host's class requires is missing: skip naming it, or fail under --strict-host."""
    if config.getoption("strict_host"):
        policy = _session(config).host_policy()
        pytest.fail(f"--strict-host: host capability missing: {reason} (required by {policy.label()})", pytrace=False)
    pytest.skip(reason)


def _session(config: pytest.Config) -> Session:
    return config._snapproof  # type: ignore[attr-defined,no-any-return]


@pytest.fixture(scope="session")
def host() -> Any:
    from native.host import probe

    return probe()


@pytest.fixture(scope="session")
def host_policy(pytestconfig: pytest.Config) -> Any:
    """The gate policy's view of this host (results.hostpolicy.HostPolicy): its class and what that requires."""
    return _session(pytestconfig).host_policy()


def _enforce(config: pytest.Config, names: Any) -> str | None:
    """Skip (fail under --strict-host) for a missing capability the class requires; otherwise the reason naming
    each missing one it does not require (None when the host has them all)."""
    from native.host import probe

    required, unavailable = _session(config).host_policy().sort(probe(), names)
    if required:
        skip_or_fail(config, required[0])
    return "; ".join(unavailable) or None


@pytest.fixture
def require(request: pytest.FixtureRequest, host: Any) -> Callable[..., None]:
    """``require("uffd.WP_UNPOPULATED")``: skip (or fail under --strict-host) naming what is missing, when the
    host's class requires it; a capability the class does not require skips naming it as unavailable (never
    failed, never passed). Needs known before the run belong in ``needs`` markers: those deselect instead."""

    def _require(*names: str) -> None:
        if reason := _enforce(request.config, names):
            pytest.skip(reason)

    return _require


@pytest.fixture
def unavailable(request: pytest.FixtureRequest, host: Any) -> Callable[..., str | None]:
    """``unavailable(*names)``: None when the host has them all; the reason naming each missing one the class
    does not require (the caller leaves that part of its proof out and reports it); a missing one the class
    requires skips (fails under --strict-host) like ``require``."""

    def _unavailable(*names: str) -> str | None:
        return _enforce(request.config, names)

    return _unavailable


def parameter_needs(params: dict[str, Any]) -> list[str]:
    """What a case needs of the host because of its parameters, from the needs tables beside what the parameters
    name: ``strategy`` (native/strategies.py), ``loader`` (native/restore.py), ``backing`` (native/memory.py)."""
    if sys.platform == "win32":  # the tables describe the Linux backend: no case collected here uses them
        return []
    out: list[str] = []
    if "strategy" in params:
        from native.strategies import STRATEGY_NEEDS

        out += STRATEGY_NEEDS[params["strategy"]]
    if "loader" in params:
        from native.restore import LOADER_NEEDS

        out += LOADER_NEEDS[params["loader"]]
    if "backing" in params:
        from native.memory import BACKING_NEEDS

        out += BACKING_NEEDS.get(params["backing"], ())
    return out


def item_needs(item: pytest.Item) -> list[str]:
    """Every capability a case needs: its ``needs`` markers (module, class and function) and its parameters'."""
    names = [str(n) for m in item.iter_markers("needs") for n in m.args]
    callspec = getattr(item, "callspec", None)
    if callspec is not None:
        names += parameter_needs(callspec.params)
    return list(dict.fromkeys(names))


def deselect_unavailable(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect each case that needs a capability the host lacks and its class does not require, recording why.

    A case that also lacks a capability the class requires stays: it skips (fails under --strict-host) naming
    that one, the bigger gap. Nothing is probed when no case needs anything.
    """
    needing = [(item, needs) for item in items if (needs := item_needs(item))]
    if not needing:
        return
    from native.host import probe

    host, policy, session = probe(), _session(config).host_policy(), _session(config)
    dropped = []
    for item, needs in needing:
        required, unavailable = policy.sort(host, needs)
        if unavailable and not required:
            session.record_deselected(item, "; ".join(unavailable))
            dropped.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        gone = set(dropped)
        items[:] = [i for i in items if i not in gone]


def pytest_runtest_setup(item: pytest.Item) -> None:
    # What the class requires skips or fails here; what it does not require was deselected at collection.
    if (needs := item_needs(item)) and (reason := _enforce(item.config, needs)):
        pytest.skip(reason)


# What a test built through the factories, so a failure can put its state in the run record.
LIVE_RESOURCES = pytest.StashKey[list[Any]]()


def _live(item: pytest.Item) -> list[Any]:
    return item.stash.setdefault(LIVE_RESOURCES, [])


def _failure_facts(item: pytest.Item) -> dict[str, Any]:
    """Registers of every idle vCPU and stats of every WP engine the failed test built (never blocks)."""
    facts: dict[str, Any] = {}
    for n, obj in enumerate(_live(item)):
        try:
            if hasattr(obj, "vcpus"):  # a VM
                for v in obj.vcpus:
                    if (regs := v.regs_if_idle()) is None:
                        continue  # closed, or still inside a run: its state is not ours to read now
                    facts[f"vm{n}_vcpu{v.index}_regs"] = {k: f"{regs[k]:#x}" for k in
                                                          ("eip", "eflags", "eax", "ebx", "ecx", "edx", "esi", "esp")}
            elif hasattr(obj, "stats") and getattr(obj, "_w", None) is not None:  # a WP engine
                st = obj.stats()
                facts[f"wp{n}_stats"] = {"faults": st.faults, "fault_pages": st.fault_pages,
                                         "bulk_pages": st.bulk_pages, "handler_alive": st.handler_alive,
                                         "handler_err": st.handler_err, "arm_ns": st.arm_ns}
        except Exception as e:  # evidence gathering must never mask the failure itself
            facts[f"resource{n}_error"] = repr(e)
    return facts


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    rep: pytest.TestReport = outcome.get_result()
    from native.errors import CapabilityMissing

    # A capability found missing deep inside a fixture or the native layer is a skip too; --strict-host fails
    # it unless every capability it names is one the host's class does not require.
    if call.excinfo is not None and call.excinfo.errisinstance(CapabilityMissing):
        reason = str(call.excinfo.value)
        policy = _session(item.config).host_policy()
        names = getattr(call.excinfo.value, "capabilities", ())
        if item.config.getoption("strict_host") and (not names or any(policy.requires(n) for n in names)):
            rep.longrepr = f"--strict-host: host capability missing: {reason} (required by {policy.label()})"
        else:
            rep.outcome = "skipped"
            rep.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {reason}")
    session: Session = item.config._snapproof  # type: ignore[attr-defined]
    session.record_outcome(item, rep)
    if rep.failed and rep.when == "call" and (case := session.case_for(item)) is not None:
        for key, value in _failure_facts(item).items():
            case.fact(key, value)


# -- engine switches ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def inject(pytestconfig: pytest.Config) -> Any:
    """The fault-injection switches of this run (``--inject``); NONE unless a self-test asks."""
    from native.inject import parse

    try:
        return parse(pytestconfig.getoption("inject"))
    except ValueError as e:
        raise pytest.UsageError(f"--inject: {e}") from None


# -- resources: memory, VMs -----------------------------------------------------------------------


@pytest.fixture
def make_memory(require: Callable[..., None]) -> Iterator[Callable[..., Any]]:
    """Factory: ``make_memory("memfd", size)``; every mapping is closed at teardown, newest first."""
    from native.memory import GuestMemory

    made: list[Any] = []

    def _make(backing: str, size: int, **kw: Any) -> Any:
        from native.memory import BACKING_NEEDS

        require(*BACKING_NEEDS.get(backing, ()))
        ctors: dict[str, Callable[..., Any]] = {
            "memfd": GuestMemory.memfd, "anonymous": GuestMemory.anonymous, "hugetlb": GuestMemory.hugetlb,
            "file-private": GuestMemory.file_private, "file-readonly": GuestMemory.file_readonly}
        ctor = ctors.get(backing)
        if ctor is None:
            raise ValueError(f"unknown guest memory backing {backing!r}")
        mem = ctor(size=size, **kw)
        made.append(mem)
        return mem

    yield _make
    for mem in reversed(made):
        mem.close()


@pytest.fixture
def make_vm(request: pytest.FixtureRequest, make_memory: Any,
            require: Callable[..., None]) -> Iterator[Callable[..., Any]]:
    """Factory: ``make_vm(memory)`` -> a VM with ``memory`` at GPA 0 in slot 0; all closed at teardown."""
    require("kvm")
    from native.kvm import Vm

    made: list[Any] = []

    def _make(memory: Any, flags: int = 0) -> Any:
        vm = Vm.create()
        made.append(vm)
        _live(request.node).append(vm)
        vm.set_region(slot=0, gpa=0, memory=memory, flags=flags)
        return vm

    yield _make
    for vm in reversed(made):
        vm.close()


# -- reports and the run record -------------------------------------------------------------------


@pytest.fixture
def report(request: pytest.FixtureRequest) -> CaseReport:
    """The running test's case report: ``with report.stage("arm WP") as st: st.check(...)``."""
    case = request.config._snapproof.case_for(request.node)  # type: ignore[attr-defined]
    if case is None:
        # Self-tests outside a phase still get a report object; it is not printed.
        case = CaseReport(request.node.nodeid, request.node.name)
    return case


def _phase_of(item: pytest.Item) -> tuple[int, str] | None:
    m = item.get_closest_marker("phase")
    if m is None:
        return None
    return int(m.args[0]), str(m.args[1])


class Session:
    """Collects case reports per phase and writes them out at the end of the run."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.started = dt.datetime.now(dt.timezone.utc)
        self.t0 = time.perf_counter_ns()
        self.phases: dict[int, PhaseReport] = {}
        self.cases: dict[str, CaseReport] = {}
        self.record_path: Path | None = None
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
                "git_commit": _git_commit(),
                "policy": policy,
            },
            "host": host_facts,
            "capabilities": caps,
            "phases": [self.phases[n].to_dict() for n in sorted(self.phases)],
            "benchmarks": _benchmark_results(self.config),
        }

    def write(self, record: dict[str, Any]) -> Path | None:
        out = self.config.getoption("results_dir")
        if not out or not self.phases:
            return None
        d = Path(out)
        d.mkdir(parents=True, exist_ok=True)
        stamp = self.started.strftime("%Y%m%dT%H%M%SZ")
        path = d / f"{stamp}-{socket.gethostname()}.yaml"
        with open(path, "w") as f:
            yaml.safe_dump(record, f, sort_keys=False, allow_unicode=True, width=120)
        self.record_path = path
        return path


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
    session: Session = config._snapproof  # type: ignore[attr-defined]
    if session.deselected:
        # Printed whatever --reports says: a case left out for the host is part of the verdict, never a pass.
        terminalreporter.section(f"deselected for this host: {session.host_policy().label()}")
        for nodeid, reason in session.deselected.items():
            terminalreporter.write_line(f"{nodeid}\n    {reason}")
    if not session.phases or config.option.collectonly:  # --collect-only ran nothing: no record of it
        return
    mode = config.getoption("reports")
    record = session.record()
    if mode != "none":
        terminalreporter.section("snapproof phase reports")
        for phase in record["phases"]:
            terminalreporter.write_line(render_phase(phase, verbose=(mode == "full")))
            terminalreporter.write_line("")
    path = session.write(record)  # the record just printed, not a second gathering of it
    if path is not None:
        terminalreporter.write_line(f"run record: {os.path.relpath(path)}")
    if config.getoption("plots"):
        from results.plots import write_plots

        for name, got in write_plots(record, config.getoption("plots_dir")):
            terminalreporter.write_line(f"plot {name}: {got if isinstance(got, str) else os.path.relpath(got)}")


@pytest.fixture
def make_wp(request: pytest.FixtureRequest, make_memory: Any, inject: Any,
            require: Callable[..., None]) -> Iterator[Callable[..., Any]]:
    """Factory: ``make_wp(memory, destination)`` -> a WpSnapshot with this run's --inject switches.

    Teardown closes every engine (un-protecting before the uffd is dropped) before the memory goes.
    """
    require("uffd")
    from native.wp import WpSnapshot

    made: list[Any] = []

    def _make(memory: Any, destination: Any, **kw: Any) -> Any:
        kw.setdefault("inject", inject)
        snap = WpSnapshot(memory, destination, **kw)
        made.append(snap)
        _live(request.node).append(snap)
        return snap

    yield _make
    for snap in reversed(made):
        snap.close()


@pytest.fixture
def make_marker16_vm(make_vm: Callable[..., Any]) -> Callable[..., Any]:
    """Factory: ``make_marker16_vm(memory, plant=True)`` -> (vm, vcpu) ready to run marker16 from 0:0x100.

    With ``plant`` the BEFORE marker 0xBE is written at GPA 0x1000 (the original proof's setup);
    without it, page 0x1000 is left as it is (a hole in fresh memory).
    """
    import guests

    def _make(memory: Any, plant: bool = True) -> tuple[Any, Any]:
        memory.write(guests.REAL_MODE_LOAD_GPA, guests.load("marker16"))
        if plant:
            memory.write(guests.MARKER_GPA, bytes([guests.MARKER_BEFORE]))
        vm = make_vm(memory)
        vcpu = vm.add_vcpu()
        vcpu.set_real_mode(ip=guests.REAL_MODE_LOAD_GPA)
        return vm, vcpu

    return _make


# -- the write-storm guest, running ---------------------------------------------------------------


class StormVm:
    """A VM running storm32 on each vCPU over disjoint slices of the data region."""

    def __init__(self, memory: Any, vm: Any, params: list[Any]) -> None:
        self.memory = memory
        self.vm = vm
        self.params = params

    @staticmethod
    def block_gpa(i: int) -> int:
        import guests

        return guests.PARAM_BLOCK_GPA + guests.PARAM_BLOCK_STRIDE * i

    def progress(self, i: int, image: Any = None) -> Any:
        """vCPU i's progress words, from live memory or from an image of it (a snapshot, a reference)."""
        from guests import storm

        gpa = self.block_gpa(i)
        block = self.memory.read(gpa, storm.BLOCK_SIZE) if image is None else bytes(image[gpa:gpa + storm.BLOCK_SIZE])
        return storm.read_progress(block)

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        from native.errors import GuestTimeout

        end = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > end:
                raise GuestTimeout(f"storm guest: {what} not reached within {timeout} s "
                                   f"(progress {[self.progress(i) for i in range(len(self.params))]})")
            time.sleep(0.002)

    def region(self, image: Any, i: int) -> bytes:
        p = self.params[i]
        return bytes(image[p.region_gpa:p.region_gpa + p.region_size])


STORM_TOP_GPA = 0xFEC00000


@pytest.fixture
def make_storm_vm(make_memory: Callable[..., Any], make_vm: Callable[..., Any]) -> Callable[..., StormVm]:
    """Factory: ``make_storm_vm(backing, size, vcpus, seed, slot_flags=0)``: storm32 loaded, each vCPU set up,
    not yet running.

    The data region (GPA 0x10000 to the end) is split into equal disjoint slices, one per vCPU; each
    vCPU sweeps its slice forever (generations = 0) in the order its seed gives.
    """
    import guests
    from guests import storm

    def _make(backing: str, size: int, vcpus: int, seed: int = 0x5EED, slot_flags: int = 0,
              **mem_kw: Any) -> StormVm:
        mem = make_memory(backing, size, **mem_kw)
        mem.write(guests.FLAT32_LOAD_GPA, guests.load("storm32"))
        # A 32-bit guest's writes stay below the x86 MMIO window under 4 GiB (IOAPIC 0xFEC00000, LAPIC
        # 0xFEE00000: KVM exits there as MMIO), so with --sizes 4G the top 20 MiB are memory the storm never writes.
        pages = (min(size, STORM_TOP_GPA) - guests.DATA_REGION_GPA) // 4096 // vcpus
        if pages < 2:
            raise ValueError(f"guest memory {size:#x} leaves fewer than 2 storm pages per vCPU")
        vm = make_vm(mem, flags=slot_flags)  # slot_flags: e.g. KVM_MEM_LOG_DIRTY_PAGES for the KVM dirty log
        params = []
        for i in range(vcpus):
            p = storm.StormParams.from_seed(seed + i, region_gpa=guests.DATA_REGION_GPA + i * pages * 4096,
                                            npages=pages, generations=0)
            mem.write(StormVm.block_gpa(i), p.pack())
            vcpu = vm.add_vcpu()
            vcpu.set_flat32(eip=guests.FLAT32_LOAD_GPA, esp=0x7000 - 0x400 * i, esi=StormVm.block_gpa(i))
            params.append(p)
        return StormVm(mem, vm, params)

    return _make


@pytest.fixture(scope="session")
def host_limits() -> dict[str, float]:
    """This host's own limits, measured once per run: figures are reported as ratios to them."""
    from native.memory import warm_memcpy_bandwidth

    return {"memcpy_bytes_per_s": warm_memcpy_bandwidth(64 << 20)}


# -- round trip: capture into a snapshot file, restore into a fresh VM ----------------------------


def enter_guest_at_entry(guest: str, vcpu: Any) -> None:
    """Put a vCPU at the guest's entry (docs/CONTRACTS.md): the reset state of a re-run from the start.

    marker16: real mode at 0:0x100. counter32: flat 32-bit at 0x1000, ESI = vCPU 0's parameter block,
    ESP = 0x7000.
    """
    import guests

    if guest == "marker16":
        vcpu.set_real_mode(ip=guests.REAL_MODE_LOAD_GPA)
    elif guest == "counter32":
        vcpu.set_flat32(eip=guests.FLAT32_LOAD_GPA, esp=0x7000, esi=guests.PARAM_BLOCK_GPA)
    else:
        raise ValueError(f"no entry known for guest {guest!r} (marker16, counter32)")


def load_counter32(memory: Any, params: Any) -> None:
    """counter32's code at 0x1000 and ``params`` in vCPU 0's parameter block at 0x8000."""
    import guests

    memory.write(guests.FLAT32_LOAD_GPA, guests.load("counter32"))
    memory.write(guests.PARAM_BLOCK_GPA, params.pack())


@pytest.fixture
def enter_guest() -> Callable[[str, Any], None]:
    """``enter_guest("marker16" | "counter32", vcpu)``: the vCPU at the guest's entry. A restore falls
    back to it (``reset=``) when a snapshot file holds no vCPU state."""
    return enter_guest_at_entry


@pytest.fixture
def make_counter32_vm(make_vm: Callable[..., Any]) -> Callable[..., Any]:
    """Factory: ``make_counter32_vm(memory, params)`` -> (vm, vcpu): counter32 at 0x1000, ``params`` in
    vCPU 0's block at 0x8000, the vCPU at the entry, not yet running."""

    def _make(memory: Any, params: Any) -> tuple[Any, Any]:
        load_counter32(memory, params)
        vm = make_vm(memory)
        vcpu = vm.add_vcpu()
        enter_guest_at_entry("counter32", vcpu)
        return vm, vcpu

    return _make


class CounterRun:
    """What an uninterrupted counter32 run left at HLT: all of memory, the registers, the sync values."""

    def __init__(self, memory: bytes, regs: dict[str, int], syncs: list[int], run_ns: int) -> None:
        self.memory = memory
        self.regs = regs
        self.syncs = syncs
        self.run_ns = run_ns


@pytest.fixture(scope="session")
def counter32_uninterrupted() -> Callable[..., CounterRun]:
    """``counter32_uninterrupted(params, mem_size)`` -> CounterRun: counter32 run from its entry to HLT
    in a VM of its own (memfd), never paused or snapshotted. Run once per (params, size) and kept for
    the session: every loader's resumed run is compared with the same reference."""
    from native.errors import GuestTimeout
    from native.kvm import ExitReason, Vm
    from native.memory import GuestMemory

    runs: dict[tuple[Any, int], CounterRun] = {}

    def _run(params: Any, mem_size: int, timeout: float = 60.0) -> CounterRun:
        key = (params, mem_size)
        if key not in runs:
            with GuestMemory.memfd(mem_size) as mem, Vm.create() as vm:
                load_counter32(mem, params)
                vm.set_region(slot=0, gpa=0, memory=mem)
                vcpu = vm.add_vcpu()
                enter_guest_at_entry("counter32", vcpu)
                syncs: list[int] = []
                end = time.monotonic() + timeout
                run_ns = 0
                while True:
                    ex = vcpu.run(timeout=max(end - time.monotonic(), 0.001), stop_on_sync=True)
                    run_ns += ex.run_ns
                    if ex.reason is ExitReason.HLT:
                        break
                    if ex.reason is ExitReason.TIMEOUT:
                        raise GuestTimeout(f"uninterrupted counter32 run: no HLT within {timeout} s")
                    if ex.reason is not ExitReason.SYNC:
                        raise RuntimeError(f"uninterrupted counter32 run: expected SYNC or HLT, saw {ex.describe()}")
                    syncs.append(ex.last_sync)
                runs[key] = CounterRun(mem.snapshot_bytes(), vcpu.regs(), syncs, run_ns)
        return runs[key]

    return _run


@pytest.fixture
def wait_until() -> Callable[..., None]:
    """``wait_until(predicate, what, timeout=30.0)``: poll until ``predicate()`` is true; GuestTimeout
    naming ``what`` if it is not by the deadline."""
    from native.errors import GuestTimeout

    def _wait(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > end:
                raise GuestTimeout(f"{what}: not reached within {timeout} s")
            time.sleep(0.0001)

    return _wait


@pytest.fixture
def capture_snapshot(tmp_path: Path, inject: Any, require: Callable[..., None]) -> Iterator[Callable[..., Any]]:
    """Factory: ``capture_snapshot(memory, name, vcpus=(), runner=None)`` -> native.capture.FileCapture.

    The WP engine writes straight into a new snapshot file in the test's tmp_path, with this run's
    --inject switches. The files are deleted at teardown, so large images do not pile up in /tmp.
    """
    require("uffd")
    from native.capture import capture_to_file

    made: list[Path] = []

    def _capture(memory: Any, name: str = "snapshot", **kw: Any) -> Any:
        path = tmp_path / f"{name}.snap"
        made.append(path)
        kw.setdefault("inject", inject)
        return capture_to_file(path, memory, **kw)

    yield _capture
    for path in made:
        path.unlink(missing_ok=True)


@pytest.fixture
def make_restored_vm(require: Callable[..., None]) -> Iterator[Callable[..., Any]]:
    """Factory: ``make_restored_vm(image_or_path, loader, verify=True, reset=None)`` -> native.restore.RestoredVm.

    Loaders: read-copy, map-private, lazy-uffd. Teardown closes each, newest first: the VM, then the
    lazy loader's handler, then the memory.
    """
    require("kvm")
    from native.restore import restore_vm

    made: list[Any] = []

    def _make(image: Any, loader: str, **kw: Any) -> Any:
        from native.restore import LOADER_NEEDS

        require(*LOADER_NEEDS[loader])
        restored = restore_vm(image, loader, **kw)
        made.append(restored)
        return restored

    yield _make
    for restored in reversed(made):
        restored.close()
