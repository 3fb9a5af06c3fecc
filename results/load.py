"""Reading run records back: schema check, host labels, and figures picked out of a record by a selector.

Shared by ``python -m results show | matrix | gate | plots``; pure Python (PyYAML), every platform.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from results.record import SCHEMA


class RecordError(Exception):
    """A file that is not a readable snapproof run record (the message names the file and why)."""


def load_record(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        with open(p) as f:
            rec = yaml.safe_load(f)
    except OSError as e:
        raise RecordError(f"{p}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise RecordError(f"{p}: not YAML: {e}") from None
    if not isinstance(rec, dict):
        raise RecordError(f"{p}: not a run record (top level is {type(rec).__name__}, expected a mapping)")
    schema = rec.get("schema")
    if schema != SCHEMA:
        raise RecordError(f"{p}: schema {schema!r}, this reader knows {SCHEMA!r}")
    rec.setdefault("phases", [])
    rec.setdefault("benchmarks", [])
    return rec


def incompleteness(rec: dict[str, Any]) -> str | None:
    """Why the record is not of a whole run (interrupted, or stopped before every test finished), or None.

    Records written before ``run.status`` existed carry none and are taken as complete."""
    run = rec.get("run", {})
    status = run.get("status", "complete")
    if status == "complete":
        return None
    tests = run.get("tests", {})
    finished = f"{tests.get('finished', '?')} of {tests.get('selected', '?')} tests finished"
    got = run.get("interrupted") or {}
    if status == "interrupted":
        return f"interrupted by {got.get('signal', '?')} during {got.get('during', '?')}; {finished}"
    return f"{status}; {finished}"


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
