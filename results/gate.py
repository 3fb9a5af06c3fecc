"""The release gate: a run record judged against a baseline record under a YAML policy.

``python -m results gate RUN.yaml --baseline BASE.yaml --policy results/gate.yaml`` exits 1 and
says why when the run (or the baseline) was interrupted or stopped before its end, a required phase
did not PASS, a required capability is missing, a tracked figure regressed past its margin, or a
tracked benchmark regressed by pytest-benchmark's own check (``--benchmark-compare-fail``
expressions such as ``median:25%``). The policy schema is in
results/README.md; results/gate.yaml is the example this repository gates itself with.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from results.load import RecordError, benchmarks, dig, fact_values, host_label, incompleteness, phase
from results.record import MEASUREMENT_ERRORS, fmt_ns

POLICY_SCHEMA = "snapproof-gate/1"


class PolicyError(Exception):
    """The policy file is unreadable or malformed (the message names the key)."""


@dataclass(frozen=True)
class Finding:
    ok: bool
    kind: str   # record / phase / capability / figure / benchmark / baseline
    text: str

    def line(self) -> str:
        return f"  {'PASS' if self.ok else 'FAIL'}  {self.kind:<10} {self.text}"


def load_policy(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        policy = yaml.safe_load(p.read_text())
    except OSError as e:
        raise PolicyError(f"{p}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise PolicyError(f"{p}: not YAML: {e}") from None
    if not isinstance(policy, dict) or policy.get("schema") != POLICY_SCHEMA:
        raise PolicyError(f"{p}: schema {policy.get('schema') if isinstance(policy, dict) else None!r}, "
                          f"expected {POLICY_SCHEMA!r}")
    classes = policy.get("classes")
    if not isinstance(classes, list) or not classes:
        raise PolicyError(f"{p}: 'classes' must be a non-empty list of host classes")
    for i, c in enumerate(classes):
        if not isinstance(c, dict) or not isinstance(c.get("name"), str):
            raise PolicyError(f"{p}: classes[{i}] needs a 'name'")
        if not isinstance(c.get("match", {}), dict):
            raise PolicyError(f"{p}: classes[{i}] ({c['name']}): 'match' must be a mapping of host facts")
        for f in c.get("figures", []):
            for key in ("name", "phase", "fact"):
                if key not in f:
                    raise PolicyError(f"{p}: classes[{i}] ({c['name']}): a figure has no {key!r}: {f}")
            if f.get("better", "lower") not in ("lower", "higher"):
                raise PolicyError(f"{p}: figure {f['name']!r}: 'better' is lower or higher, got {f['better']!r}")
    return policy


def host_facts(rec: dict[str, Any]) -> dict[str, Any]:
    """A record's host facts, with its host class derived by native.host's rule when the record predates
    the ``host_class`` fact (a kvm_pvm record is kvm-software; a kvm_intel/kvm_amd record without the CPUID
    hypervisor bit stays unclassified: bare metal and nested cannot be told apart from it)."""
    from native.host import host_class

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
    """A class with no limits of its own: its figures are reported in the record, not gated."""
    return not klass.get("figures") and not klass.get("benchmarks")


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


def _margin(spec: Any, base: float) -> float:
    """Allowed worsening: '25%' of the baseline value, or an absolute number."""
    if isinstance(spec, str) and spec.endswith("%"):
        return abs(base) * float(spec[:-1]) / 100
    return float(spec or 0)


def _fmt(v: float, fact: str) -> str:
    return fmt_ns(v) if fact.endswith("_ns") or "_ns." in fact else f"{v:.4g}"


def check_figures(klass: dict[str, Any], run: dict[str, Any], base: dict[str, Any]) -> list[Finding]:
    out = []
    for f in klass.get("figures", []):
        name, fact, number, case = f["name"], f["fact"], int(f["phase"]), f.get("case", "*")
        got = fact_values(run, number, case, fact)
        if not got:
            if f.get("required", True):
                out.append(Finding(False, "figure",
                                   f"{name}: not in the run (phase {number}, case {case}, fact {fact})"))
            continue
        baseline = dict(fact_values(base, number, case, fact))
        lower = f.get("better", "lower") == "lower"
        for test, value in got:
            value = float(value)
            limit = f.get("limit")
            if limit is not None and (value > float(limit) if lower else value < float(limit)):
                out.append(Finding(False, "figure", f"{name} [{test}]: {_fmt(value, fact)} is past the limit "
                                   f"{_fmt(float(limit), fact)} ({'at most' if lower else 'at least'})"))
                continue
            if test not in baseline:
                out.append(Finding(True, "figure", f"{name} [{test}]: {_fmt(value, fact)}; not in the baseline, "
                                   "not compared"))
                continue
            ref = float(baseline[test])
            allowed = _margin(f.get("margin", 0), ref)
            worse = value - ref if lower else ref - value
            text = (f"{name} [{test}]: {_fmt(value, fact)} vs baseline {_fmt(ref, fact)} "
                    f"({'+' if value >= ref else ''}{(value / ref - 1) * 100 if ref else 0:.1f}%; "
                    f"allowed {f.get('margin', 0)} {'up' if lower else 'down'})")
            out.append(Finding(worse <= allowed, "figure", text))
    return out


def check_benchmarks(klass: dict[str, Any], run_benches: dict[str, dict[str, Any]],
                     base_benches: dict[str, dict[str, Any]]) -> list[Finding]:
    """pytest-benchmark's own regression checks (``--benchmark-compare-fail`` syntax), per tracked benchmark."""
    spec = klass.get("benchmarks")
    if not spec:
        return []
    from pytest_benchmark.utils import parse_compare_fail

    try:
        checks = [parse_compare_fail(e) for e in spec.get("compare_fail", ["median:25%"])]
    except Exception as e:  # argparse.ArgumentTypeError: names the bad expression
        raise PolicyError(f"benchmarks.compare_fail: {e}") from None
    include = spec.get("include", ["*"])
    exclude = spec.get("exclude", [])

    def tracked(b: dict[str, Any]) -> bool:
        names = (b["fullname"], b["name"])
        return (any(fnmatch.fnmatchcase(n, pat) for pat in include for n in names)
                and not any(fnmatch.fnmatchcase(n, pat) for pat in exclude for n in names))

    out = []
    for fullname, bb in sorted(base_benches.items()):
        if not tracked(bb):
            continue
        rb = run_benches.get(fullname)
        if rb is None:
            if spec.get("required", True):
                out.append(Finding(False, "benchmark", f"{bb['name']}: in the baseline, not in the run"))
            continue
        fails = [msg for c in checks if (msg := c.fails(rb["stats"], bb["stats"]))]
        med, bmed = rb["stats"]["median"] * 1e9, bb["stats"]["median"] * 1e9
        text = f"{rb['name']}: median {fmt_ns(med)} vs baseline {fmt_ns(bmed)} ({(med / bmed - 1) * 100:+.1f}%)"
        out.append(Finding(not fails, "benchmark", text + ("; " + "; ".join(fails) if fails else "")))
    for fullname, rb in sorted(run_benches.items()):
        if fullname not in base_benches and tracked(rb):
            out.append(Finding(True, "benchmark", f"{rb['name']}: new (not in the baseline), not compared"))
    return out


