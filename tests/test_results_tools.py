"""Self-tests of ``python -m results``: show, matrix, gate (each reason it fails), plots.

Records are built here, one field changed at a time from a passing one, so each gate reason is
proved to fail the gate on its own and to say why.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from results.cli import main, matrix, show
from results.gate import PolicyError, evaluate, load_policy
from results.load import RecordError, load_record
from results.record import SCHEMA, phase_outcome

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "results" / "gate.yaml"


def _bench(name: str, median_s: float, **extra) -> dict:
    return {"name": name, "fullname": f"phases/test_x.py::{name}", "params": {},
            "stats": {"min": median_s * 0.9, "max": median_s * 1.2, "mean": median_s, "stddev": median_s / 20,
                      "median": median_s, "iqr": median_s / 10, "rounds": 5, "ops": 1 / median_s},
            "extra_info": extra}


def _record(kvm_module: str = "kvm_pvm") -> dict:
    case = {"test": "test_every_strategy_snapshots_the_running_guest_consistently[1GiB]", "nodeid": "n",
            "claim": "c", "outcome": "passed", "duration_ns": 10, "stages": [],
            "facts": {"bytes_ratio": {"precopy-wp-async": 1.03}, "pause_ns": {"wp-copy-before-write": 24_000_000}}}
    return {
        "schema": SCHEMA,
        "run": {"started": "2026-11-23T00:00:00+00:00", "duration_s": 1.0, "argv": [], "strict_host": True,
                "inject": "none", "git_commit": "abc"},
        "host": {"hostname": "h1", "kvm_module": kvm_module, "kernel": "6.18", "platform": "linux"},
        "capabilities": [{"name": "kvm", "status": "PASS", "detail": "accessible"},
                         {"name": "uffd.WP_ASYNC", "status": "PASS", "detail": "bit offered"}],
        "phases": [{"phase": 5, "title": "snapshot strategies", "outcome": "PASS", "duration_ns": 10,
                    "cases": [case]}],
        "benchmarks": [_bench("test_benchmark_pause_window[1GiB-stop-and-copy]", 0.050)],
    }


POLICY_TEXT = """
schema: snapproof-gate/1
classes:
  - name: software-kvm
    match: {kvm_module: kvm_pvm}
    required_phases: [5]
    required_capabilities: [kvm, uffd.WP_ASYNC]
    figures:
      - name: pre-copy bytes
        phase: 5
        case: "test_every_strategy_*[[]1GiB]"
        fact: bytes_ratio.precopy-wp-async
        better: lower
        margin: 10%
        limit: 1.5
    benchmarks:
      compare_fail: [median:25%]
      include: ["*pause_window*"]
