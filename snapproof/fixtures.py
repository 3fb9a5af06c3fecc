"""snapproof's pytest plugin: options, host capabilities, guest memory, VMs, WP engines and running guests.

An installed snapproof (a wheel, or an editable install) has pytest load this module by its ``pytest11``
entry point, named ``snapproof.fixtures`` after the module; a checkout's conftest.py asks for it by that name
too, which is then a no-op. It brings the results plugins with it (``pytest_plugins``).

Fixtures are layered by lifecycle, after Firecracker: ``make_memory`` and
``make_vm`` are factories that own cleanup; ``report`` is the running test's
case report. A missing host capability skips with the exact reason from
``native.host`` (``--strict-host`` turns it into a failure) when the gate
policy's class for this host requires it; one it does not require deselects
the cases that need it, naming it (results/hostpolicy.py). The case reports
and the run record (``report``, ``--results-dir``, ``--results-file``) are the
plugin results/plugin.py.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from snapproof.native.host import parse_size  # (--sizes and --max-size; snapproof host --sizes too)
from snapproof.results.hostpolicy import DEFAULT_POLICY

pytest_plugins = ("snapproof.results.interrupts", "snapproof.results.hostload", "snapproof.results.plugin")


# -- options --------------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("snapproof")
    g.addoption("--strict-host", action="store_true",
                help="fail, instead of skip, every test missing a host capability its host class requires (release "
                     "gates); what the class does not require is deselected, naming it")
    g.addoption("--policy", default=str(DEFAULT_POLICY), metavar="PATH",
                help="the gate policy whose host class says which capabilities are required ('' for none: all are)")
    g.addoption("--sizes", default="", metavar="LIST",
                help="extra guest memory sizes for the sized phases, e.g. 1G,4G (default: the phase's own)")
    g.addoption("--inject", default="none", metavar="SWITCH[,SWITCH]",
                help="engine fault-injection switches (native/inject.py): with a bug switch the phases must FAIL; "
                     "with a performance switch they pass and the release gate must fail")
    g.addoption("--engine", default="", metavar="PATH",
                help="judge this snapshot engine (a shared library implementing native/snapproof_engine.h) in "
                     "phases 1, 2, 3 and phase 5's WP row instead of the built-in one; the record names it")
    g.addoption("--long", action="store_true", help="run the opt-in long runs (marked slow)")
    g.addoption("--nested", action="store_true",
                help="also run the suite on kvm_amd nested under QEMU TCG (tests/test_nested_kvm_amd.py)")
    g.addoption("--nested-kernel", default="", metavar="PACKAGE|DEB",
                help="the nested host's Debian kernel: a versioned package (linux-image-6.1.0-50-amd64) or a .deb of "
                     "one, e.g. your fleet's point release (default: the one linux-image-amd64 points at)")
    g.addoption("--max-size", default="", metavar="SIZE",
                help="deselect sized cases above SIZE, e.g. 64M (slow emulated hosts: the nested kvm_amd run)")
    g.addoption("--fuzz-examples", type=int, default=500, help="hypothesis examples for the file fuzzers")
    g.addoption("--reserve-hugepages", type=int, default=0, metavar="N",
                help="reserve N more 2 MiB hugepages for the hugetlb cases; vm.nr_hugepages is restored at exit")
    g.addoption("--host-lock-wait", type=float, default=600.0, metavar="SECONDS",
                help="how long --thp or --reserve-hugepages waits for another run that holds the host's THP and "
                     "hugepage settings before giving up (results/hostlock.py)")
    g.addoption("--thp", action="store_true",
                help="turn transparent huge pages on for MADV_HUGEPAGE memory (anonymous, shmem, one mTHP size at a "
                     "time) for the THP cases; every /sys/kernel/mm/transparent_hugepage knob is restored at exit")


NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")


def settings_not_made(config: pytest.Config, not_made: list[str]) -> None:
    """--thp or --reserve-hugepages could not change the host (not root) and the host is not so already: under
    --strict-host a usage error before anything runs, naming what to paste as root; otherwise a warning, and the
    cases that need the settings skip naming them."""
    if not not_made:
        return
    if config.getoption("strict_host"):
        raise pytest.UsageError("\n".join([*not_made, f"(what else this host lacks: {sys.executable} -m snapproof host "
                                                       "--quiet)"]))
    import warnings

    for text in not_made:
        warnings.warn(pytest.PytestWarning(text), stacklevel=2)


def pytest_configure(config: pytest.Config) -> None:
    from snapproof.native import fixes, host
    from snapproof.native.errors import uid

    host.ask_sizes([parse_size(t) for t in config.getoption("sizes").split(",") if t.strip()])
    not_made = []
    if config.getoption("thp") and not hasattr(config, "workerinput"):
        from snapproof.native import thp
        from snapproof.results.hostlock import hold_host_settings

        hold_host_settings(config, "--thp")
        changes = thp.KnobChanges()
        config._snapproof_thp = changes  # type: ignore[attr-defined]
        todo = [(str(path), value) for path, value in thp.knobs_the_thp_cases_need()]
        if thp.knobs_writable():
            try:
                thp.enable_for_run(changes)
            except OSError as e:
                not_made.append(f"--thp: cannot set a THP knob: {e}; {fixes.thp_knobs(todo)}")
        elif todo:  # set by root already (the fix below): nothing to do
            not_made.append(f"--thp: uid {uid()} cannot set the THP knobs, and these are off; "
                            f"{fixes.thp_knobs(todo)}")
    if config.getoption("engine"):
        engine_under_test(config)  # a library that cannot be judged is a usage error, before anything runs
    want = config.getoption("reserve_hugepages")
    if want > 0 and not hasattr(config, "workerinput"):
        # Only on request, and undone in pytest_unconfigure: the suite never changes host settings on its own.
        from snapproof.results.hostlock import hold_host_settings

        hold_host_settings(config, f"--reserve-hugepages {want}")
        before = int(NR_HUGEPAGES.read_text())
        try:
            NR_HUGEPAGES.write_text(f"{before + want}\n")
            config._snapproof_hugepages_before = before  # type: ignore[attr-defined]
        except OSError as e:
            mi = host.meminfo()
            free, total = mi.get("HugePages_Free", 0), mi.get("HugePages_Total", 0)
            if free < want:  # reserved by root already (the fix below): nothing to add
                not_made.append(f"--reserve-hugepages {want}: cannot write {NR_HUGEPAGES} ({e.strerror}), and "
                                f"{free} are free; {fixes.hugepages(want, free, total)}")
    settings_not_made(config, not_made)


def pytest_unconfigure(config: pytest.Config) -> None:
    before = getattr(config, "_snapproof_hugepages_before", None)
    if before is not None:
        NR_HUGEPAGES.write_text(f"{before}\n")
    if (changes := getattr(config, "_snapproof_thp", None)) is not None:
        changes.restore()
    if sys.platform.startswith("linux"):
        from snapproof.results.hostlock import release_host_settings

        release_host_settings(config)


# Modules that drive KVM or userfaultfd: a Windows host does not collect them (its gate is phases 0 and 4).
LINUX_ONLY_MODULES = ["phases/test_phase1_*.py", "phases/test_phase2_*.py", "phases/test_phase3_*.py",
                      "phases/test_phase5_*.py", "phases/test_phase6_*.py",
                      "tests/test_phase[12356]_*.py", "tests/test_guests_on_kvm.py", "tests/test_reliability*.py",
                      "tests/test_wheel.py"]


def linux_only(path: Path) -> bool:
    """A module of LINUX_ONLY_MODULES, matched from the right (``phases/test_phase1_*.py``): the same patterns
    hold for a checkout and for the phases of an install."""
    return any(path.match(p) for p in LINUX_ONLY_MODULES)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """On Windows, leave the Linux-only modules out."""
    return True if sys.platform == "win32" and linux_only(collection_path) else None


def on_platform(name: str) -> bool:
    return sys.platform.startswith(name)


@pytest.hookimpl(trylast=True)  # after -k / -m: only what would run is probed for, and deselected for the host
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests for another OS's backend, long or nested runs nobody asked for (--long, --nested), and sizes past
    # --max-size are deselected, not skipped: a skip means a missing host capability, and a phase with one is not
    # a PASS.
    long, nested = config.getoption("long"), config.getoption("nested")
    max_size = parse_size(config.getoption("max_size")) if config.getoption("max_size") else None

    def too_large(item: pytest.Item) -> bool:
        size = getattr(item, "callspec", None) and item.callspec.params.get("mem_size")  # type: ignore[attr-defined]
        return max_size is not None and isinstance(size, int) and size > max_size

    unwanted = [i for i in items if ((m := i.get_closest_marker("platform")) and not on_platform(m.args[0]))
                or (not long and i.get_closest_marker("slow")) or (not nested and i.get_closest_marker("nested"))
                or too_large(i)]
    if unwanted:
        config.hook.pytest_deselected(items=unwanted)
        items[:] = [i for i in items if i not in unwanted]
    deselect_unavailable(config, items)
    deselect_for_engine(config, items)


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
    from snapproof.results.record import fmt_bytes

    metafunc.parametrize("mem_size", sizes, ids=[fmt_bytes(s).replace(" ", "") for s in sizes])


# -- host capabilities ----------------------------------------------------------------------------


def skip_or_fail(config: pytest.Config, reason: str) -> None:
    """A capability the host's class requires is missing: skip naming it, or fail under --strict-host."""
    if config.getoption("strict_host"):
        policy = _session(config).host_policy()
        pytest.fail(f"--strict-host: host capability missing: {reason} (required by {policy.label()})", pytrace=False)
    pytest.skip(reason)