def evaluate(run: dict[str, Any], base: dict[str, Any] | None, policy: dict[str, Any], host_class: str | None = None,
             run_benches: dict[str, dict[str, Any]] | None = None,
             base_benches: dict[str, dict[str, Any]] | None = None) -> tuple[dict[str, Any], list[Finding]]:
    """(the host class applied, every finding). The baseline must be of the class applied to the run: one of
    another class is refused (PolicyError naming both), as is none for a class that has limits to compare."""
    klass = select_class(policy, host_facts(run), host_class)
    findings = []
    # A record of a run that did not finish proves nothing whole, whatever its phases say.
    for role, rec in (("run", run), ("baseline", base)):
        if rec is None:
            continue
        if (why := incompleteness(rec)) is not None:
            findings.append(Finding(False, "record", f"the {role} record is not of a whole run: {why}; "
                                    "run it again to the end"))
    if base is not None:
        base_host = host_facts(base)
        base_class = next((c["name"] for c in policy["classes"] if matches(c, base_host)), None)
        if base_class != klass["name"]:
            raise PolicyError(f"the baseline's host {host_label(base)} is of host class "
                              f"{base_class or base_host.get('host_class')!r}, the run is judged as class "
                              f"{klass['name']!r}: a class never uses another class's baseline (figures from "
                              "another class of host prove nothing)")
    elif not uncalibrated(klass):
        raise PolicyError(f"host class {klass['name']!r} tracks figures: a baseline record of that class is needed "
                          "(--baseline)")
    base = base if base is not None else {"phases": [], "benchmarks": []}
    for number in klass.get("required_phases", []):
        p = phase(run, int(number))
        if p is None:
            findings.append(Finding(False, "phase", f"phase {number}: NOT RUN (required)"))
            continue
        detail = ""
        if p["outcome"] != "PASS":
            bad = [c for c in p["cases"] if c["outcome"] != "passed"]
            why = bad[0].get("failure") or bad[0].get("skip_reason") or bad[0]["outcome"] if bad else ""
            if bad:
                detail = f" ({len(bad)} of {len(p['cases'])} cases not passed; first: {bad[0]['test']}: {why})"
        if left_out := p.get("deselected", []):
            # Cases the host's class excused are named, never counted: the PASS covers what ran.
            detail += (f" ({len(left_out)} deselected for this host, not required by its class; first: "
                       f"{left_out[0]['test']}: {left_out[0]['reason'].split(', not required', 1)[0]})")
        findings.append(Finding(p["outcome"] == "PASS", "phase",
                                f"phase {number} {p['title']}: {p['outcome']}{detail}"))
    # A figure past the host's own limit measured in the same run is a measurement error, never a record.
    for p in run.get("phases", []):
        for c in p.get("cases", []):
            for e in c.get("facts", {}).get(MEASUREMENT_ERRORS, []):
                findings.append(Finding(False, "figure", f"phase {p['phase']} [{c['test']}]: {e['figure']} = "
                                        f"{e['value']} is a measurement error ({e['why']}): refused, not a record"))
    caps = {c["name"]: c for c in run.get("capabilities", [])}
    for name, allow in required_capabilities(klass).items():
        c = caps.get(name)
        if c is None:
            findings.append(Finding(False, "capability", f"{name}: not probed in the run"))
        else:
            findings.append(Finding(c["status"] in allow, "capability", f"{name}: {c['status']} ({c.get('detail', '')})"
                                    + ("" if c["status"] in allow else f"; required: {' or '.join(allow)}")))
    if uncalibrated(klass):
        findings.append(Finding(True, "figures", f"host class {klass['name']!r} is uncalibrated: figures reported "
                                "in the record, not gated"))
    findings += check_figures(klass, run, base)
    findings += check_benchmarks(klass, benchmarks(run) if run_benches is None else run_benches,
                                 benchmarks(base) if base_benches is None else base_benches)
    return klass, findings


