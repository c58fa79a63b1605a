"""Merge sweeps of ``tandem bench disagg`` into one results file: ``tandem bench disagg-merge``.

    python -m tools.bench.disagg_merge OUT.json A.json:disaggregated B.json C.json:colocated ...

Each input is a results file, optionally with ``:layout[,layout]`` to take only those layouts
from it. For every (workload, layout) the inputs hold, their runs are put together into one
entry, ordered by rate; where two inputs ran the same rate, the later input's run is the one
kept (the earlier is named under ``merged_from``, never silently lost). Entries merge only when
they ran the same thing: settings equal but for the rates, the same layout of workers, and the
same GPU model. Since a rate draws its requests from ``--seed`` and the rate alone
(``serve_bench.rate_seed``), runs of the same rate from different cluster starts sent the same
requests; inputs from before that (settings without ``rate_seeds``) merge only with each other.

The output then gets, per workload, the goodput of each merged layout, the colocated comparison
and the SLO sensitivity for every limit the inputs had recomputed, as ``tandem bench disagg``
writes them, and its table is printed. A merged entry keeps where each run came from
(``merged_from``: file, rates, git commit, time and KV tokens of each cluster start).

``--best-of LAYOUT[,LAYOUT]``: that layout's inputs may also differ in how it runs (the
settings of ``disagg_report.LAYOUT_SHAPE``: token budgets, batch limits, MPS shares, ...), not
in what it serves. Each way it ran becomes a variant (an input's own variants too), and at each SLO limit the layout counts
with its best variant, named in the output: a colocated baseline given its best chunk size at
every TPOT limit. The variant with the best headline goodput is the layout's entry (table,
plots, headline ratio); the others are kept under the workload's ``variants``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tools.bench.disagg_report import (LAYOUT_SHAPE, LAYOUTS, OtherLimits, best_first, comparable, format_table,
                                       merge_entry, primary_slo, read_report, write_plot, write_report)
from tools.bench.slo import goodput


class MergeError(ValueError):
    """Inputs that cannot be merged: layouts not there, or runs of different things."""


def parse_input(spec: str) -> tuple[Path, tuple[str, ...] | None]:
    """``FILE`` or ``FILE:layout,layout`` -> (path, the layouts wanted, or None for all)."""
    path, sep, names = spec.rpartition(":")
    if not sep or "/" in names or not names or Path(spec).is_file():
        return Path(spec), None
    wanted = tuple(n for n in names.split(",") if n)
    if unknown := [n for n in wanted if n not in LAYOUTS]:
        raise MergeError(f"{spec}: unknown layout(s) {', '.join(unknown)} (known: {', '.join(LAYOUTS)})")
    return Path(path), wanted


def _settings(entry: dict) -> dict:
    return {k: v for k, v in entry["settings"].items() if k != "rates"}


def _differ(a: dict, b: dict) -> list[str]:
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def merge_entries(parts: list[tuple[str, dict]]) -> dict:
    """One layout's entries, in input order (name, entry), as one entry whose runs are sorted
    by rate, a later part's run replacing an earlier one of the same rate."""
    first_name, first = parts[0]
    base = _settings(first)
    runs: dict[float, tuple[int, dict]] = {}  # rate -> (the part it came from, the run)
    for i, (name, entry) in enumerate(parts):
        if differ := _differ(base, _settings(entry)):
            hint = (" (to compare them as variants of the layout, each at its best, pass --best-of "
                    f"{entry['layout'].get('name', 'LAYOUT')})" if set(differ) <= set(LAYOUT_SHAPE) else "")
            raise MergeError(f"{name} ran other settings than {first_name}: {', '.join(differ)}{hint}")
        if entry["layout"] != first["layout"]:
            raise MergeError(f"{name} ran another layout of workers than {first_name}")
        for run in entry["runs"]:
            runs[run["rate"]] = (i, run)
    ordered = [runs[rate][1] for rate in sorted(runs)]
    merged = {**first, "settings": {**first["settings"], "rates": [run["rate"] for run in ordered]},
              "goodput_rate": goodput([(run["rate"], run["summary"]["slo_attainment"]) for run in ordered]),
              "runs": ordered}
    if len(parts) == 1:
        return merged
    merged_from = [{"file": name, "rates": [run["rate"] for run in entry["runs"]],
                    "kept": [run["rate"] for run in entry["runs"] if runs[run["rate"]][0] == i],
                    "git_commit": entry.get("environment", {}).get("git_commit"),
                    "started_at": entry.get("started_at"), "finished_at": entry.get("finished_at"),
                    "kv_tokens": entry.get("kv_tokens")} for i, (name, entry) in enumerate(parts)]
    return {**merged, "started_at": min(e["started_at"] for _, e in parts),
            "finished_at": max(e["finished_at"] for _, e in parts), "merged_from": merged_from}