def _session(config: pytest.Config) -> Any:
    """This run's results.plugin.RunRecorder (imported here: pytest loads that plugin itself, after this module)."""
    from snapproof.results.plugin import recorder

    return recorder(config)


@pytest.fixture(scope="session")
def host() -> Any:
    from snapproof.native.host import probe

    return probe()


@pytest.fixture(scope="session")
def host_policy(pytestconfig: pytest.Config) -> Any:
    """The gate policy's view of this host (results.hostpolicy.HostPolicy): its class and what that requires."""
    return _session(pytestconfig).host_policy()


def _enforce(config: pytest.Config, names: Any) -> str | None:
    """Skip (fail under --strict-host) for a missing capability the class requires; otherwise the reason naming
    each missing one it does not require (None when the host has them all)."""
    from snapproof.native.host import probe

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
        from snapproof.native.strategies import STRATEGY_NEEDS

        out += STRATEGY_NEEDS[params["strategy"]]
    if "loader" in params:
        from snapproof.native.restore import LOADER_NEEDS

        out += LOADER_NEEDS[params["loader"]]
    if "backing" in params:
        from snapproof.native.memory import BACKING_NEEDS

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
    from snapproof.native.host import probe

    host, policy = probe(), _session(config).host_policy()
    why = {}
    for item, needs in needing:
        required, unavailable = policy.sort(host, needs)
        if unavailable and not required:
            why[item] = "; ".join(unavailable)
    _deselect(config, items, why)


