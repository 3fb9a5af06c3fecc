"""The release gate: a run record judged against a baseline record under a YAML policy.

``snapproof results gate RUN.yaml --baseline BASE.yaml --policy results/gate.yaml`` exits 1 and says
why when either record is not of a complete run (``run.status``, named) or the run had fault-injection
switches on, a required phase did not PASS, a required capability is missing, a figure is a
measurement error, a tracked figure's case ran on a busy host in either record (results/hostbusy.py:
not judged, named as such), or a tracked figure regressed: judged by its samples in both records
(results/stats.py: a rank test at the class's ``alpha`` and a minimum effect size), or past its
absolute limit. It exits 2, naming the file and the key, when the policy or a record is not valid
(results/schema.py), the baseline is of another host class than the run, or a policy's class checks
nothing in the record. A class with no figures of its own is uncalibrated: it gates phases and
capabilities, needs no baseline, and says its figures are not gated.

``--json`` prints the verdict as JSON; ``--junit-xml PATH`` writes each check as a JUnit test case, so
a CI system shows every gated figure. The policy schema is in results/README.md; results/gate.yaml is
the policy this repository gates itself with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapproof.results.hostbusy import busy_cases
from snapproof.results.hostbusy import summary as busy_summary
from snapproof.results.load import RecordError, figures, host_label, incompleteness, load_record, phase, read_yaml
from snapproof.results.record import MEASUREMENT_ERRORS, fmt_value
from snapproof.results.schema import POLICY, POLICY_SCHEMA, check
from snapproof.results.stats import DEFAULT_ALPHA, Judgement, judge, parse_percent

DEFAULT_MIN_EFFECT = "25%"


class PolicyError(Exception):
    """The policy file is unreadable or malformed, or checks nothing (the message names the file and key)."""


@dataclass(frozen=True)
class Finding:
    ok: bool
    kind: str        # record / phase / capability / figure / figures / busy (a figure not judged)
    subject: str     # what was checked, stable across runs: "phase 5", "uffd.WP_ASYNC", "arm_ns[test...]"
    text: str
    judgement: Judgement | None = None

    def line(self) -> str:
        return f"  {'PASS' if self.ok else 'FAIL'}  {self.kind:<10} {self.text}"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"ok": self.ok, "kind": self.kind, "subject": self.subject, "text": self.text}
        if (j := self.judgement) is not None:
            d.update({"verdict": j.verdict, "baseline_median": j.base_median, "run_median": j.run_median,
                      "change": j.change, "worse_by": j.worse_by, "p": j.p, "p_worse": j.p_worse,
                      "p_better": j.p_better, "n_baseline": j.n_base, "n_run": j.n_run,
                      "min_effect": j.min_effect, "alpha": j.alpha})
        return d


def load_policy(path: str | Path) -> dict[str, Any]:
    """A gate policy, validated (results/schema.py); PolicyError names the file and the key."""
    policy = check(read_yaml(path, PolicyError), POLICY, "gate policy", POLICY_SCHEMA, path, PolicyError)
    names = [c["name"] for c in policy["classes"]]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise PolicyError(f"{path}: classes: the host class name(s) {', '.join(map(repr, dupes))} appear twice")
    return policy


def host_facts(rec: dict[str, Any]) -> dict[str, Any]:
    """A record's host facts, with its host class derived by native.host's rule when the record predates
    the ``host_class`` fact (a kvm_pvm record is kvm-software; a kvm_intel/kvm_amd record without the CPUID
    hypervisor bit stays unclassified: bare metal and nested cannot be told apart from it)."""
    from snapproof.native.host import host_class

    host = dict(rec.get("host", {}))
    if not host.get("host_class") or host["host_class"] == "unknown":
        host["host_class"] = host_class(host) or "unknown"
    return host


def required_capabilities(klass: dict[str, Any]) -> dict[str, list[str]]:
    """The class's required capabilities: name -> the statuses that satisfy it (PASS unless ``allow`` says)."""
    out = {}
    for entry in klass.get("required_capabilities", []):
        name, allow = (entry, ["PASS"]) if isinstance(entry, str) else (entry["name"], entry.get("allow", ["PASS"]))
        out[str(name)] = [str(a) for a in allow]
    return out


def uncalibrated(klass: dict[str, Any]) -> bool:
    """A class with no figures of its own: its figures are reported in the record, not gated."""
    return not klass.get("figures")


