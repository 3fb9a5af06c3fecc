"""Reading run records back: schema validation, completeness, host labels, and figures picked out of a record.

Shared by ``snapproof results show | matrix | gate | plots``; pure Python (PyYAML), every platform.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from snapproof.results.record import SCHEMA


class RecordError(Exception):
    """A file that is not a readable snapproof run record (the message names the file and why)."""


def read_yaml(path: str | Path, error: type[Exception]) -> Any:
    """A YAML file's content; ``error`` naming the file when it cannot be read or parsed."""
    p = Path(path)
    try:
        with open(p) as f:
            return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except OSError as e:
        raise error(f"{p}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise error(f"{p}: not YAML: {e}") from None


def load_record(path: str | Path) -> dict[str, Any]:
    """A run record, validated against its schema (results/schema.py): RecordError names the file and key."""
    from snapproof.results.schema import RECORD, check

    rec = check(read_yaml(path, RecordError), RECORD, "run record", SCHEMA, path, RecordError)
    rec.setdefault("benchmarks", [])
    return rec


def incompleteness(rec: dict[str, Any]) -> str | None:
    """Why the record is not of a whole run (``run.status`` is not ``complete``), or None when it is."""
    run = rec["run"]
    status = run["status"]
    if status == "complete":
        return None
    tests = run["tests"]
    finished = f"{tests['finished']} of {tests['selected']} tests finished"
    if status == "interrupted":
        got = run["interrupted"]
        return f"status interrupted: {got['signal']} during {got['during']}; {finished}"
    unfinished = next((c["test"] for p in rec["phases"] for c in p["cases"] if c["outcome"] == "not run"), None)
    during = f"; the first case not finished: {unfinished}" if unfinished else ""
    # The record is written from the start as incomplete: only a run that reached its end marks it otherwise.
    return (f"status {status}: stopped early (-x, --maxfail, an internal error), or the run never finished its "
            f"record (killed, timed out: pytest-timeout ends the process, crashed, or still running); "
            f"{finished}{during}")


def host_label(rec: dict[str, Any]) -> str:
    h = rec.get("host", {})
    under = f" under {h['hypervisor']}" if h.get("virtualization") == "nested" and h.get("hypervisor") else ""
    kind = f", {h['host_class']}{under}" if h.get("host_class") and h["host_class"] != "unknown" else ""
    return f"{h.get('hostname', '?')} ({h.get('kvm_module') or h.get('platform', '?')}, {h.get('kernel', '?')}{kind})"


def phase(rec: dict[str, Any], number: int) -> dict[str, Any] | None:
    return next((p for p in rec["phases"] if p["phase"] == number), None)


def cases(rec: dict[str, Any], number: int | None = None, case: str = "*") -> Iterator[dict[str, Any]]:
    """Cases of a phase (or of every phase) whose test name matches the fnmatch pattern ``case``."""
    for p in rec["phases"]:
        if number is not None and p["phase"] != number:
            continue
        for c in p["cases"]:
            if fnmatch.fnmatchcase(c["test"], case):
                yield c


def dig(obj: Any, path: str) -> Any:
    """``dig(facts, "pause_ns.stop-and-copy")``: walk dotted keys through mappings; None when absent."""
    for key in path.split("."):
        if isinstance(obj, dict) and key in obj:
            obj = obj[key]
        elif isinstance(obj, list) and key.isdigit() and int(key) < len(obj):
            obj = obj[int(key)]
        else:
            return None
    return obj


def fact_values(rec: dict[str, Any], number: int | None, case: str, fact: str) -> list[tuple[str, Any]]:
    """(test name, value) for each matching case that has the fact."""
    out = []
    for c in cases(rec, number, case):
        v = dig(c.get("facts", {}), fact)
        if v is not None:
            out.append((c["test"], v))
    return out


def figures(rec: dict[str, Any], number: int | None, case: str, name: str) -> list[tuple[str, dict[str, Any]]]:
    """(test name, figure) for each matching case that has the figure ``name`` (samples, unit, better)."""
    return [(c["test"], c["figures"][name]) for c in cases(rec, number, case) if name in c.get("figures", {})]


def figure_median(rec: dict[str, Any], number: int | None, case: str, name: str) -> float | None:
    """The first matching case's median of figure ``name``, or None."""
    got = figures(rec, number, case, name)
    return float(got[0][1]["median"]) if got else None


def benchmarks(rec: dict[str, Any], pattern: str = "*") -> dict[str, dict[str, Any]]:
    """The record's pytest-benchmark results by fullname (``path::test[param]``), fnmatch-filtered."""
    return {b["fullname"]: b for b in rec.get("benchmarks", [])
            if fnmatch.fnmatchcase(b["fullname"], pattern) or fnmatch.fnmatchcase(b["name"], pattern)}


def benchmarks_from_json(path: str | Path) -> list[dict[str, Any]]:
    """The ``benchmarks`` list of a pytest-benchmark JSON file (--benchmark-json / --benchmark-save)."""
    import json

    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise RecordError(f"{p}: not a pytest-benchmark JSON file: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise RecordError(f"{p}: not a pytest-benchmark JSON file (no 'benchmarks' list)")
    return data["benchmarks"]
