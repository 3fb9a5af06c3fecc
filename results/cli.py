"""``snapproof results``: tools over run records.

    snapproof results show RUN.yaml [--short] [--phase N]      the PASS reports again, from the record
    snapproof results matrix RUN.yaml... [--json]             host x phase: outcome, duration, key figures
    snapproof results gate RUN.yaml [--baseline BASE.yaml] [--policy results/gate.yaml]
                       [--host-class NAME] [--json] [--junit-xml PATH]
    snapproof results ab --a REF --b REF [--pairs N] [--json]  build or setting B against A, interleaved
    snapproof results teeth [--reruns 5]                      measure what the gate catches on this host
    snapproof results plots RUN.yaml [--baseline BASE.yaml] [--out results/plots]
                                                              the PNG plots of a record, its baseline beside it

Exit status: 0 fine, 1 the gate (or A/B) found a regression, 2 a file could not be used (the message says
which file, which key and why).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from snapproof.results.hostpolicy import DEFAULT_POLICY
from snapproof.results.load import RecordError, fact_values, figure_median, host_label, incompleteness, load_record
from snapproof.results.record import fmt_ns, render_phase, terminal_width, wrap


def _ratio(v: float) -> str:
    return f"{v:.2f}x"


# The key figures a fleet matrix shows beside the outcomes: (column, phase, case pattern, figure or fact, format).
# A case figure shows its median; a fact (phase 4's and phase 5's comparison tables) its value.
KEY_FIGURES: list[tuple[str, int, str, str, Callable[[Any], str]]] = [
    ("arm/ioctl 1GiB", 1, "test_benchmark_arm_cost[[]1GiB]", "arm_ratio_to_raw_ioctl", _ratio),
    ("WP fault RT", 1, "test_benchmark_guest_wp_fault_round_trip[[]same-cpu]", "round_trip_ns", fmt_ns),
    ("copy/memcpy 256MiB", 2, "test_benchmark_bulk_copy_rate[[]256MiB]", "copy_rate_ratio_to_memcpy", _ratio),
    ("1st instr 64MiB map-private", 3, "test_benchmark_time_to_first_instruction[[]map-private-64MiB]",
     "first_instruction_ns", fmt_ns),
    ("COW run/plain", 4, "test_benchmark_cow_load_run*", "ratio_to_plain_memfd_run", _ratio),
    ("WP pause 256MiB", 5, "test_every_strategy_*[[]256MiB]", "pause_ns.wp-copy-before-write", fmt_ns),
    ("stop&copy/WP pause 256MiB", 5, "test_every_strategy_*[[]256MiB]", "wp_pause_shorter_than_stop_and_copy_x",
     lambda v: f"{v:.1f}x"),
    ("pre-copy bytes 256MiB", 5, "test_every_strategy_*[[]256MiB]", "bytes_ratio.precopy-wp-async", _ratio),
]


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def show(rec: dict[str, Any], verbose: bool = True, only: int | None = None, width: int | None = None) -> str:
    """The record's reports as the run printed them, ``width`` columns wide (default: this terminal's, 120 when
    the output is not a terminal)."""
    width = terminal_width() if width is None else width
    run, host = rec.get("run", {}), rec.get("host", {})
    heads = [f"snapproof run {run.get('started', '?')} ({run.get('duration_s', '?')} s, commit "
             f"{run.get('git_commit') or '?'}, inject {run.get('inject', 'none')}"
             f"{', --strict-host' if run.get('strict_host') else ''})",
             f"host {host_label(rec)}: {host.get('cpu_model', '?')}, {host.get('cpus', '?')} CPUs, "
             f"{int(host.get('memory_bytes', 0)) / (1 << 30):.1f} GiB memory, "
             f"uffd features {host.get('uffd_features', '?')}",
             *([f"NOT A WHOLE RUN: {why}"] if (why := incompleteness(rec)) else [])]
    lines = [line for head in heads for line in wrap(head, width)] + [""]
    for p in rec["phases"]:
        if only is None or p["phase"] == only:
            lines += [render_phase(p, verbose=verbose, width=width), ""]
    if rec.get("benchmarks"):
        lines += wrap(f"{len(rec['benchmarks'])} pytest-benchmark results in the record "
                      "(snapproof results gate compares them with a baseline)", width)
    return "\n".join(lines).rstrip()


def key_figure(rec: dict[str, Any], number: int, case: str, name: str) -> Any:
    """A key figure's value in a record: the case figure's median, else the fact; None when neither."""
    got = figure_median(rec, number, case, name)
    if got is not None:
        return got
    facts = fact_values(rec, number, case, name)
    return facts[0][1] if facts else None


def matrix_data(records: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """What the matrix shows, one entry a record: for ``--json``."""
    return [{"record": path, "host": host_label(rec), "hostname": rec["host"].get("hostname"),
             "status": rec["run"]["status"],
             "phases": {str(p["phase"]): {"title": p["title"], "outcome": p["outcome"], "duration_ns": p["duration_ns"]}
                        for p in rec["phases"]},
             "key_figures": {col: key_figure(rec, ph, case, name) for col, ph, case, name, _ in KEY_FIGURES}}
            for path, rec in records]


def matrix(records: list[tuple[str, dict[str, Any]]]) -> str:
    phases: dict[int, str] = {}
    for _, rec in records:
        for p in rec["phases"]:
            phases.setdefault(p["phase"], p["title"])
    numbers = sorted(phases)
    labels = []
    for path, rec in records:
        label = host_label(rec)
        labels.append(label if sum(host_label(r) == label for _, r in records) == 1
                      else f"{label} @ {rec['run'].get('started', path)}")
    header = ["host", *[f"{n} {phases[n]}" for n in numbers]]
    rows = []
    for label, (_, rec) in zip(labels, records, strict=True):
        by = {p["phase"]: p for p in rec["phases"]}
        rows.append([label, *[f"{by[n]['outcome']} {fmt_ns(by[n]['duration_ns'])}" if n in by else "NOT RUN"
                              for n in numbers]])
    out = [_table(header, rows)]
    cols = [(k, ph, case, name, fmt) for k, ph, case, name, fmt in KEY_FIGURES
            if any(key_figure(rec, ph, case, name) is not None for _, rec in records)]
    if cols:
        frows = []
        for label, (_, rec) in zip(labels, records, strict=True):
            cells = []
            for _, ph, case, name, fmt in cols:
                got = key_figure(rec, ph, case, name)
                cells.append(fmt(got) if got is not None else "-")
            frows.append([label, *cells])
        out += ["", "key figures (ratios are to the host's own limits measured in the same run)",
                _table(["host", *[c[0] for c in cols]], frows)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="snapproof results", description="Tools over snapproof run records.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("show", help="print the PASS reports of a run record again")
    s.add_argument("record")
    s.add_argument("--short", action="store_true", help="stages of failed cases only")
    s.add_argument("--phase", type=int, help="only this phase")
    m = sub.add_parser("matrix", help="host x phase table of many run records (a fleet)")
    m.add_argument("records", nargs="+")
    m.add_argument("--json", action="store_true", help="print the matrix as JSON")
    g = sub.add_parser("gate", help="judge a run against a baseline under a policy; exit 1 when it fails")
    g.add_argument("record", help="the run record: the path the run printed (or the 'latest' beside it)")
    g.add_argument("--baseline", help="the baseline run record (YAML), of the run's host class; "
                                      "not needed for an uncalibrated class (no figures of its own)")
    g.add_argument("--policy", default=str(DEFAULT_POLICY),
                   help="the gate policy (YAML, schema snapproof-gate/2; default: the one snapproof ships, "
                        "results/gate.yaml)")
    g.add_argument("--host-class", help="apply this class of the policy instead of matching on host facts")
    g.add_argument("--json", action="store_true", help="print the verdict and every check as JSON")
    g.add_argument("--junit-xml", metavar="PATH", help="also write each check as a JUnit test case to PATH")
    from snapproof.results.ab import add_ab_arguments, add_teeth_arguments

    add_ab_arguments(sub.add_parser("ab", help="run the timed phases for A and B interleaved on this host, "
                                               "judge B against A; exit 1 on a regression"))
    add_teeth_arguments(sub.add_parser("teeth", help="measure the gate's false failures and catches on this "
                                                     "host (clean reruns, each performance switch)"))
    p = sub.add_parser("plots", help="write the PNG plots of a run record, a baseline's values beside its own")
    p.add_argument("record")
    p.add_argument("--baseline", help="a baseline run record of the same host class, drawn beside the run "
                                      "(e.g. results/baselines/kvm_pvm.yaml)")
    p.add_argument("--out", default="results/plots", help="folder for the PNGs (default results/plots)")
    args = ap.parse_args(argv)

    from snapproof.results.ab import ABError
    from snapproof.results.gate import PolicyError

    try:
        if args.cmd == "show":
            print(show(load_record(args.record), verbose=not args.short, only=args.phase))
        elif args.cmd == "matrix":
            records = [(path, load_record(path)) for path in args.records]
            if args.json:
                import json

                print(json.dumps(matrix_data(records), indent=2))
            else:
                print(matrix(records))
        elif args.cmd == "gate":
            from snapproof.results.gate import gate

            result = gate(args.record, args.baseline, args.policy, args.host_class)
            if args.junit_xml:
                result.write_junit(args.junit_xml)
            print(result.json() if args.json else result.text())
            return result.status
        elif args.cmd in ("ab", "teeth"):
            from snapproof.results.ab import ab_main, teeth_main

            return ab_main(args) if args.cmd == "ab" else teeth_main(args)
        elif args.cmd == "plots":
            from snapproof.results.plots import write_plots

            base = load_record(args.baseline) if args.baseline else None
            for name, got in write_plots(load_record(args.record), args.out, base, run_name=args.record,
                                         baseline_name=args.baseline):
                print(f"{name}: {got}" if isinstance(got, str) else f"{name}: wrote {got}")
    except (RecordError, PolicyError, ABError) as e:
        print(f"snapproof results {args.cmd}: {e}", file=sys.stderr)
        return 2
    return 0
