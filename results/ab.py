"""Same-host A/B: two builds or two host settings, their timed phases interleaved, B judged against A.

``snapproof results ab --a main --b HEAD`` checks each ref out in a git worktree of its own (built with
``snapproof build``), then runs the timed phases A, B, A, B, ... (``--pairs``), each run writing its
own record, and judges every figure of the policy's class by the samples of all A runs against all B
runs, with the gate's statistics (results/stats.py). Interleaving puts both sides through the same host
states, which a baseline taken another day cannot. ``--a .`` is this checkout as it is; ``--a-args`` and
``--b-args`` add pytest arguments (``--inject unprotect-per-page``); ``--a-setup``/``--b-setup`` run a shell
command before each of that side's runs (a host setting: a sysctl, THP, a CPU governor).

``snapproof results teeth`` measures the gate itself on this host: a baseline run, clean reruns of the
same build against it (each a false failure if the gate fails it), runs with each performance
fault-injection switch (each caught if a figure fails), and for each gated figure the smallest
slowdown the default settings catch in every clean rerun (the reruns' own samples, scaled).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapproof.results.hostbusy import busy_cases
from snapproof.results.hostpolicy import DEFAULT_POLICY
from snapproof.results.load import RecordError, figures, incompleteness, load_record

from snapproof import CHECKOUT

ROOT = Path(__file__).resolve().parent.parent
# The timed phases: every benchmark of every phase (each gated figure is one of them).
TIMED_SELECTION = "phases -k benchmark -p no:randomly"
# A release gate's run (the README's recipe): every phase, strictly, hugepages reserved for the hugetlb cases and
# THP on for the THP cases.
GATE_SELECTION = "phases --strict-host --reserve-hugepages 8 --thp -p no:randomly"
# The performance switches (native/inject.py) the teeth measurement runs, one at a time.
PERF_SWITCHES = ("unprotect-per-page", "extra-copy-per-fault", "arm-per-page")
RUN_CEILING_S = 1800  # one pytest run of the phases: pytest-timeout bounds each test; this bounds the whole
SETUP_CEILING_S = 120
BUILD_CEILING_S = 600


class ABError(Exception):
    """A side could not be prepared or run (the message names which and why): exit 2."""


@dataclass
class Side:
    label: str
    source: str               # "." or a folder: that checkout as it is; else a git ref, checked out and built
    args: list[str] = field(default_factory=list)
    setup: str = ""
    root: Path = ROOT
    records: list[Path] = field(default_factory=list)

    def describe(self) -> str:
        extra = " ".join(self.args)
        return f"{self.label}: {self.source}" + (f" {extra}" if extra else "") + \
            (f" (setup: {self.setup})" if self.setup else "")


def _run(cmd: list[str] | str, cwd: Path, timeout: float, what: str,
         shell: bool = False) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, shell=shell)
    except subprocess.TimeoutExpired:
        raise ABError(f"{what}: still running after {timeout:.0f} s, stopped") from None


def prepare(side: Side, workdir: Path) -> Side:
    """The side's code: this checkout, a folder, or a git ref checked out in a worktree and built."""
    if side.source == "." or Path(side.source).is_dir():
        side.root = ROOT if side.source == "." else Path(side.source).resolve()
        return side
    rev = _run(["git", "rev-parse", "--verify", f"{side.source}^{{commit}}"], ROOT, 30, "git rev-parse")
    if rev.returncode != 0:
        raise ABError(f"side {side.label}: {side.source!r} is neither a folder nor a git ref: {rev.stderr.strip()}")
    commit = rev.stdout.strip()
    tree = workdir / f"{side.label}-{commit[:12]}"
    if not tree.exists():
        add = _run(["git", "worktree", "add", "--detach", str(tree), commit], ROOT, 120, "git worktree add")
        if add.returncode != 0:
            raise ABError(f"side {side.label}: git worktree add {tree} {commit[:12]}: {add.stderr.strip()}")
    build = _run([sys.executable, "-m", "snapproof.native.build"], tree, BUILD_CEILING_S,
                 f"side {side.label}: native build")
    if build.returncode != 0:
        raise ABError(f"side {side.label}: snapproof build in {tree} failed:\n{build.stdout[-2000:]}"
                      f"{build.stderr[-2000:]}")
    side.root = tree
    return side