def engine_offers(item: pytest.Item) -> list[str]:
    """The engine capabilities a case needs: its ``engine_offers`` markers and its ``strategy`` parameter's
    (native.strategies.STRATEGY_ENGINE_OFFERS)."""
    caps = [str(c) for m in item.iter_markers("engine_offers") for c in m.args]
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "strategy" in callspec.params and sys.platform != "win32":
        from snapproof.native.strategies import STRATEGY_ENGINE_OFFERS

        caps += STRATEGY_ENGINE_OFFERS.get(callspec.params["strategy"], ())
    return list(dict.fromkeys(caps))


def deselect_for_engine(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect each case needing a capability the engine under test does not offer (an optional part of the
    engine ABI, native.engine.CAPABILITIES; ``engine_offers``), recording why: not a pass, and no host's fault."""
    wanting = [(i, engine_offers(i)) for i in items]
    wanting = [(i, caps) for i, caps in wanting if caps]
    if not wanting:
        return
    engine = engine_under_test(config)
    lacking = {item: [why for c in caps if (why := engine.lacks(c))] for item, caps in wanting}
    _deselect(config, items, {item: "; ".join(reasons) for item, reasons in lacking.items() if reasons})


def _deselect(config: pytest.Config, items: list[pytest.Item], why: dict[pytest.Item, str]) -> None:
    """Leave out each case ``why`` names, its reason in the run record and the terminal summary."""
    if not why:
        return
    session = _session(config)
    for item, reason in why.items():
        session.record_deselected(item, reason)
    config.hook.pytest_deselected(items=list(why))
    items[:] = [i for i in items if i not in why]


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
            elif hasattr(obj, "evidence"):  # a WP snapshot: its engine, counters and named points
                facts[f"wp{n}_stats"] = obj.evidence()
        except Exception as e:  # evidence gathering must never mask the failure itself
            facts[f"resource{n}_error"] = repr(e)
    return facts


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    rep: pytest.TestReport = outcome.get_result()
    from snapproof.native.errors import CapabilityMissing

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

    if rep.failed and rep.when == "call" and (case := _session(item.config).case_for(item)) is not None:
        for key, value in _failure_facts(item).items():
            case.fact(key, value)


# -- engine switches ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def inject(pytestconfig: pytest.Config) -> Any:
    """The fault-injection switches of this run (``--inject``); NONE unless a self-test asks."""
    from snapproof.native.inject import parse

    try:
        return parse(pytestconfig.getoption("inject"))
    except ValueError as e:
        raise pytest.UsageError(f"--inject: {e}") from None


ENGINE = pytest.StashKey[Any]()


def engine_under_test(config: pytest.Config) -> Any:
    """The engine this run judges (native.engine.Engine): ``--engine PATH``, else the built-in one; loaded once.

    A library the suite cannot judge (missing, another ABI version, a function short) is a usage error naming
    why; so is an --inject switch that acts inside the built-in engine given with another engine."""
    if (engine := config.stash.get(ENGINE, None)) is not None:
        return engine
    from snapproof.native.engine import EngineError, builtin_engine, load_engine
    from snapproof.native.inject import C_SWITCHES, parse

    path = config.getoption("engine")
    try:
        engine = load_engine(path) if path else builtin_engine()
    except EngineError as e:
        raise pytest.UsageError(f"--engine: {e}") from None
    try:
        switches = parse(config.getoption("inject")).value & C_SWITCHES
    except ValueError:
        switches = 0  # the inject fixture says what is wrong with it
    if switches and not engine.builtin:
        raise pytest.UsageError(f"--inject {config.getoption('inject')}: those switches act inside the built-in "
                                f"engine; --engine {engine.label()} has none of its own")
    config.stash[ENGINE] = engine
    return engine


@pytest.fixture(scope="session")
def engine(pytestconfig: pytest.Config) -> Any:
    """The snapshot engine under test (``--engine PATH``, else the built-in one): native.engine.Engine."""
    return engine_under_test(pytestconfig)


# -- resources: memory, VMs -----------------------------------------------------------------------


@pytest.fixture
def make_memory(require: Callable[..., None]) -> Iterator[Callable[..., Any]]:
    """Factory: ``make_memory("memfd", size)``; every mapping is closed at teardown, newest first.

    ``"anonymous-thp"`` and ``"memfd-thp"`` are the same with transparent huge pages (``thp=True``), skipped
    (failed under --strict-host) naming the knob when this host's THP is off for them (``--thp`` turns it on).

    ``"hypervisor-cow"`` (``path=``, ``offset=``, ``inject=``) is a HypervisorCowMemory: a PROT_READ view of
    the file and a private overlay, put in a VM's slots by ``make_vm``.
    """
    from snapproof.native.hv_cow import HypervisorCowMemory
    from snapproof.native.memory import GuestMemory
    from snapproof.native.thp import THP_BACKING_NEEDS

    made: list[Any] = []

    def _make(backing: str, size: int, **kw: Any) -> Any:
        from snapproof.native.memory import BACKING_NEEDS

        require(*BACKING_NEEDS.get(backing, ()))
        if backing in THP_BACKING_NEEDS:
            backing, kw = backing.removesuffix("-thp"), {**kw, "thp": True}
        ctors: dict[str, Callable[..., Any]] = {
            "memfd": GuestMemory.memfd, "anonymous": GuestMemory.anonymous, "hugetlb": GuestMemory.hugetlb,
            "file-private": GuestMemory.file_private, "file-readonly": GuestMemory.file_readonly,
            "hypervisor-cow": HypervisorCowMemory}
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
def only_mthp_size(request: pytest.FixtureRequest, require: Callable[..., None]) -> Iterator[Callable[[int], None]]:
    """``only_mthp_size(size)``: anonymous MADV_HUGEPAGE faults of this test get folios of that mTHP size alone.

    With --thp (and root) the per-size knobs are set for the test and put back at teardown; otherwise the size
    must be enabled already. Then larger sizes may be too, and the kernel picks the largest that fits: without
    root the folio cannot be read and the test notes so; as root (which reads it) that skips naming them. Skips
    (fails under --strict-host) naming the knob otherwise.
    """
    from snapproof.native import thp
    from snapproof.native.errors import uid
    from snapproof.native.fixes import thp_knobs

    require("thp.mthp")
    changes = thp.KnobChanges()

    def _only(size: int) -> None:
        if request.config.getoption("thp") and thp.knobs_writable():
            thp.only_mthp_size(changes, size)
        elif (why := thp.mthp_missing(size)) is not None:
            skip_or_fail(request.config, f"anonymous mTHP of {size >> 10} KiB: {why}; "
                                         f"{thp_knobs([(str(thp.mthp_knob(size)), 'madvise')])}")
        elif uid() == 0 and (larger := thp.larger_sizes_on(size)):
            skip_or_fail(request.config, f"anonymous mTHP of {size >> 10} KiB alone: {', '.join(larger)} on too, and "
                                         "the kernel picks the largest that fits; --thp sets each size alone for its "
                                         "case")

    yield _only
    changes.restore()


@pytest.fixture
def make_vm(request: pytest.FixtureRequest, make_memory: Any,
            require: Callable[..., None]) -> Iterator[Callable[..., Any]]:
    """Factory: ``make_vm(memory, flags=0)`` -> a VM with ``memory`` as its RAM (``Vm.map_memory``: slot 0 from
    GPA 0, slot 1 from 4 GiB past the 32-bit hole); all closed at teardown.

    HypervisorCowMemory lays out its own slots (read-only over the file, writable over its private pages)
    and serves the VM's write exits from then on. The VMs close before the memory they map (make_memory's
    teardown runs after this one's).
    """
    require("kvm")
    from snapproof.native.hv_cow import HypervisorCowMemory
    from snapproof.native.kvm import Vm

    made: list[Any] = []

    def _make(memory: Any, flags: int = 0) -> Any:
        vm = Vm.create()
        made.append(vm)
        _live(request.node).append(vm)
        if isinstance(memory, HypervisorCowMemory):
            if flags:
                raise ValueError(f"slot flags {flags:#x}: hypervisor-level COW memory sets its slots' flags itself")
            memory.attach(vm)
        else:
            vm.map_memory(memory, flags=flags)
        return vm

    yield _make
    for vm in reversed(made):
        vm.close()


@pytest.fixture
def make_wp(request: pytest.FixtureRequest, make_memory: Any, inject: Any, engine: Any,
            require: Callable[..., None]) -> Iterator[Callable[..., Any]]:
    """Factory: ``make_wp(memory, destination, points=None)`` -> a WpSnapshot taken by the engine under test
    (``--engine``) with this run's --inject switches; ``points`` (native.points.SlowPoints) lets a test hold
    the engine at its named points.

    Teardown closes every engine (releasing any hold, un-protecting before the uffd is dropped) before the
    memory goes.
    """
    require("uffd")
    from snapproof.native.wp import WpSnapshot

    yield from _engine_objects(request, inject, engine, WpSnapshot)


@pytest.fixture
def make_wp_snapshots(request: pytest.FixtureRequest, make_memory: Any, inject: Any, engine: Any,
                      require: Callable[..., None]) -> Iterator[Callable[..., Any]]:
    """Factory: ``make_wp_snapshots(memory, points=None)`` -> a WpSnapshots: one engine object of the engine under
    test taking several snapshots, each armed with its own destination (overlapping, consecutive); closed at
    teardown like ``make_wp``'s. The cases that use it carry ``engine_offers`` markers."""
    require("uffd")
    from snapproof.native.wp import WpSnapshots

    yield from _engine_objects(request, inject, engine, WpSnapshots)


def _engine_objects(request: pytest.FixtureRequest, inject: Any, engine: Any,
                    build: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    """The factory behind make_wp and make_wp_snapshots: this run's switches and engine, each object closed at
    teardown, newest first, and its evidence in the record of a failure."""
    made: list[Any] = []

    def _make(*args: Any, **kw: Any) -> Any:
        kw.setdefault("inject", inject)
        kw.setdefault("engine", engine)
        obj = build(*args, **kw)
        made.append(obj)
        _live(request.node).append(obj)
        return obj

    yield _make
    for obj in reversed(made):
        obj.close()


@pytest.fixture
def make_marker16_vm(make_vm: Callable[..., Any]) -> Callable[..., Any]:
    """Factory: ``make_marker16_vm(memory, plant=True)`` -> (vm, vcpu) ready to run marker16 from 0:0x100.

    With ``plant`` the BEFORE marker 0xBE is written at GPA 0x1000 (the original proof's setup);
    without it, page 0x1000 is left as it is (a hole in fresh memory).
    """
    from snapproof import guests

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
        from snapproof import guests

        return guests.PARAM_BLOCK_GPA + guests.PARAM_BLOCK_STRIDE * i

    def progress(self, i: int, image: Any = None) -> Any:
        """vCPU i's progress words, from live memory or from an image of it (a snapshot, a reference)."""
        from snapproof.guests import storm
        from snapproof.native.layout import offset_of

        at = offset_of(self.block_gpa(i))
        block = self.memory.read(at, storm.BLOCK_SIZE) if image is None else bytes(image[at:at + storm.BLOCK_SIZE])
        return storm.read_progress(block)

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        from snapproof.native.errors import GuestTimeout

        end = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > end:
                raise GuestTimeout(f"storm guest: {what} not reached within {timeout} s "
                                   f"(progress {[self.progress(i) for i in range(len(self.params))]})")
            time.sleep(0.002)

    def run_to_marks(self, timeout: float) -> list[Any]:
        """Run each vCPU in this thread, one after the other, until its mark (the sync ``mark_pages`` pages into
        its first sweep); returns each run's exit. Each then stays exactly there until it runs again."""
        return [vcpu.run(timeout=timeout, stop_on_sync=True) for vcpu in self.vm.vcpus]

    def region(self, image: Any, i: int) -> bytes:
        """vCPU i's storm region, copied out of an image of guest memory."""
        with self.region_view(image, i) as view:
            return bytes(view)

    def region_view(self, image: Any, i: int) -> memoryview:
        """vCPU i's storm region in place in an image of guest memory (no copy: 4 GiB guests have 3 GiB regions).
        Use it as a context manager, so the view is released before the image is closed."""
        from snapproof.native.layout import offset_of

        p = self.params[i]
        at = offset_of(p.region_gpa)  # the region lies below the 32-bit hole: one contiguous range of memory
        return memoryview(image)[at:at + p.region_size]


@pytest.fixture
def make_storm_vm(make_memory: Callable[..., Any], make_vm: Callable[..., Any]) -> Callable[..., StormVm]:
    """Factory: ``make_storm_vm(backing, size, vcpus, seed, slot_flags=0, mark=None)``: storm32 loaded, each vCPU
    set up, not yet running.

    The data region (GPA 0x10000 up to the end of RAM below the 32-bit hole, less ``reserve`` bytes at its top)
    is split into equal disjoint slices, one per vCPU; each vCPU sweeps its slice forever (generations = 0) in the
    order its seed gives.
    ``mark(npages)`` -> pages of its first sweep after which each vCPU signals its mark (``StormVm.run_to_marks``).
    """
    from snapproof import guests
    from snapproof.guests import storm
    from snapproof.native.layout import LOW_RAM_END

    def _make(backing: str, size: int, vcpus: int, seed: int = 0x5EED, slot_flags: int = 0,
              mark: Callable[[int], int] | None = None, reserve: int = 0, **mem_kw: Any) -> StormVm:
        mem = make_memory(backing, size, **mem_kw)
        mem.write(guests.FLAT32_LOAD_GPA, guests.load("storm32"))
        # A flat 32-bit guest names only GPAs below 4 GiB, and RAM there ends at the 32-bit hole
        # (native.layout): past 3 GiB (--sizes 4G) memory sits at GPA 4 GiB, out of the storm's reach. The
        # snapshot and the exact oracle still cover it all; only the instant oracle stops at the region.
        # ``reserve`` bytes at the top of that RAM stay out of every region (a device area the VMM writes).
        pages = (min(size, LOW_RAM_END) - reserve - guests.DATA_REGION_GPA) // 4096 // vcpus
        if pages < 2:
            raise ValueError(f"guest memory {size:#x} leaves fewer than 2 storm pages per vCPU")
        vm = make_vm(mem, flags=slot_flags)  # slot_flags: e.g. KVM_MEM_LOG_DIRTY_PAGES for the KVM dirty log
        params = []
        for i in range(vcpus):
            p = storm.StormParams.from_seed(seed + i, region_gpa=guests.DATA_REGION_GPA + i * pages * 4096,
                                            npages=pages, generations=0, mark_pages=mark(pages) if mark else 0)
            mem.write(StormVm.block_gpa(i), p.pack())
            vcpu = vm.add_vcpu()
            vcpu.set_flat32(eip=guests.FLAT32_LOAD_GPA, esp=0x7000 - 0x400 * i, esi=StormVm.block_gpa(i))
            params.append(p)
        return StormVm(mem, vm, params)

    return _make


@pytest.fixture(scope="session")
def host_limits() -> dict[str, float]:
    """This host's own limits, measured once per run: figures are reported as ratios to them."""
    from snapproof.native.memory import warm_memcpy_bandwidth

    return {"memcpy_bytes_per_s": warm_memcpy_bandwidth(64 << 20)}


# -- round trip: capture into a snapshot file, restore into a fresh VM ----------------------------


def enter_guest_at_entry(guest: str, vcpu: Any) -> None:
    """Put a vCPU at the guest's entry (docs/CONTRACTS.md): the reset state of a re-run from the start.

    marker16: real mode at 0:0x100. counter32: flat 32-bit at 0x1000, ESI = vCPU 0's parameter block,
    ESP = 0x7000.
    """
    from snapproof import guests

    if guest == "marker16":
        vcpu.set_real_mode(ip=guests.REAL_MODE_LOAD_GPA)
    elif guest == "counter32":
        vcpu.set_flat32(eip=guests.FLAT32_LOAD_GPA, esp=0x7000, esi=guests.PARAM_BLOCK_GPA)
    else:
        raise ValueError(f"no entry known for guest {guest!r} (marker16, counter32)")


def load_counter32(memory: Any, params: Any) -> None:
    """counter32's code at 0x1000 and ``params`` in vCPU 0's parameter block at 0x8000."""
    from snapproof import guests

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
    from snapproof.native.errors import GuestTimeout
    from snapproof.native.kvm import ExitReason, Vm
    from snapproof.native.memory import GuestMemory

    runs: dict[tuple[Any, int], CounterRun] = {}

    def _run(params: Any, mem_size: int, timeout: float = 60.0) -> CounterRun:
        key = (params, mem_size)
        if key not in runs:
            with GuestMemory.memfd(mem_size) as mem, Vm.create() as vm:
                load_counter32(mem, params)
                vm.map_memory(mem)
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


# -- cpustate32: a guest whose result lives in x87/SSE registers, an MSR, debug registers and an NMI ------


@pytest.fixture
def make_cpustate32_vm(make_vm: Callable[..., Any]) -> Callable[..., Any]:
    """Factory: ``make_cpustate32_vm(memory, seeds, iterations, sync_at)`` -> (vm, [CpuStateParams]): one vCPU
    per seed, each with KVM's supported CPUID (as a VMM gives its guest), its parameter block from its seed
    (XSAVE asked for when the vCPU's CPUID offers it) and at the entry, not yet running."""
    from snapproof.guests import cpustate
    from snapproof.native.image import VcpuPart

    def _make(memory: Any, seeds: list[int], iterations: int, sync_at: list[int]) -> tuple[Any, list[Any]]:
        vm = make_vm(memory)
        cpuid = vm.supported_cpuid()
        for _ in seeds:
            vm.add_vcpu().set_cpuid(cpuid)
        # What the guest's CPUID will say, read back from KVM: kvm_pvm's KVM_GET_SUPPORTED_CPUID leaves XSAVE out
        # of leaf 1 but KVM_SET_CPUID2 fills it in (real KVM lists it where the host has it and keeps it).
        offers = cpustate.cpuid_offers_xsave(vm.vcpus[0].get_part(VcpuPart.CPUID))
        xcr0 = cpustate.XCR0_X87_SSE if offers else 0
        params = [cpustate.CpuStateParams.from_seed(seed, iterations, at, xcr0) for seed, at in
                  zip(seeds, sync_at, strict=True)]
        cpustate.load_into(memory, params)
        for i, vcpu in enumerate(vm.vcpus):
            cpustate.entry(vcpu, i, params[i])
        return vm, params

    return _make


class CpuStateRun:
    """What an uninterrupted cpustate32 run left at HLT: all of memory and each vCPU's registers."""

    def __init__(self, memory: bytes, regs: list[dict[str, int]]) -> None:
        self.memory = memory
        self.regs = regs


@pytest.fixture(scope="session")
def cpustate32_uninterrupted() -> Callable[..., CpuStateRun]:
    """``cpustate32_uninterrupted(params, mem_size)`` -> CpuStateRun: cpustate32 on one vCPU per params in a
    VM of its own, each run to its sync, answered with one NMI (the guest's protocol) and run to HLT, never
    snapshotted. Kept for the session: every loader's resumed run is compared with the same reference."""
    from snapproof.guests import cpustate
    from snapproof.native.kvm import ExitReason, Vm
    from snapproof.native.memory import GuestMemory

    runs: dict[tuple[Any, int], CpuStateRun] = {}

    def _run(params: list[Any], mem_size: int, timeout: float = 60.0) -> CpuStateRun:
        key = (tuple(params), mem_size)
        if key not in runs:
            with GuestMemory.memfd(mem_size) as mem, Vm.create() as vm:
                vm.map_memory(mem)
                cpustate.load_into(mem, params)
                cpuid = vm.supported_cpuid()
                for i, p in enumerate(params):
                    vcpu = vm.add_vcpu()
                    vcpu.set_cpuid(cpuid)
                    cpustate.entry(vcpu, i, params[i])
                    if p.sync_at:
                        ex = vcpu.run(timeout=timeout, stop_on_sync=True)
                        if ex.reason is not ExitReason.SYNC or ex.last_sync != p.sync_at:
                            raise RuntimeError(f"uninterrupted cpustate32 vCPU {i}: expected SYNC {p.sync_at:#x}, "
                                               f"saw {ex.describe()} (sync {ex.last_sync:#x})")
                        vcpu.inject_nmi()
                    ex = vcpu.run(timeout=timeout)
                    if ex.reason is not ExitReason.HLT:
                        raise RuntimeError(f"uninterrupted cpustate32 vCPU {i}: expected HLT, saw {ex.describe()}")
                runs[key] = CpuStateRun(mem.snapshot_bytes(), [v.regs() for v in vm.vcpus])
        return runs[key]

    return _run


@pytest.fixture
def wait_until() -> Callable[..., None]:
    """``wait_until(predicate, what, timeout=30.0)``: poll until ``predicate()`` is true; GuestTimeout
    naming ``what`` if it is not by the deadline."""
    from snapproof.native.errors import GuestTimeout

    def _wait(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > end:
                raise GuestTimeout(f"{what}: not reached within {timeout} s")
            time.sleep(0.0001)

    return _wait


@pytest.fixture
def capture_snapshot(tmp_path: Path, inject: Any, engine: Any,
                     require: Callable[..., None]) -> Iterator[Callable[..., Any]]:
    """Factory: ``capture_snapshot(memory, name, vcpus=(), runner=None)`` -> native.capture.FileCapture.

    The engine under test (``--engine``) writes straight into a new snapshot file in the test's tmp_path,
    with this run's --inject switches. The files are deleted at teardown, so large images do not pile up
    in /tmp.
    """
    require("uffd")
    from snapproof.native.capture import capture_to_file

    made: list[Path] = []

    def _capture(memory: Any, name: str = "snapshot", **kw: Any) -> Any:
        path = tmp_path / f"{name}.snap"
        made.append(path)
        kw.setdefault("inject", inject)
        kw.setdefault("engine", engine)
        return capture_to_file(path, memory, **kw)

    yield _capture
    for path in made:
        path.unlink(missing_ok=True)


@pytest.fixture
def make_staging_memory() -> Iterator[Callable[[int], Any]]:
    """Factory: ``make_staging_memory(size)`` -> native.image.StagingMemory, the anonymous memory a capture copies
    into before writing (``ImageWay.PWRITE``, ``DIRECT``), kept across a test's captures; closed at teardown."""
    from snapproof.native.image import StagingMemory

    made: list[Any] = []

    def _make(size: int) -> Any:
        made.append(StagingMemory(size))
        return made[-1]

    yield _make
    for staging in reversed(made):
        staging.close()


@pytest.fixture
def make_restored_vm(require: Callable[..., None], inject: Any) -> Iterator[Callable[..., Any]]:
    """Factory: ``make_restored_vm(image_or_path, loader, verify=True, reset=None)`` -> native.restore.RestoredVm.

    Loaders: read-copy, map-private, lazy-uffd. The restore gets this run's --inject switches (the
    vCPU-state ones act there). Teardown closes each, newest first: the VM, then the lazy loader's
    handler, then the memory.
    """
    require("kvm")
    from snapproof.native.restore import restore_vm

    made: list[Any] = []

    def _make(image: Any, loader: str, **kw: Any) -> Any:
        from snapproof.native.restore import LOADER_NEEDS

        require(*LOADER_NEEDS[loader])
        kw.setdefault("inject", inject)
        restored = restore_vm(image, loader, **kw)
        made.append(restored)
        return restored

    yield _make
    for restored in reversed(made):
        restored.close()


@pytest.fixture
def make_restored_chain(make_restored_vm: Callable[..., Any]) -> Callable[..., Any]:
    """Factory: ``make_restored_chain(paths, loader, verify=True)`` -> native.incremental.RestoredChain: the chain
    (``paths[0]`` the base, then its diffs oldest first) opened and its parents checked, the base restored by
    ``make_restored_vm`` with the head's vCPU states, the diffs' pages put in place; closed with its teardown."""
    from snapproof.native.incremental import restore_chain

    def _make(paths: Any, loader: str, verify: bool = True, **kw: Any) -> Any:
        return restore_chain(paths, loader, verify=verify, restore=make_restored_vm, **kw)

    return _make