def gate(run_path: str, baseline_path: str | None, policy_path: str, host_class: str | None = None,
         run_json: str | None = None, baseline_json: str | None = None) -> tuple[str, int]:
    """The gate's report and exit status: 0 pass, 1 fail."""
    from results.load import benchmarks_from_json, load_record

    run = load_record(run_path)
    base = load_record(baseline_path) if baseline_path is not None else None
    policy = load_policy(policy_path)

    def by_name(path: str | None) -> dict[str, dict[str, Any]] | None:
        return None if path is None else {b["fullname"]: b for b in benchmarks_from_json(path)}

    klass, findings = evaluate(run, base, policy, host_class, by_name(run_json), by_name(baseline_json))
    failed = [f for f in findings if not f.ok]
    against = f"baseline {baseline_path} on {host_label(base)}" if base is not None else "no baseline"
    lines = [f"snapproof gate: {run_path} on {host_label(run)}",
             f"  {against}; policy {policy_path}, host class {klass['name']!r}"]
    lines += [f.line() for f in findings]
    verdict = "FAIL" if failed else "PASS"
    lines.append(f"gate: {verdict} ({len(findings) - len(failed)} of {len(findings)} checks passed)")
    if failed:
        lines.append("why:")
        lines += [f"  - {f.kind} {f.text}" for f in failed]
    return "\n".join(lines), 1 if failed else 0


__all__ = ["Finding", "PolicyError", "RecordError", "evaluate", "gate", "host_facts", "load_policy",
           "required_capabilities", "select_class", "uncalibrated", "dig"]