def run_side(side: Side, record: Path, selection: list[str], log: Any = None) -> Path:
    """One run of the side's phases into ``record``; returns it (ABError if the run left none)."""
    if side.setup:
        got = _run(side.setup, side.root, SETUP_CEILING_S, f"side {side.label}: setup", shell=True)
        if got.returncode != 0:
            raise ABError(f"side {side.label}: setup {side.setup!r} exited {got.returncode}: {got.stderr.strip()}")
    cmd = [sys.executable, "-m", "pytest", *selection, "--reports", "none", "--results-file", str(record), *side.args]
    if log is not None:
        print(f"  {side.label}: {shlex.join(cmd)}", file=log, flush=True)
    done = _run(cmd, side.root, RUN_CEILING_S, f"side {side.label}: pytest")
    if not record.exists():
        raise ABError(f"side {side.label}: the run left no record at {record} (exit {done.returncode}):\n"
                      f"{done.stdout[-3000:]}{done.stderr[-2000:]}")
    side.records.append(record)
    return record


def pooled(records: list[dict[str, Any]], number: int, case: str, name: str) -> dict[str, dict[str, Any]]:
    """Per matching test: the figure with the samples of every record, in order."""
    out: dict[str, dict[str, Any]] = {}
    for rec in records:
        for test, fig in figures(rec, number, case, name):
            if test in out:
                out[test]["samples"] = out[test]["samples"] + fig["samples"]
            else:
                out[test] = dict(fig, samples=list(fig["samples"]))
    return out


@dataclass
class Row:
    figure: str
    test: str
    unit: str
    a: float
    b: float
    change: float
    p: float
    verdict: str
    reason: str
    n_a: int
    n_b: int

    @property
    def ok(self) -> bool:
        from snapproof.results.stats import PASSING_VERDICTS

        return self.verdict in PASSING_VERDICTS


def compare(a_records: list[dict[str, Any]], b_records: list[dict[str, Any]], policy: dict[str, Any],
            host_class: str | None = None) -> tuple[str, list[Row]]:
    """Each figure of the policy's class, all A samples against all B samples: (class name, rows)."""
    from snapproof.results.gate import Statistics, busy_case, host_facts, select_class

    klass = select_class(policy, host_facts(a_records[0]), host_class)
    stats = Statistics.of(klass)
    rows = []
    for f in klass.get("figures", []):
        a_figs = pooled(a_records, int(f["phase"]), f["case"], f["figure"])
        b_figs = pooled(b_records, int(f["phase"]), f["case"], f["figure"])
        a_busy = {t: b for rec in a_records for t, b in busy_cases(rec, int(f["phase"])).items()}
        b_busy = {t: b for rec in b_records for t, b in busy_cases(rec, int(f["phase"])).items()}
        for test in sorted(set(a_figs) | set(b_figs)):
            if (refused := busy_case(f"{f['figure']}[{test}]", test, ("A's runs", a_busy), ("B's runs", b_busy))):
                rows.append(Row(f["figure"], test, "", float("nan"), float("nan"), float("nan"), 1.0, "busy",
                                refused.text, 0, 0))
                continue
            if test not in a_figs or test not in b_figs:
                side = "A" if test not in a_figs else "B"
                rows.append(Row(f["figure"], test, "", float("nan"), float("nan"), float("nan"), 1.0, "missing",
                                f"not in {side}'s runs", 0, 0))
                continue
            a, b = a_figs[test], b_figs[test]
            j = stats.judge(a["samples"], b["samples"], b["better"], f.get("min_effect"))
            rows.append(Row(f["figure"], test, b["unit"], j.base_median, j.run_median, j.change, j.p, j.verdict,
                            j.reason(), j.n_base, j.n_run))
    return klass["name"], rows


def table(rows: list[Row]) -> str:
    from snapproof.results.record import fmt_value

    header = ["figure", "A", "B", "change", "p", "verdict"]
    body = [[f"{r.figure}[{r.test}]", fmt_value(r.a, r.unit) if r.unit else "-",
             fmt_value(r.b, r.unit) if r.unit else "-", f"{r.change:+.1%}" if r.unit else "-", f"{r.p:.2g}",
             r.verdict] for r in rows]
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)) for x in body]
    return "\n".join(lines)


def _load_complete(path: Path) -> dict[str, Any]:
    rec = load_record(path)
    if (why := incompleteness(rec)) is not None:
        raise ABError(f"{path}: not a complete run ({why})")
    return rec