"""


@pytest.fixture
def policy(tmp_path) -> dict:
    p = tmp_path / "gate.yaml"
    p.write_text(POLICY_TEXT)
    return load_policy(p)


def _failures(run: dict, base: dict, policy: dict) -> list[str]:
    _, findings = evaluate(run, base, policy)
    return [f"{f.kind} {f.text}" for f in findings if not f.ok]


def test_identical_run_and_baseline_pass_the_gate(policy):
    """A run equal to its baseline passes every check of its host class."""
    assert _failures(_record(), _record(), policy) == []


def test_a_required_phase_that_did_not_pass_fails_the_gate(policy):
    """A required phase that FAILed, or never ran, fails the gate naming the phase and the first bad case."""
    run = _record()
    run["phases"][0]["outcome"] = "FAIL"
    run["phases"][0]["cases"][0].update(outcome="failed", failure="[stage 2] exact oracle: 3 pages differ")
    assert any("phase 5 snapshot strategies: FAIL" in f and "3 pages differ" in f
               for f in _failures(run, _record(), policy))
    run["phases"] = []
    assert _failures(run, _record(), policy)[0].startswith("phase phase 5: NOT RUN")


def test_a_missing_required_capability_fails_the_gate(policy):
    """A required capability that is not PASS fails the gate naming it."""
    run = _record()
    run["capabilities"][1] = {"name": "uffd.WP_ASYNC", "status": "WARN", "detail": "bit not offered"}
    failures = _failures(run, _record(), policy)
    assert len(failures) == 1 and failures[0].startswith("capability uffd.WP_ASYNC: WARN"), failures


def test_a_figure_past_its_margin_or_limit_fails_the_gate(policy):
    """A tracked figure worse than the baseline by more than its margin, or past its limit, fails the gate."""
    run = _record()
    run["phases"][0]["cases"][0]["facts"]["bytes_ratio"]["precopy-wp-async"] = 1.2  # +16.5% > 10%
    assert any(f.startswith("figure pre-copy bytes") for f in _failures(run, _record(), policy))
    run["phases"][0]["cases"][0]["facts"]["bytes_ratio"]["precopy-wp-async"] = 1.05  # +1.9%: within
    assert _failures(run, _record(), policy) == []
    run["phases"][0]["cases"][0]["facts"]["bytes_ratio"]["precopy-wp-async"] = 1.6
    base = copy.deepcopy(run)
    assert any("past the limit" in f for f in _failures(run, base, policy))


def test_a_benchmark_regression_fails_the_gate_by_pytest_benchmarks_own_check(policy):
    """A benchmark median 40% over the baseline's fails ``median:25%`` with pytest-benchmark's message."""
    run = _record()
    run["benchmarks"] = [_bench("test_benchmark_pause_window[1GiB-stop-and-copy]", 0.070)]
    failures = _failures(run, _record(), policy)
    assert len(failures) == 1 and "PercentageRegressionCheck" in failures[0], failures
    run["benchmarks"] = []
    assert _failures(run, _record(), policy) == ["benchmark test_benchmark_pause_window[1GiB-stop-and-copy]: "
                                                 "in the baseline, not in the run"]


def test_an_interrupted_or_incomplete_record_fails_the_gate(policy):
    """A run record marked interrupted or incomplete fails the gate naming the signal and what finished,
    even with every phase it holds passing; so does such a baseline."""
    run = _record()
    run["run"].update(status="interrupted", tests={"selected": 355, "finished": 12},
                      interrupted={"signal": "SIGTERM", "during": "phases/test_x.py::test_y[1GiB] (call)"})
    assert _failures(run, _record(), policy) == [
        "record the run record is not of a whole run: interrupted by SIGTERM during phases/test_x.py::test_y[1GiB] "
        "(call); 12 of 355 tests finished; run it again to the end"]
    run["run"].update(status="incomplete", tests={"selected": 355, "finished": 300})
    del run["run"]["interrupted"]
    assert _failures(_record(), run, policy) == [
        "record the baseline record is not of a whole run: incomplete; 300 of 355 tests finished; run it again to "
        "the end"]
    assert "NOT A WHOLE RUN: incomplete; 300 of 355 tests finished" in show(run)


def test_a_phase_with_a_case_that_never_finished_is_not_a_pass():
    """A case left ``not run`` (the run interrupted or stopped first) makes its phase INCOMPLETE, or NOT RUN."""
    cases = [{"outcome": "passed"}, {"outcome": "not run"}]
    assert phase_outcome(cases) == "INCOMPLETE", phase_outcome(cases)
    assert phase_outcome(cases[1:]) == "NOT RUN", phase_outcome(cases[1:])
    assert phase_outcome([{"outcome": "failed"}, {"outcome": "not run"}]) == "FAIL"


def test_gate_command_exits_1_on_an_interrupted_run(tmp_path):
    """``python -m results gate`` on an interrupted run's record: exit 1, and the reason is the interruption."""
    (tmp_path / "gate.yaml").write_text(POLICY_TEXT)
    run = _record()
    run["run"].update(status="interrupted", tests={"selected": 2, "finished": 1},
                      interrupted={"signal": "SIGINT", "during": "between tests"})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(_record()))
    assert main(["gate", str(tmp_path / "run.yaml"), "--baseline", str(tmp_path / "base.yaml"), "--policy",
                 str(tmp_path / "gate.yaml")]) == 1


def test_a_baseline_from_another_host_class_is_refused(policy):
    """Comparing a kvm_pvm run with a kvm_intel baseline proves nothing: the gate refuses, naming both classes."""
    with pytest.raises(PolicyError, match="host class 'unknown', the run is judged as class 'software-kvm'"):
        evaluate(_record(), _record("kvm_intel"), policy)


