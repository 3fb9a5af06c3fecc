"""The JSON Schemas of a run record (``snapproof-run/2``) and of a gate policy (``snapproof-gate/2``).

Every reader validates what it loads against these (jsonschema), so a typo in a policy's key, a wrong
type or a missing field is refused naming the file and the key, never read as "nothing to check" or met
later as a KeyError. A record or policy of another version is refused before that, naming both versions.

Open mappings are only where the content is open by design: a record's host facts, a case's facts, a
benchmark's params and extra_info, and a policy's ``match`` (host facts by name). Everywhere else an
unknown key is an error: a new key is a change of this file, and a changed meaning a new version.
tests/test_run_record.py validates a record the plugin writes against RECORD, so the two cannot drift.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from snapproof.results.record import FIGURE_UNITS, SCHEMA

RUN_SCHEMA = SCHEMA
POLICY_SCHEMA = "snapproof-gate/2"

_NS = {"type": "integer", "minimum": 0}
_TEXT = {"type": "string"}
_PERCENT = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?%$"}


def _strict(needed: list[str], /, **properties: Any) -> dict[str, Any]:
    return {"type": "object", "required": needed, "properties": properties, "additionalProperties": False}


_FIGURE = _strict(["unit", "better", "median", "samples"],
                  unit={"enum": list(FIGURE_UNITS)}, better={"enum": ["lower", "higher"]}, what=_TEXT,
                  median={"type": "number"},
                  samples={"type": "array", "minItems": 1, "items": {"type": "number"}})

_STAGE = _strict(
    ["stage", "name", "ok", "elapsed_ns", "checks", "timings", "notes"],
    stage={"type": "integer"}, name=_TEXT, ok={"type": ["boolean", "null"]}, elapsed_ns=_NS,
    checks={"type": "array", "items": _strict(["ok", "text"], ok={"type": "boolean"}, text=_TEXT)},
    timings={"type": "array", "items": _strict(["name", "ns"], name=_TEXT, ns={"type": "number"}, note=_TEXT)},
    notes={"type": "array", "items": _TEXT})

_CASE = _strict(
    ["test", "nodeid", "claim", "outcome", "duration_ns", "stages"],
    test=_TEXT, nodeid=_TEXT, claim=_TEXT,
    outcome={"enum": ["passed", "failed", "error", "skipped", "not run"]},
    duration_ns=_NS, stages={"type": "array", "items": _STAGE},
    facts={"type": "object"},
    figures={"type": "object", "additionalProperties": _FIGURE},
    failure=_TEXT, skip_reason=_TEXT,
    # What others took of the host while the case ran (results/hostbusy.py); absent where there is no /proc.
    host_busy=_strict(["wall_s", "other_cpus", "steal_cpus", "busy", "busy_from_cpus", "busiest"],
                      wall_s={"type": "number"}, other_cpus={"type": "number"}, steal_cpus={"type": "number"},
                      busy={"type": "boolean"}, busy_from_cpus={"type": "number"},
                      busiest={"type": "array", "items": _strict(["pid", "name", "cpu_s"], pid={"type": "integer"},
                                                                  name=_TEXT, cpu_s={"type": "number"})}))

# A case left out at collection for a capability the host lacks and its class does not require.
_DESELECTED = _strict(["test", "nodeid", "reason"], test=_TEXT, nodeid=_TEXT, reason=_TEXT)

_PHASE = _strict(["phase", "title", "outcome", "duration_ns", "cases"],
                 phase={"type": "integer"}, title=_TEXT,
                 outcome={"enum": ["PASS", "FAIL", "INCOMPLETE", "SKIP", "NOT RUN"]},
                 duration_ns=_NS, cases={"type": "array", "items": _CASE},
                 deselected={"type": "array", "items": _DESELECTED})

_BENCHMARK = _strict(["name", "fullname", "stats"],
                     name=_TEXT, fullname=_TEXT, params={"type": ["object", "null"]},
                     stats={"type": "object", "additionalProperties": {"type": "number"}},
                     extra_info={"type": "object"})

# The engine under test (native.engine.Engine.describe), or why it could not be described; null on Windows.
_ENGINE = {"anyOf": [
    {"type": "null"},
    _strict(["name", "version", "abi_version", "library", "sha256", "builtin"], name=_TEXT, version=_TEXT,
            abi_version={"type": "integer"}, library=_TEXT, sha256=_TEXT, builtin={"type": "boolean"},
            # native.engine.CAPABILITIES (not imported: this module is read on Windows too); absent before them
            capabilities={"type": "array", "items": {"enum": ["overlapping", "consecutive", "prearmed"]}}),
    _strict(["error"], error=_TEXT)]}

# The gate policy's class for the host (results/hostpolicy.py); empty when the probe failed.
_RUN_POLICY = _strict([], file=_TEXT, host_class={"type": ["string", "null"]},
                      required_capabilities={"type": "array", "items": _TEXT}, note=_TEXT)

# --background-load (results/hostload.py); empty when the run made none. ``ended``: each load process that
# exited before the run did, so what ran after it was not loaded.
_BACKGROUND_LOAD = _strict([], kinds={"type": "array", "items": {"enum": ["cpu", "memory"]}},
                           seconds={"type": "number"}, memory_fraction={"type": "number"},
                           ended={"type": "array", "items": _strict(
                               ["kind", "seen_gone_after_s", "returncode"], kind={"enum": ["cpu", "memory"]},
                               seen_gone_after_s={"type": "number"}, returncode={"type": "integer"})})

# run.status: complete (every selected test finished, the run at its end, no signal), incomplete (stopped
# early, or never finished its record: what a run still going or killed leaves), interrupted (a signal).
RUN_STATUSES = ("complete", "incomplete", "interrupted")

_RUN = _strict(
    ["started", "duration_s", "argv", "strict_host", "inject", "engine", "git_commit", "policy", "background_load",
     "status", "tests"],
    started=_TEXT, duration_s={"type": "number"}, argv={"type": "array", "items": _TEXT},
    strict_host={"type": "boolean"}, inject=_TEXT, engine=_ENGINE, git_commit=_TEXT, record=_TEXT,
    policy=_RUN_POLICY, background_load=_BACKGROUND_LOAD,
    status={"enum": list(RUN_STATUSES)},
    interrupted=_strict(["signal", "during"], signal=_TEXT, during=_TEXT),
    tests=_strict(["selected", "finished"], selected=_NS, finished=_NS))
# An interrupted run names its signal and when it came.
_RUN["if"] = {"required": ["status"], "properties": {"status": {"const": "interrupted"}}}
_RUN["then"] = {"required": ["interrupted"]}

_CAPABILITY = _strict(["name", "status"], name=_TEXT, status={"enum": ["PASS", "INFO", "WARN", "FAIL"]}, detail=_TEXT,
                      required={"type": "boolean"}, fallback=_TEXT)

RECORD = _strict(
    ["schema", "run", "host", "capabilities", "phases"],
    schema={"const": RUN_SCHEMA},
    run=_RUN,
    host={"type": "object"},
    capabilities={"type": "array", "items": _CAPABILITY},
    phases={"type": "array", "items": _PHASE},
    benchmarks={"type": "array", "items": _BENCHMARK})

_SCALAR = {"type": ["string", "number", "boolean"]}

_STATISTICS = _strict([], test={"enum": ["mann-whitney"]},
                      alpha={"type": "number", "exclusiveMinimum": 0, "maximum": 0.5},
                      min_effect=_PERCENT, max_improvement=_PERCENT)

_POLICY_FIGURE = _strict(["figure", "phase", "case"],
                         figure=_TEXT, phase={"type": "integer", "minimum": 0}, case=_TEXT,
                         min_effect=_PERCENT, limit={"type": "number"}, required={"type": "boolean"})

_CLASS = _strict(
    ["name", "match"],
    name=_TEXT,
    match={"type": "object", "additionalProperties": {"anyOf": [_SCALAR, {"type": "array", "items": _SCALAR}]}},
    required_phases={"type": "array", "items": {"type": "integer", "minimum": 0}},
    required_capabilities={"type": "array", "items": {"anyOf": [
        _TEXT, _strict(["name"], name=_TEXT, allow={"type": "array", "items": {"enum": ["PASS", "WARN", "FAIL"]}})]}},
    statistics=_STATISTICS,
    figures={"type": "array", "items": _POLICY_FIGURE})

POLICY = _strict(["schema", "classes"], schema={"const": POLICY_SCHEMA},
                 classes={"type": "array", "minItems": 1, "items": _CLASS})


def _where(path: Any) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def problems(doc: Any, schema: dict[str, Any]) -> list[str]:
    """Every way ``doc`` breaks ``schema``, one line each, naming the key: 'classes[0].required_phase: unknown
    key', 'classes[0].required_phases: 'one' is not of type 'array'', 'run: missing field 'status''."""
    from jsonschema import Draft202012Validator

    out = []
    for err in sorted(Draft202012Validator(schema).iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path]):
        where = _where(err.absolute_path)
        if err.validator == "additionalProperties" and isinstance(err.instance, dict):
            known = sorted(err.schema.get("properties", {}))
            for key in sorted(set(err.instance) - set(known)):
                sub = _where([*err.absolute_path, key])
                out.append(f"{sub}: unknown key" + (f" (known here: {', '.join(known)})" if known else ""))
        elif err.validator == "required":
            missing = [k for k in err.validator_value if k not in err.instance]
            out += [f"{where}: missing field {k!r}" for k in missing]
        elif err.validator == "anyOf":
            out.append(f"{where}: {err.instance!r} is not one of the forms allowed here")
        else:
            out.append(f"{where}: {err.message}")
    # jsonschema reports each missing field as an error of its own, each carrying the whole required list.
    return list(dict.fromkeys(out))


def check(doc: Any, schema: dict[str, Any], kind: str, version: str, path: str | Path,
          error: type[Exception]) -> dict[str, Any]:
    """``doc`` if it is a valid ``kind`` of this version; else ``error`` naming the file, the key and why
    (another version is named beside this reader's before anything else is looked at)."""
    if not isinstance(doc, dict):
        raise error(f"{path}: not a {kind} (top level is {type(doc).__name__}, expected a mapping)")
    found = doc.get("schema")
    if found != version:
        raise error(f"{path}: a {kind} of schema {found!r}; this reader reads {version!r} only "
                    f"(a {kind} of another version is never read as this one)")
    bad = problems(doc, schema)
    if bad:
        shown = "\n  ".join(bad[:20]) + (f"\n  ... {len(bad) - 20} more" if len(bad) > 20 else "")
        raise error(f"{path}: not a valid {kind} ({version}):\n  {shown}")
    return doc