def add_ab_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--a", required=True, metavar="REF", help="side A: a git ref, a folder, or . (this checkout)")
    p.add_argument("--b", required=True, metavar="REF", help="side B: the same forms")
    p.add_argument("--a-args", default="", metavar="ARGS", help="pytest arguments for A only (shell words)")
    p.add_argument("--b-args", default="", metavar="ARGS", help="pytest arguments for B only, e.g. '--inject X'")
    p.add_argument("--a-setup", default="", metavar="CMD", help="shell command run before each A run")
    p.add_argument("--b-setup", default="", metavar="CMD", help="shell command run before each B run")
    p.add_argument("--pairs", type=int, default=3, help="A, B runs to interleave (default 3: A B A B A B)")
    p.add_argument("--select", default=TIMED_SELECTION, metavar="ARGS",
                   help=f"the pytest selection both sides run (default: {TIMED_SELECTION!r})")
    p.add_argument("--policy", default=str(DEFAULT_POLICY), help="whose class's figures are judged")
    p.add_argument("--host-class", help="apply this class of the policy instead of matching on host facts")
    p.add_argument("--out", help="folder for the records and worktrees (default results/ab/<UTC time>)")
    p.add_argument("--json", action="store_true", help="print the table as JSON")


def _out(given: str | None, kind: str) -> Path:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(given) if given else ROOT / "results" / kind / stamp
    out.mkdir(parents=True, exist_ok=True)
    return out.resolve()


def _need_checkout(command: str) -> None:
    if CHECKOUT is None:
        raise ABError(f"{command} builds and runs git checkouts of snapproof side by side: run it in a checkout "
                      f"(this snapproof is installed, in {ROOT})")


def ab_main(args: argparse.Namespace) -> int:
    from snapproof.results.gate import load_policy

    _need_checkout("ab")

    policy = load_policy(args.policy)
    if args.pairs < 1:
        raise ABError("--pairs must be at least 1")
    out = _out(args.out, "ab")
    sides = [Side("A", args.a, shlex.split(args.a_args), args.a_setup),
             Side("B", args.b, shlex.split(args.b_args), args.b_setup)]
    log = sys.stderr
    for side in sides:
        prepare(side, out / "trees")
        print(f"side {side.describe()} in {side.root}", file=log, flush=True)
    selection = shlex.split(args.select)
    for i in range(args.pairs):
        for side in sides:
            run_side(side, out / f"{side.label}-{i + 1}.yaml", selection, log)
    a_recs = [_load_complete(p) for p in sides[0].records]
    b_recs = [_load_complete(p) for p in sides[1].records]
    klass, rows = compare(a_recs, b_recs, policy, args.host_class)
    failed = [r for r in rows if not r.ok]
    if args.json:
        print(json.dumps({"host_class": klass, "a": sides[0].describe(), "b": sides[1].describe(),
                          "pairs": args.pairs, "records": {s.label: [str(p) for p in s.records] for s in sides},
                          "verdict": "FAIL" if failed else "PASS",
                          "rows": [dict(r.__dict__, ok=r.ok) for r in rows]}, indent=2))
    else:
        print(f"A/B on this host, {args.pairs} interleaved pairs, class {klass!r} of {args.policy}")
        for side in sides:
            print(f"  {side.describe()}")
        print(table(rows))
        for r in failed:
            print(f"  {r.figure}[{r.test}]: {r.reason}")
        print(f"A/B: {'FAIL' if failed else 'PASS'} ({len(rows) - len(failed)} of {len(rows)} figures not worse)")
    return 1 if failed else 0


# -- teeth: what the gate catches on this host ------------------------------------------------------------


def add_teeth_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reruns", type=int, default=5, help="clean reruns, and runs per switch (default 5)")
    p.add_argument("--switches", default=",".join(PERF_SWITCHES), help="performance switches to run, comma-separated")
    p.add_argument("--select", default=GATE_SELECTION, metavar="ARGS",
                   help=f"the pytest selection of the baseline and the clean reruns (default: {GATE_SELECTION!r})")
    p.add_argument("--switch-select", default=TIMED_SELECTION, metavar="ARGS",
                   help="the selection of the runs with a switch: only their figures are looked at "
                        f"(default: {TIMED_SELECTION!r})")
    p.add_argument("--policy", default=str(DEFAULT_POLICY))
    p.add_argument("--baseline", help="an existing baseline record of this host (default: take one first)")
    p.add_argument("--out", help="folder for the records (default results/teeth/<UTC time>)")
    p.add_argument("--json", action="store_true", help="print the measurement as JSON")