def _hardware_record(nested: bool) -> dict:
    rec = _record("kvm_amd")
    rec["host"].update(cpu_hypervisor_bit=nested, virtualization="nested" if nested else "bare metal",
                       hypervisor="TCG" if nested else "none")
    rec["capabilities"] = [{"name": n, "status": "PASS", "detail": "d"} for n in
                           ("kvm", "kvm.module", "uffd", "uffd.PAGEFAULT_FLAG_WP", "uffd.THREAD_ID",
                            "uffd.WP_HUGETLBFS_SHMEM", "uffd.MISSING_SHMEM")]
    rec["capabilities"].append({"name": "uffd.WP_ASYNC", "status": "WARN", "detail": "absent: bit 0x8000 not in "
                                "the kernel's mask 0x1fff", "fallback": "pre-copy by KVM's dirty log"})
    rec["phases"] = [{"phase": n, "title": f"phase {n}", "outcome": "PASS", "duration_ns": 1, "cases": []}
                     for n in range(6)]
    return rec


def test_committed_policy_classes_bare_metal_nested_and_software_kvm_apart():
    """kvm_amd with the CPUID hypervisor bit is kvm-nested, without it kvm-hardware; kvm_pvm is kvm-software."""
    policy = load_policy(POLICY)
    for rec, want in ((_hardware_record(nested=True), "kvm-nested"), (_hardware_record(nested=False), "kvm-hardware"),
                      (_record("kvm_pvm"), "kvm-software")):
        klass, _ = evaluate(rec, None if want != "kvm-software" else rec, policy)
        assert klass["name"] == want, f"{rec['host']}: expected class {want}, saw {klass['name']}"


def test_uncalibrated_class_gates_capabilities_not_figures_and_needs_no_baseline():
    """A nested run is judged on phases and the capabilities its class requires; WP_ASYNC is not one of them,
    and its figures are stated as uncalibrated, not compared with another class's."""
    policy = load_policy(POLICY)
    _, findings = evaluate(_hardware_record(nested=True), None, policy)
    assert [f.text for f in findings if not f.ok] == []
    assert any(f.kind == "figures" and "uncalibrated: figures reported in the record, not gated" in f.text
               for f in findings), [f.text for f in findings]
    assert not any("WP_ASYNC" in f.text for f in findings), "WP_ASYNC is not required of kvm-nested"


def test_a_phase_with_deselected_cases_names_them_in_the_gate():
    """A phase that passed with cases deselected for the host says so: what ran passed, what did not is named."""
    rec = _hardware_record(nested=True)
    rec["phases"][5]["deselected"] = [{"test": "test_benchmark_pause_window[64MiB-precopy-wp-async]", "nodeid": "n",
                                       "reason": "uffd.WP_ASYNC unavailable, not required by host class 'kvm-nested'"
                                                 " of results/gate.yaml: absent"}]
    _, findings = evaluate(rec, None, load_policy(POLICY))
    phase5 = next(f for f in findings if f.text.startswith("phase 5"))
    assert phase5.ok and "1 deselected for this host" in phase5.text and "uffd.WP_ASYNC unavailable" in phase5.text, \
        phase5.text


def test_committed_baseline_is_refused_for_another_class():
    """The kvm_pvm baseline never gates a hardware or nested run: refused naming both classes."""
    policy = load_policy(POLICY)
    base = load_record(ROOT / "results" / "baselines" / "kvm_pvm.yaml")
    for nested, name in ((True, "kvm-nested"), (False, "kvm-hardware")):
        with pytest.raises(PolicyError, match=f"host class 'kvm-software', the run is judged as class '{name}'"):
            evaluate(_hardware_record(nested), base, policy)
    with pytest.raises(PolicyError, match="host class 'kvm-nested', the run is judged as class 'kvm-hardware'"):
        evaluate(_hardware_record(nested=False), _hardware_record(nested=True), policy)


def test_a_hardware_record_without_the_hypervisor_bit_is_not_classified():
    """A kvm_amd record from before the CPUID fact cannot be told bare metal or nested: no class is guessed."""
    rec = _hardware_record(nested=False)
    del rec["host"]["cpu_hypervisor_bit"]
    with pytest.raises(PolicyError, match="no host class in the policy matches this host"):
        evaluate(rec, None, load_policy(POLICY))


def test_no_matching_host_class_is_a_usage_error(policy):
    with pytest.raises(PolicyError, match="no host class in the policy matches this host"):
        evaluate(_record("kvm_amd"), _record("kvm_amd"), policy)