def merge_variants(parts: list[tuple[str, dict]]) -> list[dict]:
    """One layout's entries (name, entry) that may differ in how it runs: those that ran alike
    merged as by merge_entries, one entry per way it ran, the best headline goodput first (the
    first of equals). Entries that served other requests, or on other GPU counts, are refused."""
    groups: dict[str, list[tuple[str, dict]]] = {}
    for name, entry in parts:
        key = json.dumps([_settings(entry), entry["layout"]], sort_keys=True)
        groups.setdefault(key, []).append((name, entry))
    merged = [merge_entries(group) for group in groups.values()]
    first_name = parts[0][0]
    for (name, _), entry in zip((group[0] for group in groups.values()), merged):
        if not comparable(entry, merged[0]):
            differ = [k for k in _differ(_settings(merged[0]), _settings(entry)) if k not in LAYOUT_SHAPE]
            raise MergeError(f"{name} served other requests than {first_name} ({', '.join(differ) or 'GPU count'}): "
                             "variants of a layout differ only in how it runs")
    return best_first(merged)


def other_limits(slots: list[tuple[str, dict]]) -> dict[str, OtherLimits]:
    """Per workload, the limits the inputs' SLO sensitivity blocks were recomputed for."""
    tpot: dict[str, set[float]] = {}
    ttft: dict[str, set[float]] = {}
    for workload, slot in slots:
        primary = primary_slo(slot)
        for item in slot.get("slo_sensitivity", []):
            if item["ttft_ms"] == primary.ttft_ms:
                tpot.setdefault(workload, set()).add(item["tpot_ms"])
            else:
                ttft.setdefault(workload, set()).add(item["ttft_ms"])
    return {w: OtherLimits(tuple(sorted(tpot.get(w, ()), reverse=True)),
                           tuple(sorted(ttft.get(w, ()), reverse=True))) for w in tpot.keys() | ttft.keys()}


def merge(inputs: list[tuple[Path, tuple[str, ...] | None]], best_of: tuple[str, ...] = ()) -> dict:
    reports = [(path, read_report(path)) for path, _ in inputs]
    machine = reports[0][1]["machine"]
    for path, report in reports[1:]:
        if report["machine"].get("device_name") != machine.get("device_name"):
            raise MergeError(f"{path} ran on {report['machine'].get('device_name')}, "
                             f"{reports[0][0]} on {machine.get('device_name')}")
    parts: dict[tuple[str, str], list[tuple[str, dict]]] = {}
    for (path, wanted), (_, report) in zip(inputs, reports):
        taken = 0
        for workload, slot in report["workloads"].items():
            for layout, entry in slot["layouts"].items():
                if wanted is None or layout in wanted:
                    # an input's own variants (an earlier --best-of, or --colocated-* runs) come along
                    for each in (entry, *slot.get("variants", {}).get(layout, [])):
                        parts.setdefault((workload, layout), []).append((path.name, each))
                    taken += 1
        if not taken:
            raise MergeError(f"{path}: holds none of the layouts asked for ({', '.join(wanted or ())})")
    limits = other_limits([(w, slot) for _, report in reports for w, slot in report["workloads"].items()])
    out = {"benchmark": "disagg", "preset": reports[0][1].get("preset"),
           "attainment_threshold": reports[0][1].get("attainment_threshold"), "machine": machine, "workloads": {}}
    for (workload, layout), entries in sorted(parts.items(), key=lambda kv: (kv[0][0], LAYOUTS.index(kv[0][1]))):
        if layout in best_of:
            best, *variants = merge_variants(entries)
        else:
            best, variants = merge_entries(entries), []
        merge_entry(out, workload, layout, best, limits.get(workload, OtherLimits()), variants)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem bench disagg-merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="the merged results file (written; must not be an input)")
    parser.add_argument("inputs", nargs="+", help="results files, each FILE or FILE:layout[,layout]")
    parser.add_argument("--best-of", default="", metavar="LAYOUT[,LAYOUT]",
                        help="layouts whose inputs may differ in how they run (token budgets, batch limits, MPS "
                             "shares): at each SLO limit the best of them counts")
    parser.add_argument("--no-plots", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        inputs = [parse_input(spec) for spec in args.inputs]
        best_of = tuple(n for n in args.best_of.split(",") if n)
        if unknown := [n for n in best_of if n not in LAYOUTS]:
            raise MergeError(f"--best-of: unknown layout(s) {', '.join(unknown)} (known: {', '.join(LAYOUTS)})")
        if any(path.resolve() == args.output.resolve() for path, _ in inputs):
            raise MergeError(f"{args.output} is also an input: write the merge to another file")
        report = merge(inputs, best_of)
    except ValueError as e:  # MergeError, or an input read_report refused
        print(f"tandem bench disagg-merge: {e}", file=sys.stderr)
        return 2
    write_report(args.output, report)
    print(format_table(report, list(report["workloads"])))
    if not args.no_plots:
        for workload in report["workloads"]:
            write_plot(report, workload, args.output.with_name(f"{args.output.stem}_{workload}_attainment.png"))
    print(f"written: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
