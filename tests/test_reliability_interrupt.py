"""An interrupted run never reports success: SIGINT, SIGTERM or SIGHUP at any point of a phase ends it
with a non-zero status, nothing left held (WP, threads, fds, mappings), and its run record marked
interrupted; a capture interrupted at any point leaves its file marked incomplete, or whole when the
signal came too late to interrupt anything.

The signal is sent at named points of the snapshot path (tests/reliability_child.py: before or after a
call into the native API, a report stage, pytest's own boundaries), not after a guessed delay, so every
point is hit on every host however busy. Every child starts with SIGINT ignored, as a background job of
a shell without job control does: the start with which the issue's run lost its SIGINT and exited 0
(Python installs no KeyboardInterrupt handler over an inherited SIG_IGN; results/interrupts.py does).
``--long`` sends every signal at every point; by default each point gets one signal, in turn.
"""

from __future__ import annotations

import signal

import pytest
import yaml
from snapproof.native.image import SnapshotFormatError, SnapshotImage

from tests.reliability_child import SIGNAL, SIGNAL_AT
from tests.reliability_support import ChildRun, child_env, run_child, wait_for

pytestmark = pytest.mark.needs("kvm", "uffd", "uffd.WP_HUGETLBFS_SHMEM")

SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")
# A child's whole run (start, a 1 MiB phase-2 case or a 4 MiB capture, teardown), a hang ceiling: the slowest host
# seen, kvm_amd nested under QEMU TCG with --background-load cpu,memory, took up to 46 s; here about 1 s.
CHILD_TIMEOUT_S = 180.0
MAIN_THREAD_RUN_S = 20.0  # a never-halting guest's run on the main thread: only a signal's handler ends it early

# Phase 2's live snapshot in a child pytest: (point, where the record must say the run was interrupted,
# in the default sweep). The first selected case takes every point inside a test.
PHASE2_POINTS = [
    ("setup", "(setup)", False),
    ("call", "(call)", True),
    ("stage storm guest running", "(call)", False),
    ("leave VcpuRunner.start", "(call)", True),         # the vCPUs run the storm guest
    ("enter VcpuRunner.pause", "(call)", False),
    ("leave VcpuRunner.pause", "(call)", False),        # parked, nothing armed yet
    ("leave WpSnapshot.arm", "(call)", True),           # WP armed, the vCPUs parked
    ("leave VcpuRunner.resume", "(call)", False),       # armed, the guest writing: the handler serves faults
    ("enter WpSnapshot.bulk_copy", "(call)", True),     # two faults a vCPU served, more coming
    ("leave WpSnapshot.bulk_copy", "(call)", False),
    ("enter WpSnapshot.finalize", "(call)", True),
    ("leave WpSnapshot.finalize", "(call)", False),
    ("enter VcpuRunner.stop", "(call)", True),          # snapshot taken, the guest still running: stop never runs
    ("leave VcpuRunner.stop", "(call)", False),
    ("stage the guest kept writing", "(call)", False),
    ("stage instant oracle", "(call)", False),
    ("stage exact oracle", "(call)", False),
    ("teardown", "(teardown)", False),                  # before any fixture is torn down
    ("enter WpSnapshot.close", "(teardown)", True),     # inside make_wp's teardown, the VM and memory after it
    ("enter Vm.close", "collection", False),           # the host probe's VM, closed as the needs are judged
    ("enter GuestMemory.close", "collection", False),  # the host probe's PAGEMAP_SCAN page
    ("between tests", "between tests", True),
    ("session finish", "session finish", True),         # before the last teardown, the reports and the record
    ("after the record", "session finish", True),       # the record was written complete: it is written again
]
PHASE2_TESTS = [f"phases/test_phase2_live_consistency.py::test_live_snapshot_of_memfd_is_memory_at_the_arm_instant[{p}]"
                for p in ("1MiB-2vcpus", "1MiB-1vcpu")]

# A live capture into a file (native.capture.capture_to_file) in a child program: (point, the file is
# whole afterwards, in the default sweep). Every point is inside the capture or after it.
CAPTURE_POINTS = [
    ("enter VcpuRunner.pause", False, False),           # the file created, the engine's handler running
    ("leave WpSnapshot.arm", False, True),
    ("leave VcpuRunner.resume", False, False),
    ("enter WpSnapshot.bulk_copy", False, True),
    ("leave WpSnapshot.bulk_copy", False, False),
    ("enter WpSnapshot.finalize", False, False),
    ("leave WpSnapshot.finalize", False, True),         # the engine done; its close() and the seal to come
    ("enter WpSnapshot.close", False, True),            # close() never runs: the engine goes with its object
    ("enter SnapshotWriter.finalize", False, True),
    ("leave SnapshotWriter.finalize", True, False),     # too late: the file is sealed
    ("after capture", True, True),                      # too late: the capture returned
]