def matches(klass: dict[str, Any], host: dict[str, Any]) -> bool:
    """Every ``match`` key equals the host fact (a list in the policy: any of its values)."""
    for key, want in klass.get("match", {}).items():
        have = host.get(key)
        options = want if isinstance(want, list) else [want]
        if have is None or not any(str(have) == str(o) for o in options):
            return False
    return True


def select_class(policy: dict[str, Any], host: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    classes = policy["classes"]
    if name is not None:
        for c in classes:
            if c["name"] == name:
                return c
        raise PolicyError(f"no host class {name!r} in the policy (classes: {', '.join(c['name'] for c in classes)})")
    for c in classes:
        if matches(c, host):
            return c
    keys = sorted({k for c in classes for k in c.get("match", {})} | {"kvm_module", "virtualization"})
    facts = ", ".join(f"{k}={host.get(k)!r}" for k in keys)
    raise PolicyError(f"no host class in the policy matches this host ({facts})")


@dataclass(frozen=True)
class Statistics:
    """How a class judges its figures (its ``statistics`` section; a figure may override ``min_effect``)."""

    alpha: float = DEFAULT_ALPHA
    min_effect: float = parse_percent(DEFAULT_MIN_EFFECT)
    max_improvement: float | None = None

    @classmethod
    def of(cls, klass: dict[str, Any]) -> Statistics:
        spec = klass.get("statistics", {})
        improvement = spec.get("max_improvement")
        return cls(float(spec.get("alpha", DEFAULT_ALPHA)), parse_percent(spec.get("min_effect", DEFAULT_MIN_EFFECT)),
                   None if improvement is None else parse_percent(improvement))

    def judge(self, base: list[float], run: list[float], better: str, min_effect: str | None = None) -> Judgement:
        effect = self.min_effect if min_effect is None else parse_percent(min_effect)
        return judge(base, run, better, min_effect=effect, alpha=self.alpha, max_improvement=self.max_improvement)


def judge_figure(name: str, test: str, base_fig: dict[str, Any], run_fig: dict[str, Any], stats: Statistics,
                 min_effect: str | None = None) -> Finding:
    """One figure of one case, run against baseline, by their samples."""
    subject = f"{name}[{test}]"
    unit = run_fig["unit"]
    if (base_fig["unit"], base_fig["better"]) != (unit, run_fig["better"]):
        return Finding(False, "figure", subject, f"{subject}: measured as {unit} ({run_fig['better']} is better), the "
                       f"baseline as {base_fig['unit']} ({base_fig['better']}): not comparable; re-take the baseline")
    j = stats.judge(base_fig["samples"], run_fig["samples"], run_fig["better"], min_effect)
    text = (f"{subject}: {fmt_value(j.run_median, unit)} vs baseline {fmt_value(j.base_median, unit)} "
            f"(median of {j.n_run} vs {j.n_base}; {j.verdict}: {j.reason()})")
    return Finding(j.ok, "figure", subject, text, j)


def busy_case(subject: str, test: str, *busy_in: tuple[str, dict[str, dict[str, Any]]]) -> Finding | None:
    """A refusal of figure ``subject`` when its case ran on a busy host in any of ``busy_in`` (where, as in "the
    run": that record's busy cases, ``busy_cases``): such a figure measured the neighbour too, so it is neither a
    regression nor a pass."""
    for where, busy in busy_in:
        if test in busy:
            return Finding(False, "busy", subject, f"{subject}: not judged: the host was busy while its case ran in "
                           f"{where} ({busy_summary(busy[test])}); run it again on a quiet host")
    return None


def check_figures(klass: dict[str, Any], run: dict[str, Any], base: dict[str, Any]) -> list[Finding]:
    out: list[Finding] = []
    stats = Statistics.of(klass)
    for f in klass.get("figures", []):
        name, number, case = f["figure"], int(f["phase"]), f["case"]
        got = figures(run, number, case, name)
        if not got:
            if f.get("required", True):
                out.append(Finding(False, "figure", f"{name}[{case}]",
                                   f"{name}: not in the run (phase {number}, case {case}): deselected, or a size "
                                   "only --sizes adds"))
            continue
        baseline = dict(figures(base, number, case, name))
        busy_in = (("the run", busy_cases(run, number)), ("the baseline", busy_cases(base, number)))
        for test, fig in got:
            subject = f"{name}[{test}]"
            if (refused := busy_case(subject, test, *busy_in)) is not None:
                out.append(refused)
                continue
            limit = f.get("limit")
            if limit is not None:
                lower = fig["better"] == "lower"
                past = fig["median"] > limit if lower else fig["median"] < limit
                if past:
                    value = fmt_value(fig["median"], fig["unit"])
                    out.append(Finding(False, "figure", subject, f"{subject}: median {value} is past the limit "
                                       f"{fmt_value(limit, fig['unit'])} ({'at most' if lower else 'at least'})"))
                    continue
            if test not in baseline:
                out.append(Finding(False, "figure", subject, f"{subject}: {fmt_value(fig['median'], fig['unit'])}; not "
                                   "in the baseline, so not judged: re-take the baseline with this figure"))
                continue
            out.append(judge_figure(name, test, baseline[test], fig, stats, f.get("min_effect")))
    return out


def check_record(role: str, rec: dict[str, Any]) -> list[Finding]:
    """A record of a run that did not finish, or that ran with bugs switched on, proves nothing whole."""
    out = []
    if (why := incompleteness(rec)) is not None:
        out.append(Finding(False, "record", role, f"the {role} record is not of a complete run ({why}): refused; "
                           "run it again to the end"))
    if rec["run"]["inject"] not in ("", "none"):
        out.append(Finding(False, "record", role, f"the {role} ran with fault-injection switches on "
                           f"({rec['run']['inject']}): not a release run"))
    return out


def measurement_errors(run: dict[str, Any]) -> list[Finding]:
    """A figure past the host's own limit measured in the same run is a measurement error, never a record."""
    out = []
    for p in run["phases"]:
        for c in p["cases"]:
            for e in c.get("facts", {}).get(MEASUREMENT_ERRORS, []):
                out.append(Finding(False, "figure", f"{e['figure']}[{c['test']}]",
                                   f"phase {p['phase']} [{c['test']}]: {e['figure']} = {e['value']} is a measurement "
                                   f"error ({e['why']}): refused, not a record"))
    return out


def evaluate(run: dict[str, Any], base: dict[str, Any] | None, policy: dict[str, Any],
             host_class: str | None = None) -> tuple[dict[str, Any], list[Finding]]:
    """(the host class applied, every finding). The baseline must be of the class applied to the run: one of
    another class is refused (PolicyError naming both), as is none for a class that has figures to judge.

    PolicyError when the class checks nothing in this record: a gate that checked nothing has proved nothing.
    """
    klass = select_class(policy, host_facts(run), host_class)
    findings = check_record("run", run) + (check_record("baseline", base) if base is not None else [])
    if base is not None:
        base_host = host_facts(base)
        base_class = next((c["name"] for c in policy["classes"] if matches(c, base_host)), None)
        if base_class != klass["name"]:
            raise PolicyError(f"the baseline's host {host_label(base)} is of host class "
                              f"{base_class or base_host.get('host_class')!r}, the run is judged as class "
                              f"{klass['name']!r}: a class never uses another class's baseline (figures from "
                              "another class of host prove nothing)")
    elif not uncalibrated(klass):
        raise PolicyError(f"host class {klass['name']!r} judges figures: a baseline record of that class is needed "
                          "(--baseline)")
    checks = []
    for number in klass.get("required_phases", []):
        p = phase(run, int(number))
        if p is None:
            checks.append(Finding(False, "phase", f"phase {number}", f"phase {number}: NOT RUN (required)"))
            continue
        detail = ""
        bad = [c for c in p["cases"] if c["outcome"] != "passed"]
        if p["outcome"] != "PASS" and bad:
            why = bad[0].get("failure") or bad[0].get("skip_reason") or bad[0]["outcome"]
            detail = f" ({len(bad)} of {len(p['cases'])} cases not passed; first: {bad[0]['test']}: {why})"
        if left_out := p.get("deselected", []):
            # Cases the host's class excused are named, never counted: the PASS covers what ran.
            detail += (f" ({len(left_out)} deselected for this host, not required by its class; first: "
                       f"{left_out[0]['test']}: {left_out[0]['reason'].split(', not required', 1)[0]})")
        checks.append(Finding(p["outcome"] == "PASS", "phase", f"phase {number}",
                              f"phase {number} {p['title']}: {p['outcome']}{detail}"))
    caps = {c["name"]: c for c in run.get("capabilities", [])}
    for name, allow in required_capabilities(klass).items():
        c = caps.get(name)
        if c is None:
            checks.append(Finding(False, "capability", name, f"{name}: not probed in the run"))
        else:
            checks.append(Finding(c["status"] in allow, "capability", name, f"{name}: {c['status']} "
                                  f"({c.get('detail', '')})" + ("" if c["status"] in allow
                                                                 else f"; required: {' or '.join(allow)}")))
    if not uncalibrated(klass):
        checks += check_figures(klass, run, base or {"phases": []})
    if not checks:
        raise PolicyError(f"host class {klass['name']!r} checks nothing in this record (no required phase, "
                          "capability or figure): a gate that checked nothing proves nothing")
    checks += measurement_errors(run)
    if uncalibrated(klass):
        checks.append(Finding(True, "figures", "figures", f"host class {klass['name']!r} is uncalibrated: figures "
                              "reported in the record, not gated"))
    return klass, findings + checks


@dataclass
class GateResult:
    run_path: str
    baseline_path: str | None
    policy_path: str
    run: dict[str, Any]
    baseline: dict[str, Any] | None
    host_class: str
    findings: list[Finding] = field(default_factory=list)

    @property
    def failed(self) -> list[Finding]:
        return [f for f in self.findings if not f.ok]

    @property
    def status(self) -> int:
        """The exit status: 0 pass, 1 fail."""
        return 1 if self.failed else 0

    def text(self) -> str:
        against = (f"baseline {self.baseline_path} on {host_label(self.baseline)}" if self.baseline is not None
                   else "no baseline")
        lines = [f"snapproof gate: {self.run_path} on {host_label(self.run)}",
                 f"  {against}; policy {self.policy_path}, host class {self.host_class!r}"]
        lines += [f.line() for f in self.findings]
        verdict = "FAIL" if self.failed else "PASS"
        lines.append(f"gate: {verdict} ({len(self.findings) - len(self.failed)} of {len(self.findings)} checks passed)")
        if self.failed:
            lines.append("why:")
            lines += [f"  - {f.kind} {f.text}" for f in self.failed]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": "FAIL" if self.failed else "PASS", "run": self.run_path, "baseline": self.baseline_path,
                "policy": self.policy_path, "host_class": self.host_class,
                "passed": len(self.findings) - len(self.failed), "total": len(self.findings),
                "checks": [f.to_dict() for f in self.findings]}

    def json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def write_junit(self, path: str | Path) -> Path:
        """Each check a JUnit test case (classname ``gate.<kind>``, name its subject), a failed one with why."""
        import xml.etree.ElementTree as ET

        root = ET.Element("testsuites")
        suite = ET.SubElement(root, "testsuite", name="snapproof gate", tests=str(len(self.findings)),
                           failures=str(len(self.failed)), errors="0", skipped="0")
        props = ET.SubElement(suite, "properties")
        for key, value in (("run", self.run_path), ("baseline", self.baseline_path or ""),
                           ("policy", self.policy_path), ("host_class", self.host_class)):
            ET.SubElement(props, "property", name=key, value=value)
        for f in self.findings:
            case = ET.SubElement(suite, "testcase", classname=f"gate.{f.kind}", name=f.subject, time="0")
            if not f.ok:
                ET.SubElement(case, "failure", message=f.text[:500]).text = f.text
            else:
                ET.SubElement(case, "system-out").text = f.text
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        ET.ElementTree(root).write(out, encoding="utf-8", xml_declaration=True)
        return out


def gate(run_path: str, baseline_path: str | None, policy_path: str, host_class: str | None = None) -> GateResult:
    """Load, validate and judge (RecordError / PolicyError for unusable input: exit 2)."""
    run = load_record(run_path)
    base = load_record(baseline_path) if baseline_path is not None else None
    policy = load_policy(policy_path)
    klass, findings = evaluate(run, base, policy, host_class)
    return GateResult(run_path, baseline_path, policy_path, run, base, klass["name"], findings)


__all__ = ["Finding", "GateResult", "PolicyError", "RecordError", "Statistics", "busy_case", "evaluate", "gate",
           "host_facts", "judge_figure", "load_policy", "required_capabilities", "select_class", "uncalibrated"]
