"""What the gate policy requires of the host a run is on: the plugin's --strict-host and collection read it here.

The policy (results/gate.yaml, ``--policy``) gives each host class its required capabilities, the same
list the release gate checks. The plugin sorts what a case needs of the host (its ``needs`` markers and
the needs tables of its parameters) by it:

- a capability the host has: nothing to say;
- one it lacks that its class requires: the case skips naming it, and fails under --strict-host;
- one it lacks that its class does not require: the case is deselected at collection, the reason naming
  the capability, how it was probed and the suite's fallback; it is never counted as passed.

Without a class for the host (no policy file, or no class matches), every capability counts as
required: nothing is excused unless a policy says so. Pure Python, every platform.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

# The policy snapproof ships (a checkout's results/gate.yaml, or the installed package's copy): the default of
# pytest's --policy and of the results tools.
DEFAULT_POLICY = Path(__file__).resolve().parent / "gate.yaml"


class Probe(Protocol):
    """What is read of native.host.HostReport: the skip reason for a capability, None when it is there."""

    def missing(self, name: str) -> str | None: ...


@dataclass(frozen=True)
class HostPolicy:
    source: str                 # the policy file as shown in messages ('' for none)
    host_class: str | None      # the class applied to this host; None: none applies, everything is required
    required: frozenset[str]    # the class's required capabilities
    why_no_class: str = ""

    @classmethod
    def for_host(cls, path: str, facts: dict[str, Any], shown: str = "") -> HostPolicy:
        from snapproof.results.gate import PolicyError, host_facts, load_policy, required_capabilities, select_class

        if not path:
            return cls("", None, frozenset(), "no gate policy (--policy '')")
        try:
            klass = select_class(load_policy(path), host_facts({"host": facts}))
        except PolicyError as e:
            return cls(shown or path, None, frozenset(), str(e))
        return cls(shown or path, str(klass["name"]), frozenset(required_capabilities(klass)))

    def requires(self, capability: str) -> bool:
        return self.host_class is None or capability in self.required

    def label(self) -> str:
        if self.host_class is None:
            return f"{self.why_no_class}: every capability counts as required"
        return f"host class {self.host_class!r} of {self.source}"

    def sort(self, host: Probe, names: Iterable[str]) -> tuple[list[str], list[str]]:
        """(reasons for what the host lacks and the class requires, reasons for what it lacks and the class
        does not require), each naming the capability and the probe's words."""
        required: list[str] = []
        unavailable: list[str] = []
        for name in dict.fromkeys(names):
            reason = host.missing(name)
            if reason is None:
                continue
            if self.requires(name):
                required.append(reason)
            else:
                unavailable.append(f"{name} unavailable, not required by {self.label()}: {reason}")
        return required, unavailable
