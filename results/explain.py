"""Why a case failed, in words: the evidence in its record, translated into sentences.

A failed case's record holds evidence the failure message does not spell out: the counters of each snapshot
engine the test built (``wp<N>_stats``, from ``evidence()`` in native/wp.py: faults served, pages captured by
fault and by bulk copy, the handler's state) and the facts the phase recorded. ``EXPLANATIONS`` is the one
table that reads it: each entry says nothing unless its evidence contradicts a correct snapshot, and then says
what happened, quoting the numbers it read. The report prints them under the failure (``why: ...``,
results/record.py) and the plugin adds them to pytest's own failure report. tests/test_reports.py shows each
entry firing on the evidence a real injected bug leaves and silent on the evidence of a correct run.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# The facts under which conftest.py puts each engine object's evidence when a test fails.
_ENGINE_EVIDENCE = re.compile(r"wp\d+_stats")


@dataclass(frozen=True)
class Explanation:
    name: str
    says: Callable[[dict[str, Any]], list[str]]  # a failed case's record -> sentences (none: nothing to explain)


def engine_evidence(case: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(who, counters) of each snapshot engine object the failed test built; ``who`` names it ("" when it is the
    only one)."""
    found = [(key.removesuffix("_stats"), value) for key, value in case.get("facts", {}).items()
             if _ENGINE_EVIDENCE.fullmatch(key) and isinstance(value, dict)]
    return [("" if len(found) == 1 else f"engine object {who}: ", ev) for who, ev in found]


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}" + ("" if n == 1 else "s")


def fault_served_without_copy(case: dict[str, Any]) -> list[str]:
    """A write-protect fault served while nothing was ever captured: the handler let a write through uncopied.
    (With pages captured by the bulk copier a fault may rightly copy nothing: its page was already captured.)"""
    out = []
    for who, ev in engine_evidence(case):
        faults = ev.get("faults")
        if isinstance(faults, int) and faults > 0 and ev.get("fault_pages") == 0 and ev.get("bulk_pages") == 0:
            out.append(f"{who}{_count(faults, 'write-protect fault')} {'was' if faults == 1 else 'were'} served but "
                       f"no page was copied before the write (faults: {faults}, fault_pages: 0, bulk_pages: 0): the "
                       "handler made the page writable without capturing it, so the write landed where the snapshot "
                       "never held the page as it was")
    return out


def handler_stopped(case: dict[str, Any]) -> list[str]:
    """The engine's fault handler thread ended with an error: no fault is served after that."""
    out = []
    for who, ev in engine_evidence(case):
        err = ev.get("handler_err")
        if isinstance(err, int) and err != 0:
            name = errno.errorcode.get(err, "unknown errno")
            out.append(f"{who}the engine's fault handler thread stopped with errno {err} ({name}: {os.strerror(err)}; "
                       f"handler_err: {err}, handler_alive: {str(ev.get('handler_alive')).lower()}): no "
                       "write-protect fault is served after that, so later writes are not captured before they land")
    return out


def holes_left_unprotected(case: dict[str, Any]) -> list[str]:
    """The arm protected never-populated pages by no mechanism at all (phase 1's ``hole_protection``)."""
    if case.get("facts", {}).get("hole_protection") != "NONE":
        return []
    return ["the engine armed with neither UFFD_FEATURE_WP_UNPOPULATED nor the holes populated first "
            "(hole_protection: NONE): a never-populated page has no page table entry to carry the write protection, "
            "so its first write is never caught"]


def armed_without_pause(case: dict[str, Any]) -> list[str]:
    """A live snapshot (phase 2's procedure: its facts name the pages captured) armed with the vCPUs running."""
    facts = case.get("facts", {})
    if not (facts.get("pause_ns") == 0 and isinstance(facts.get("pause_ns"), int) and "pages_by_fault" in facts):
        return []
    return ["the vCPUs were not paused around the arm (pause_ns: 0): the guest kept writing between the arm and the "
            "reference copy, so the snapshot cannot be memory at one instant the vCPUs were stopped at"]


EXPLANATIONS: tuple[Explanation, ...] = (
    Explanation("fault served without a copy", fault_served_without_copy),
    Explanation("fault handler stopped", handler_stopped),
    Explanation("holes left unprotected", holes_left_unprotected),
    Explanation("armed without a pause", armed_without_pause),
)


def explain(case: dict[str, Any]) -> list[str]:
    """What the evidence of a failed (or errored) case says went wrong; nothing for any other outcome."""
    if case.get("outcome") not in ("failed", "error"):
        return []
    return [sentence for e in EXPLANATIONS for sentence in e.says(case)]