def _sweep(points: list[tuple], long: bool) -> list[tuple]:
    """(point, signal, *expectations): every signal at every point with --long, else one signal a point
    (in turn, so each signal is sent at a third of the points), only the points marked for the default."""
    if long:
        return [(p[0], s, *p[1:-1]) for p in points for s in SIGNALS]
    chosen = [p for p in points if p[-1]]
    return [(p[0], SIGNALS[i % len(SIGNALS)], *p[1:-1]) for i, p in enumerate(chosen)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    long = metafunc.config.getoption("long")
    if metafunc.definition.name == "test_a_signal_at_any_point_of_phase2_ends_the_run_interrupted":
        cases = _sweep(PHASE2_POINTS, long)
        metafunc.parametrize(("point", "signal_name", "during"), cases,
                             ids=[f"{c[0].replace(' ', '-')}-{c[1]}" for c in cases])
    elif metafunc.definition.name == "test_a_signal_at_any_point_of_a_capture_leaves_nothing_held":
        cases = _sweep(CAPTURE_POINTS, long)
        metafunc.parametrize(("point", "signal_name", "whole"), cases,
                             ids=[f"{c[0].replace(' ', '-')}-{c[1]}" for c in cases])


def _signalled_child(args: list[str], point: str, signal_name: str) -> ChildRun:
    """``python ARGS`` started with SIGINT ignored, told to send itself ``signal_name`` at ``point``."""
    run = run_child(args, CHILD_TIMEOUT_S, sigint_ignored=True,
                    env=child_env(**{SIGNAL_AT: point, SIGNAL: signal_name}))
    said = f"SIGNAL {signal_name} at {point}"
    assert said in run.stdout, (f"the child never reached the point {point!r} (exit {run.returncode}); "
                                f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}")
    return run


def _assert_nothing_held(run: ChildRun, start: dict, last: dict) -> None:
    assert last["uffds"] == 0, f"userfaultfds still open at the end: {last['uffds']}"
    assert last["fds"] <= start["fds"], f"open fds: expected at most {start['fds']} as at the start, saw {last['fds']}"
    assert last["threads"] == start["threads"], (
        f"threads (kernel count: vCPU threads, C handlers, KVM workers): expected {start['threads']} as at the "
        f"start, saw {last['threads']}")
    assert last["python_threads"] == start["python_threads"], (
        f"Python threads: expected {start['python_threads']} as at the start, saw {last['python_threads']}")


def test_a_signal_at_any_point_of_phase2_ends_the_run_interrupted(tmp_path, point, signal_name, during):
    """A signal at this point of phase 2: pytest exits 2, the guest is stopped before the session finishes, nothing
    is left held, the record says interrupted."""
    records = tmp_path / "runs"
    run = _signalled_child(["-m", "pytest", *PHASE2_TESTS, "-q", "-s", "-p", "no:randomly", "-p", "no:faulthandler",
                            "-p", "tests.reliability_child", "--results-dir", str(records), "--reports", "none",
                            "--benchmark-disable"], point, signal_name)
    print(f"{signal_name} at {point!r} -> pytest exit {run.returncode} in {run.seconds:.2f} s")
    assert run.returncode != 0, f"{signal_name} at {point!r}: the interrupted run exited 0 (success)"
    assert run.returncode == pytest.ExitCode.INTERRUPTED, (
        f"exit status: expected {int(pytest.ExitCode.INTERRUPTED)} (interrupted), saw {run.returncode}; "
        f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}")
    _assert_nothing_held(run, run.json_line("START"), run.json_line("LAST"))
    left_running = run.json_line("FINISH")["vcpu_threads"]
    assert not left_running, (
        f"{signal_name} at {point!r}: vCPU threads {left_running} still ran as the session finished: the code that "
        "started them did not stop them on the interrupt's way out, so the guest ran on until the VM's teardown")

    written = sorted(records.glob("*.yaml"))
    assert len(written) == 1, f"expected one run record in {records}, saw {[p.name for p in written]}"
    rec = yaml.safe_load(written[0].read_text())["run"]
    assert rec["status"] == "interrupted", f"run record status: expected 'interrupted', saw {rec['status']!r}"
    assert rec["interrupted"]["signal"] == signal_name, (
        f"record: expected the signal {signal_name}, saw {rec['interrupted']['signal']!r}")
    assert during in rec["interrupted"]["during"], (
        f"record: expected the interrupt during {during!r}, saw {rec['interrupted']['during']!r}")
    # What finished: the first case once its call is over, both once the session is finishing.
    finished = {"collection": 0, "(setup)": 0, "(call)": 0, "(teardown)": 1, "between tests": 1,
                "session finish": 2}[during]
    assert rec["tests"] == {"selected": len(PHASE2_TESTS), "finished": finished}, (
        f"record: expected {finished} of {len(PHASE2_TESTS)} tests finished, saw {rec['tests']}")
    phases = yaml.safe_load(written[0].read_text())["phases"]
    unfinished = [c["test"] for p in phases for c in p["cases"] if c["outcome"] == "not run"]
    assert all(p["outcome"] != "PASS" for p in phases) or not unfinished, (
        f"a phase with unfinished cases {unfinished} says PASS: {[(p['phase'], p['outcome']) for p in phases]}")


def test_an_interrupt_swallowed_by_test_code_still_stops_the_run():
    """A test that catches the KeyboardInterrupt of a SIGTERM: the run stops after its teardown, exit 2."""
    run = run_child(["-m", "pytest", "tests/reliability_child_cases.py", "-q", "-s", "-p", "no:randomly", "-p",
                     "tests.reliability_child", "-k", "swallows_the_interrupt or after_the_swallowed_interrupt",
                     "--results-dir", ""], CHILD_TIMEOUT_S, sigint_ignored=True)
    assert run.returncode == pytest.ExitCode.INTERRUPTED, (
        f"exit status: expected {int(pytest.ExitCode.INTERRUPTED)} (interrupted), saw {run.returncode}; "
        f"stdout:\n{run.stdout}")
    calls = [ln.split("::", 1)[1] for ln in run.stdout.splitlines() if ln.startswith("CALL ")]
    assert calls == ["test_swallows_the_interrupt_it_gets"], f"tests called: expected only the swallowing one, " \
                                                             f"saw {calls}"


def test_a_signal_at_any_point_of_a_capture_leaves_nothing_held(tmp_path, point, signal_name, whole):
    """A signal at this point of a live capture: exit 128+signal, WP released, threads joined, fds closed,
    and the file marked incomplete, or sealed and whole when the signal came after the capture sealed it."""
    path = tmp_path / "interrupted.snap"
    run = _signalled_child(["-m", "tests.reliability_child", "interrupted-capture", str(path)], point, signal_name)
    start, last = run.json_line("START"), run.json_line("LAST")
    want = 128 + getattr(signal, signal_name)
    print(f"{signal_name} at {point!r} -> exit {run.returncode} in {run.seconds:.2f} s; last words: {last}")
    assert run.returncode == want, (f"exit status: expected {want} (interrupted by {signal_name}), saw "
                                    f"{run.returncode}; stderr:\n{run.stderr}")
    assert last["signal"] == signal_name, f"the child caught {last['signal']!r}, expected {signal_name}"
    assert last["wp_pages_left"] == 0, f"WP not released: {last['wp_pages_left']} pages keep PM_UFFD_WP"
    _assert_nothing_held(run, start, last)

    assert path.exists(), "the snapshot file is gone: expected it kept, complete or marked incomplete"
    if whole:
        image = SnapshotImage.open(path)  # verifies the content hash
        assert image.complete and len(image.vcpu_states) == 2, (
            f"expected a sealed file with 2 vCPU states, saw complete={image.complete}, {len(image.vcpu_states)}")
        return
    with pytest.raises(SnapshotFormatError, match=r"snapshot incomplete: flags: expected COMPLETE \(0x1\) set, "
                                                  r"saw 0x0: the capture that wrote this file did not finish"):
        SnapshotImage.open(path)
    header = SnapshotImage.open(path, verify=False, allow_incomplete=True)
    assert not header.complete, f"unexpected header: {header}"


def test_an_uninterrupted_capture_seals_its_file_and_exits_0(tmp_path):
    """The same capture child with no signal: exit 0, the file sealed and whole, nothing left held."""
    path = tmp_path / "whole.snap"
    run = run_child(["-m", "tests.reliability_child", "interrupted-capture", str(path)], CHILD_TIMEOUT_S,
                    sigint_ignored=True)
    assert run.returncode == 0, f"exit status: expected 0, saw {run.returncode}; stderr:\n{run.stderr}"
    last = run.json_line("LAST")
    assert last["stage"] == "done" and last["signal"] is None, f"unexpected last words: {last}"
    _assert_nothing_held(run, run.json_line("START"), last)
    image = SnapshotImage.open(path)
    assert image.complete, f"expected a COMPLETE file, saw flags {image.flags:#x}"


def test_a_finalized_engine_holds_no_view_of_the_snapshot_file(tmp_path, make_memory):
    """finalize() drops the engine's view of writer.memory, so the file seals while the engine object is open."""
    from snapproof.native.wp import WpSnapshot

    mem = make_memory("memfd", 1 << 20)
    mem.write(0x3000, b"\xab")
    path = tmp_path / "sealed.snap"
    # The order a caller writes without thinking of views: engine finalized, file sealed, engine closed last.
    with SnapshotImage.create(path, mem.size) as writer, WpSnapshot(mem, writer.memory) as snap:
        snap.arm()
        snap.bulk_copy()
        snap.finalize()
        image = writer.finalize()  # before the fix: BufferError, the engine's view of the mapping was alive
        with pytest.raises(ValueError, match="finalized or released and no longer holds its destination"):
            snap.bulk_copy()
    assert image.complete, f"expected a COMPLETE file, saw flags {image.flags:#x}"
    loaded = SnapshotImage.open(path)
    assert loaded.read_memory(0x3000, 1) == b"\xab", "the sealed file lost the page written before the arm"


def test_a_signal_while_the_main_thread_runs_a_guest_is_handled_at_once(make_storm_vm):
    """A signal landing in KVM_RUN on the main thread runs its Python handler then, not at the run's
    deadline; a handler that returns lets the run go on (this one kicks it, so the run ends KICKED)."""
    import threading
    import time

    from snapproof.native.kvm import ExitReason

    storm_vm = make_storm_vm("memfd", 1 << 20, 1)
    vcpu = storm_vm.vm.vcpus[0]
    handled: list[bool] = []

    def handler(signum, frame) -> None:
        handled.append(vcpu.in_run)
        vcpu.kick()

    def signal_the_main_thread_until_handled() -> None:
        # The storm guest writing: the main thread is in its run loop, nearly always inside KVM_RUN. A
        # signal that lands in the loop's own code between two KVM_RUNs (a sync-port exit) cannot end the
        # call: the next one does. So: again and again until the handler ran, bounded.
        wait_for(lambda: storm_vm.progress(0).cur_gen >= 1, "the storm guest writing", MAIN_THREAD_RUN_S)
        main = threading.main_thread().ident
        assert main is not None
        end = time.monotonic() + MAIN_THREAD_RUN_S
        while not handled and time.monotonic() < end:
            signal.pthread_kill(main, signal.SIGUSR2)
            time.sleep(0.01)

    previous = signal.signal(signal.SIGUSR2, handler)
    sender = threading.Thread(target=signal_the_main_thread_until_handled, daemon=True)
    try:
        sender.start()
        ex = vcpu.run(timeout=MAIN_THREAD_RUN_S)
    finally:
        sender.join(MAIN_THREAD_RUN_S)
        signal.signal(signal.SIGUSR2, previous)
    assert handled and handled[0], f"the handler never ran inside the run (ran {len(handled)} times, in the run: " \
                                   f"{handled})"
    assert ex.reason is ExitReason.KICKED, (
        f"expected KICKED (the handler ran while the guest ran, and its kick ended the run), saw {ex.describe()}: "
        "the handler ran only once the run had ended on its own")


def test_closing_a_vm_under_a_running_runner_kicks_it_out_first(make_memory, make_vm):
    """Closing a VM under a runner never stopped kicks the run out first; its thread ends, nothing crashes."""
    import time

    from snapproof.native.kvm import Vm
    from snapproof.native.live import VcpuRunner

    from snapproof import guests

    mem = make_memory("memfd", 1 << 20)
    mem.write(guests.FLAT32_LOAD_GPA, guests.load("spin16"))
    vm = Vm.create()
    vm.map_memory(mem)
    vcpu = vm.add_vcpu()
    vcpu.set_flat32(eip=guests.FLAT32_LOAD_GPA, esp=0x7000)
    runner = VcpuRunner([vcpu], timeout=60.0).start()
    # A condition, not a pause: the close must find the vCPU inside its run, however slow the thread's start.
    wait_for(lambda: vcpu.in_run, "the runner's vCPU inside KVM_RUN", 10.0)
    t0 = time.monotonic()
    vm.close()  # before the fix: kvm_run unmapped under the running loop, a segfault when it returned
    took = time.monotonic() - t0
    assert runner.wait_finished(2.0), "the runner's thread still alive 2 s after its VM was closed"
    print(f"closing the VM took {took * 1e3:.1f} ms")  # bounded by the kick + the wait above
    assert runner.exits[0].reason.name == "KICKED", f"expected KICKED, saw {runner.exits[0].describe()}"