def smallest_caught(base: dict[str, Any], policy: dict[str, Any], reruns: list[dict[str, Any]],
                    host_class: str | None = None, steps: int = 500) -> dict[str, float | None]:
    """Per gated figure: the smallest slowdown (in whole percent) that fails the figure in every clean rerun
    when applied to that rerun's own samples; None when even +``steps``% is not caught in all."""
    from snapproof.results.gate import Statistics, host_facts, select_class

    klass = select_class(policy, host_facts(base), host_class)
    stats = Statistics.of(klass)
    out: dict[str, float | None] = {}
    for f in klass.get("figures", []):
        for test, bfig in figures(base, int(f["phase"]), f["case"], f["figure"]):
            got = [dict(figures(r, int(f["phase"]), f["case"], f["figure"])).get(test) for r in reruns]
            runs = [r for r in got if r is not None]
            if len(runs) < len(got):
                out[f"{f['figure']}[{test}]"] = None
                continue
            better = bfig["better"]
            found = None
            for pct in range(0, steps + 1):
                # x% slower in the figure's own direction: a time times 1 + x, a rate divided by it.
                scale = (1 + pct / 100) if better == "lower" else 1 / (1 + pct / 100)
                if all(stats.judge(bfig["samples"], [v * scale for v in r["samples"]], better,
                                   f.get("min_effect")).verdict == "regressed" for r in runs):
                    found = float(pct)
                    break
            out[f"{f['figure']}[{test}]"] = found
    return out


def teeth_main(args: argparse.Namespace) -> int:
    from snapproof.results.gate import evaluate, load_policy

    _need_checkout("teeth")
    policy = load_policy(args.policy)
    out = _out(args.out, "teeth")
    selection = shlex.split(args.select)
    here = Side("clean", ".")
    log = sys.stderr
    base_path = Path(args.baseline) if args.baseline else run_side(here, out / "baseline.yaml", selection, log)
    base = _load_complete(base_path)

    def gate_one(path: Path) -> dict[str, Any]:
        """One record through the gate: whether it passed, every failed check, the figure checks it failed, and
        whether a figure was not judged for a busy host (never a catch, never a false failure: it judged nothing)."""
        _, findings = evaluate(load_record(path), base, policy)
        failed = [f for f in findings if not f.ok]
        return {"record": str(path), "gate_passed": not failed,
                "judged_failures": sum(f.kind != "busy" for f in failed), "busy": any(f.kind == "busy" for f in failed),
                "failed": [f"{f.kind} {f.text}" for f in failed],
                "caught_by": [f.subject for f in failed if f.kind == "figure"]}

    clean: list[dict[str, Any]] = []
    clean_records = []
    for i in range(args.reruns):
        path = run_side(here, out / f"clean-{i + 1}.yaml", selection, log)
        clean.append(gate_one(path))
        clean_records.append(load_record(path))
    switches: dict[str, list[dict[str, Any]]] = {}
    for switch in filter(None, args.switches.split(",")):
        side = Side(switch, ".", ["--inject", switch])
        for i in range(args.reruns):
            path = run_side(side, out / f"{switch}-{i + 1}.yaml", shlex.split(args.switch_select), log)
            switches.setdefault(switch, []).append(gate_one(path))
    smallest = smallest_caught(base, policy, clean_records)
    result = {"baseline": str(base_path), "reruns": args.reruns,
              "false_failures": sum(c["judged_failures"] > 0 for c in clean),
              "busy_runs": sum(c["busy"] for c in clean), "clean": clean,
              "switches": {s: {"caught": sum(bool(r["caught_by"]) for r in runs), "busy": sum(r["busy"] for r in runs),
                               "runs": runs}
                           for s, runs in switches.items()},
              "smallest_caught_percent": smallest}
    (out / "teeth.json").write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"gate teeth on this host ({out}); baseline {base_path}")
        print(f"  clean reruns: {result['false_failures']} false failures of {args.reruns}"
              f" ({result['busy_runs']} with figures not judged: the host was busy)")
        for c in clean:
            for line in c["failed"]:
                print(f"    {Path(c['record']).name}: {line}")
        for s, v in result["switches"].items():
            figs = sorted({f for r in v["runs"] for f in r["caught_by"]})
            print(f"  --inject {s}: caught in {v['caught']} of {args.reruns} (by {', '.join(figs) or 'nothing'}; "
                  f"{v['busy']} with figures not judged: the host was busy)")
        print("  smallest slowdown caught in every clean rerun, per gated figure:")
        for name, pct in smallest.items():
            print(f"    {name}: {'not within +500%' if pct is None else f'+{pct:.0f}%'}")
    return 0


__all__ = ["ABError", "RecordError", "Side", "ab_main", "compare", "pooled", "smallest_caught", "table", "teeth_main"]