def test_gate_command_exits_2_refusing_another_class_baseline(tmp_path):
    """``python -m results gate`` refuses (exit 2) a baseline of another class, naming both classes."""
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(_hardware_record(nested=True)))
    proc = subprocess.run([sys.executable, "-m", "results", "gate", str(tmp_path / "run.yaml"), "--baseline",
                           str(ROOT / "results" / "baselines" / "kvm_pvm.yaml"), "--policy", str(POLICY)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "'kvm-software'" in proc.stderr and "'kvm-nested'" in proc.stderr, proc.stderr


def test_gate_command_exits_1_and_says_why(tmp_path):
    """``python -m results gate`` prints every check and the reasons, and exits 1 on a failed gate."""
    (tmp_path / "gate.yaml").write_text(POLICY_TEXT)
    run = _record()
    run["phases"][0]["outcome"] = "FAIL"
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(_record()))
    proc = subprocess.run([sys.executable, "-m", "results", "gate", str(tmp_path / "run.yaml"), "--baseline",
                           str(tmp_path / "base.yaml"), "--policy", str(tmp_path / "gate.yaml")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "gate: FAIL" in proc.stdout and "why:" in proc.stdout and "phase 5 snapshot strategies: FAIL" in proc.stdout


def test_committed_policy_and_baseline_gate_the_committed_baseline():
    """results/gate.yaml parses, and the committed baseline passes the gate against itself."""
    policy = load_policy(POLICY)
    baselines = sorted((ROOT / "results" / "baselines").glob("*.yaml"))
    assert baselines, "no committed baseline record under results/baselines/"
    for path in baselines:
        base = load_record(path)
        _, findings = evaluate(base, base, policy)
        assert [f.text for f in findings if not f.ok] == [], path


def test_a_record_of_another_schema_is_refused(tmp_path):
    p = tmp_path / "old.yaml"
    p.write_text(yaml.safe_dump({"schema": "snapproof-run/0", "phases": []}))
    with pytest.raises(RecordError, match="schema 'snapproof-run/0'"):
        load_record(p)
    assert main(["show", str(p)]) == 2


def test_show_prints_the_phase_report_from_the_record():
    text = show(_record())
    assert "[phase 5] snapshot strategies" in text and "test_every_strategy_snapshots" in text


def test_a_stage_stopped_by_a_skip_is_drawn_skipped_not_failed():
    from results.record import FAIL_MARK, render_phase

    rec = _record()
    case = rec["phases"][0]["cases"][0]
    case.update(outcome="skipped", skip_reason="for /dev/kvm (KVM_CREATE_VM): absent: ...",
                stages=[{"stage": 1, "name": "probe kvm", "ok": False, "checks": [], "timings": [], "notes": []}])
    text = render_phase(rec["phases"][0])
    assert "[stage 1] probe kvm" in text and FAIL_MARK not in text and "skipped" in text.split("probe kvm")[1], text


def test_matrix_has_a_row_per_host_and_a_column_per_phase():
    a, b = _record(), _record("kvm_intel")
    b["host"]["hostname"] = "h2"
    b["phases"][0]["outcome"] = "FAIL"
    text = matrix([("a.yaml", a), ("b.yaml", b)])
    rows = text.splitlines()
    assert "5 snapshot strategies" in rows[0]
    assert any(r.startswith("h1 (kvm_pvm") and "PASS" in r for r in rows)
    assert any(r.startswith("h2 (kvm_intel") and "FAIL" in r for r in rows)
    assert "WP pause 1GiB" in text and "24.0 ms" in text


def test_plots_are_written_or_skipped_with_a_reason(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib draws the plots: it is in the [dev] extra (./setup)")
    from results.plots import write_plots

    rec = _record()
    rec["phases"][0]["cases"][0]["facts"]["strategies"] = [
        {"strategy": s, "size": 1 << 30, "pause_ns": ns} for s, ns in (("stop-and-copy", 5e7), ("precopy", 5e5))]
    got = dict(write_plots(rec, tmp_path))
    assert isinstance(got["pause_windows"], Path) and got["pause_windows"].stat().st_size > 1000
    assert isinstance(got["arm_cost"], str) and "no arm-cost benchmarks" in got["arm_cost"]
