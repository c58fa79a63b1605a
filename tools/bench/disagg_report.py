"""Results of ``tandem bench disagg``: merging runs into the result JSON, comparing each
disaggregated layout with the colocated one, SLO sensitivity (goodput recomputed from the stored requests for other limits),
the table and the attainment plots. The benchmark itself (layouts, clusters, sweeps,
the command line) is in disagg_bench.py.
"""

from __future__ import annotations

import datetime
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tools.bench.disagg_work import work_lines
from tools.bench.machine import device_name, environment, slug
from tools.bench.slo import (GOODPUT_ATTAINMENT, SLO, RequestRecord, attainment, goodput, later_tpot_ms,
                            peak_in_flight, percentile)

if TYPE_CHECKING:
    from tools.bench.disagg_presets import Preset

LAYOUTS = ("colocated", "disaggregated", "disaggregated-slo")
BASELINE = "colocated"
"""Every other layout's goodput is given as a ratio to this one's."""


def log(message: str) -> None:
    print(f"[disagg_bench] {message}", file=sys.stderr, flush=True)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class OtherLimits:
    """SLO limits besides each workload's own, for which goodput is recomputed from the
    stored request records; each one replaces one limit of the workload's SLO."""

    tpot_ms: tuple[float, ...] = ()
    """TPOT limits, each with the workload's TTFT limit."""
    ttft_ms: tuple[float, ...] = ()
    """TTFT limits, each with the workload's TPOT limit."""

    def slos(self, primary: SLO) -> list[SLO]:
        return [SLO(primary.ttft_ms, t) for t in self.tpot_ms] + [SLO(t, primary.tpot_ms) for t in self.ttft_ms]



# -- results -------------------------------------------------------------------------------


def merge_entry(report: dict, workload: str, layout: str, entry: dict, other: OtherLimits = OtherLimits(),
                variants: Sequence[dict] = ()) -> dict:
    """Put one (workload, layout) result into the report, replacing an older one (and its
    ``variants``: other ways the layout ran, see slo_sensitivity), and recompute that workload's
    comparison and SLO sensitivity (for ``other``'s limits)."""
    slot = report["workloads"].setdefault(workload, {"layouts": {}, "comparison": None})
    slot["layouts"][layout] = entry
    slot.setdefault("variants", {}).pop(layout, None)
    if variants:
        slot["variants"][layout] = list(variants)
    if not slot["variants"]:
        del slot["variants"]
    slot["comparison"] = compare(slot["layouts"])
    slot.pop("slo_sensitivity", None)  # computed from the layouts replaced just now
    if block := slo_sensitivity(slot["layouts"], sensitivity_slos(slot, other), slot.get("variants")):
        slot["slo_sensitivity"] = block
    report["updated_at"] = _now()
    return report


LAYOUT_SHAPE = ("workers", "mps_sm_percent", "mps_priority", "decode_step_period_ms", "router_tpot_slo",
                "max_num_seqs", "decode_max_num_seqs", "max_batched_tokens", "prefill_max_batched_tokens",
                "step_target_ms")
"""Settings that say how a layout runs on its GPUs, not what it serves: two layouts that differ
only in these still compare (one mixed worker against a prefill and a decode process on one GPU,
a layout run under MPS against one run without, a decode worker batching more sequences than a
mixed one, whose steps also compute prompts, a mixed worker whose prompt chunks were sized for a
tight TPOT limit or cut to a step time target)."""
SWEEP = ("rates",)
"""The rates swept: each layout's goodput is the highest of its own rates that met the SLO, and
a given rate and seed send the same requests in any sweep (``serve_bench.rate_seed``; entries
stored before that, drawn by the rate's place in the sweep, lack ``rate_seeds`` and compare only
among themselves), so two sweeps over different rates compare too
(the report notes a goodput that is only a bound: met at the highest rate, or at none)."""


def best_first(entries: list[dict]) -> list[dict]:
    """Variants of one layout, the best headline goodput first (the first of equals)."""
    return sorted(entries, key=lambda e: -1.0 if e["goodput_rate"] is None else -e["goodput_rate"])


def comparable(entry: dict, baseline: dict) -> bool:
    """Whether ``entry``'s goodput may be divided by ``baseline``'s: the same requests (model,
    workload, seed, SLO, duration, engine settings) on as many GPUs."""
    def load(e: dict) -> dict:
        return {k: v for k, v in e["settings"].items() if k not in LAYOUT_SHAPE + SWEEP}

    def gpus(e: dict) -> int:
        return len({w["device"] for w in e["layout"]["workers"].values()})

    return load(entry) == load(baseline) and gpus(entry) == gpus(baseline)


def compare(layouts: dict[str, dict]) -> dict | None:
    """Each other layout's goodput / colocated goodput, where both ran with the same settings.
    ``ratio`` (and ``disaggregated_goodput``) is the plain disaggregated layout's, the headline;
    ``ratios`` has every layout's. None until colocated and another layout ran."""
    others = _others(layouts)
    if BASELINE not in layouts or not others:
        return None
    co = layouts[BASELINE]
    same = {name: comparable(layouts[name], co) for name in others}
    good = {name: layouts[name]["goodput_rate"] for name in (BASELINE, *others)}
    ratios = {name: _goodput_ratio(good[BASELINE], good[name], same[name]) for name in others}
    notes = [f"{name} and colocated ran with different settings or on other GPU counts: run one again to compare"
             for name in others if not same[name]]
    for name in (BASELINE, *others):
        top = max(run["rate"] for run in layouts[name]["runs"])
        if good[name] is None:
            notes.append(f"{name} met the SLO at no swept rate (sweep lower rates)")
        elif good[name] == top:
            notes.append(f"{name} met the SLO at its highest rate: its goodput is at least {top:g}/s")
        notes += _batch_limit_notes(name, layouts[name])
    return {"colocated_goodput": good[BASELINE], "disaggregated_goodput": good.get("disaggregated"),
            "ratio": ratios.get("disaggregated"), "goodput": good, "ratios": ratios,
            "same_settings": all(same.values()), "notes": notes}


def _others(layouts: dict) -> list[str]:
    """The layouts compared with the baseline, in LAYOUTS order."""
    return [name for name in LAYOUTS if name != BASELINE and name in layouts]


def _goodput_ratio(good_co: float | None, good_dis: float | None, same_settings: bool) -> float | None:
    return good_dis / good_co if same_settings and good_co and good_dis is not None else None


FULL_BATCH_NOTE = 0.05
"""Share of a worker's steps run with its batch full while requests waited, at the first rate
a layout missed, from which the comparison notes that the batch limit may have decided it."""


def _batch_limit_notes(name: str, entry: dict) -> list[str]:
    """A note where, at the lowest rate above the layout's goodput (the one it missed first), a
    worker ran its batch full with requests waiting in >= FULL_BATCH_NOTE of its steps: the
    batch limit, not the device, may have set the goodput (runs stored before the counter: none)."""
    good = entry["goodput_rate"]
    missed = [run for run in entry["runs"] if good is None or run["rate"] > good]
    if not missed:
        return []
    run = min(missed, key=lambda r: r["rate"])
    full = {w: f["full_batch"] for w, f in run.get("workers", {}).items()
            if (f.get("full_batch") or 0) >= FULL_BATCH_NOTE}
    if not full:
        return []
    shown = [f"{w} in {share:.0%} of its steps" for w, share in sorted(full.items())]
    shown += [f"{k} {entry['settings'][k]}" for k in ("max_num_seqs", "decode_max_num_seqs")
              if entry["settings"].get(k) is not None]
    return [f"{name} at {run['rate']:g}/s, the first rate it missed: a batch was full while requests waited "
            f"({', '.join(shown)}); a higher batch limit may raise its goodput"]


def primary_slo(slot: dict) -> SLO:
    """The SLO a workload's layouts ran with (the first layout's, should they differ)."""
    entry = next(slot["layouts"][name] for name in LAYOUTS if name in slot["layouts"])
    return SLO(**entry["settings"]["slo"])


def slo_sensitivity(layouts: dict[str, dict], slos: Sequence[SLO],
                    variants: dict[str, list[dict]] | None = None) -> list[dict]:
    """Attainment per rate, goodput per layout and the ratios to colocated for each of ``slos``,
    recomputed from the stored request records: the same requests as the headline, on its rate
    grid. A layout whose runs lack their records is listed under ``no_records`` with goodput None.
    A layout with ``variants`` counts at each limit with its best variant, named under ``chosen``."""
    names = [name for name in LAYOUTS if name in layouts]
    groups = {name: [layouts[name], *(variants or {}).get(name, ())] for name in names}
    same = {name: BASELINE in layouts and comparable(layouts[name], layouts[BASELINE]) for name in _others(layouts)}
    block = []
    for slo in slos:
        best = {name: _best_variant(group, slo) for name, group in groups.items()}
        points = {name: pts for name, (_, pts) in best.items()}
        good = {name: None if pts is None else goodput(pts) for name, pts in points.items()}
        ratios = {name: _goodput_ratio(good.get(BASELINE), good[name], same[name]) for name in same}
        item = {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms, "goodput": good, "ratio": ratios.get("disaggregated"),
                "ratios": ratios, "attainment": points}
        if chosen := {name: shape_label(entry, groups[name]) for name, (entry, _) in best.items()
                      if len(groups[name]) > 1}:
            item["chosen"] = chosen
        if missing := [name for name, pts in points.items() if pts is None]:
            item["no_records"] = missing
        block.append(item)
    return block


def _best_variant(group: list[dict], slo: SLO) -> tuple[dict, list[list[float | None]] | None]:
    """(entry, attainment points) of the variant with the highest goodput under ``slo``, the first
    of equals (the headline entry comes first); the headline's when it has no records."""
    scored = [(entry, _attainment_points(entry, slo)) for entry in group]
    if scored[0][1] is None:
        return scored[0]
    usable = [(entry, pts) for entry, pts in scored if pts is not None]
    return max(usable, key=lambda ep: -1.0 if (g := goodput(ep[1])) is None else g)


def shape_label(entry: dict, group: Sequence[dict]) -> str:
    """The settings of how it runs (LAYOUT_SHAPE) in which the variants of ``group`` differ, with
    ``entry``'s values: ``max_batched_tokens=512``."""
    def value(e: dict, key: str) -> str:
        v = e["settings"].get(key)
        if isinstance(v, list):
            return ",".join(map(str, v))
        return "none" if v is None else f"{v:g}" if isinstance(v, float) else str(v)

    keys = [k for k in LAYOUT_SHAPE if len({value(e, k) for e in group}) > 1]
    return ", ".join(f"{k}={value(entry, k)}" for k in keys)


def _attainment_points(entry: dict, slo: SLO) -> list[list[float | None]] | None:
    """[[rate, attainment], ...] of one layout's runs; None unless every run kept all its records."""
    points = []
    for run in entry["runs"]:
        records = run.get("requests")
        if records is None or len(records) != run["summary"]["requests"]:
            return None
        points.append([run["rate"], attainment([_request_record(r) for r in records], slo)])
    return points


def _request_record(stored: dict) -> RequestRecord:
    return RequestRecord(**{f.name: stored[f.name] for f in fields(RequestRecord) if f.name in stored})


def sensitivity_slos(slot: dict, other: OtherLimits) -> list[SLO]:
    """``other``'s limits and those already in the slot's block, loosest first, without the
    workload's own SLO."""
    primary = primary_slo(slot)
    stored = [SLO(item["ttft_ms"], item["tpot_ms"]) for item in slot.get("slo_sensitivity", [])]
    wanted = {slo for slo in other.slos(primary) + stored if slo != primary}

    def looseness(slo: SLO) -> tuple[float, float]:
        return (-(slo.ttft_ms if slo.ttft_ms is not None else math.inf),
                -(slo.tpot_ms if slo.tpot_ms is not None else math.inf))

    return sorted(wanted, key=looseness)


def results_path(results_dir: Path, preset: Preset, workers: int = 2, gpus: int | None = None) -> Path:
    """``disagg_<preset>_<device>.json``, with ``-x<workers>`` unless the run had the default
    two workers, and ``_<gpus>gpu`` when its workers share fewer GPUs than there are workers
    (two processes on one GPU): runs on other GPU counts are not merged with these."""
    device = torch.device("cuda" if preset.workers.device == "cuda" else "cpu")
    suffix = "" if workers == 2 else f"-x{workers}"
    if device.type == "cuda" and gpus is not None and 0 < gpus < workers:
        suffix += f"_{gpus}gpu"
    return results_dir / f"disagg_{preset.name}_{slug(device_name(device))}{suffix}.json"


def load_report(path: Path, preset: Preset) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {"benchmark": "disagg", "preset": preset.name, "attainment_threshold": GOODPUT_ATTAINMENT,
            "machine": environment(torch.device("cuda" if preset.workers.device == "cuda" else "cpu")),
            "workloads": {}}


def write_report(path: Path, report: dict) -> None:
    """Indented JSON with one line per request record (a sweep holds thousands of them)."""
    compact: list[str] = []

    def placeholder(value: object) -> str:
        compact.append(json.dumps(value, separators=(",", ":")))
        return f"@record{len(compact) - 1}@"

    def compact_run(run: dict) -> dict:
        return {**run, "requests": [placeholder(r) for r in run["requests"]]} if "requests" in run else run

    def compact_entry(entry: dict) -> dict:
        return {**entry, "runs": [compact_run(run) for run in entry["runs"]]}

    def compact_slot(slot: dict) -> dict:
        compacted = {**slot, "layouts": {name: compact_entry(e) for name, e in slot["layouts"].items()}}
        if "variants" in slot:
            compacted["variants"] = {name: [compact_entry(e) for e in group] for name, group in slot["variants"].items()}
        if "slo_sensitivity" in slot:
            compacted["slo_sensitivity"] = [
                {**item, "attainment": {name: placeholder(pts) for name, pts in item["attainment"].items()}}
                for item in slot["slo_sensitivity"]]
        return compacted

    workloads = {w: compact_slot(slot) for w, slot in report["workloads"].items()}
    text = json.dumps({**report, "workloads": workloads}, indent=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(re.sub(r'"@record(\d+)@"', lambda m: compact[int(m.group(1))], text) + "\n")


def format_table(report: dict, workloads: list[str]) -> str:
    lines = []
    for workload in workloads:
        slot = report["workloads"][workload]
        entries = [slot["layouts"][name] for name in LAYOUTS if name in slot["layouts"]]
        s = entries[0]["settings"]
        lines.append(f"{workload}: TTFT <= {s['slo']['ttft_ms']:g} ms, TPOT <= {s['slo']['tpot_ms']:g} ms; "
                     f"{s['duration_s']:g} s per rate, seed {s['seed']}, {s['device']} {s['dtype']}")
        rows = [("layout", "workers", "goodput req/s", "ok/sent", "attainment at rate (req/s)")]
        rows += [_table_row(e) for e in entries]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines += _variant_lines(slot)
        lines += _cut_lines(entries, s["slo"])
        lines += _per_rate_lines(entries)
        lines += work_lines(entries)
        lines += _comparison_lines(slot["comparison"])
        lines += _sensitivity_lines(slot)
        lines.append("")
    lines.append(f"goodput: the highest swept rate with >= {GOODPUT_ATTAINMENT:.0%} of requests meeting both SLOs "
                 "(failures count as misses)")
    return "\n".join(lines)


def _table_row(entry: dict) -> tuple[str, ...]:
    runs = entry["runs"]
    workers = ", ".join(f"{name} {w['device']}" for name, w in entry["layout"]["workers"].items())
    return (entry["layout"]["name"], workers, "none" if entry["goodput_rate"] is None else f"{entry['goodput_rate']:g}",
            f"{sum(r['summary']['ok'] for r in runs)}/{sum(r['summary']['requests'] for r in runs)}",
            "  ".join(f"{r['rate']:g}: {_pct(r['summary']['slo_attainment'])}" for r in runs))


def _variant_lines(slot: dict) -> list[str]:
    """For a layout merged with other ways it ran: each of them, with its headline goodput."""
    lines = []
    for name in LAYOUTS:
        if not (rest := slot.get("variants", {}).get(name)):
            continue
        group = [slot["layouts"][name], *rest]
        shown = [f"{shape_label(e, group)} ({_good(e['goodput_rate'])}{', in the table' if i == 0 else ''})"
                 for i, e in enumerate(group)]
        lines.append(f"  {name}: the best at each SLO limit of {len(group)} runs, goodput at the headline SLO: "
                     + "; ".join(shown))
    return lines


def _cut_lines(entries: list[dict], slo: dict) -> list[str]:
    """Requests still running at the drain deadline, per layout, and how many of them met both
    limits up to then (TTFT, and TPOT over the tokens they had streamed): a miss only because the
    run stopped waiting. Nothing when no layout had any."""
    parts = []
    for entry in entries:
        cut = [r for run in entry["runs"] for r in run.get("requests", ())
               if not r["ok"] and (r.get("error") or "").startswith("timeout")]
        within = sum(1 for r in cut if r["ttft_ms"] is not None and r["ttft_ms"] <= slo["ttft_ms"]
                     and (r["tpot_ms"] is None or r["tpot_ms"] <= slo["tpot_ms"]))
        if cut:
            parts.append(f"{entry['layout']['name']} {len(cut)} ({within} within both limits so far)")
    return ["  still running at the drain deadline, counted as misses: " + ", ".join(parts)] if parts else []


def _per_rate_lines(entries: list[dict]) -> list[str]:
    """Per layout and rate, from the stored records: the p50 of TPOT after the first gap
    (``slo.later_tpot_ms``: the decode pace under that load, apart from the handoff and the wait
    to join the decode batch), and the most requests in flight at once (the batch the layout had
    to hold, which a batch limit below it makes wait)."""
    pace, flight = [], []
    for entry in entries:
        name = entry["layout"]["name"]
        records = {run["rate"]: [_request_record(r) for r in run.get("requests", ())] for run in entry["runs"]}
        p50s = {rate: percentile([t for t in map(later_tpot_ms, rs) if t is not None], 50)
                for rate, rs in records.items()}
        if shown := [f"{rate:g}: {p50:.1f}" for rate, p50 in p50s.items() if p50 is not None]:
            pace.append(f"{name} " + ", ".join(shown))
        if shown := [f"{rate:g}: {peak_in_flight(rs)}" for rate, rs in records.items() if rs]:
            flight.append(f"{name} " + ", ".join(shown))
    return ((["  TPOT after the first gap, p50 ms at rate: " + "; ".join(pace)] if pace else [])
            + (["  requests in flight at most, at rate: " + "; ".join(flight)] if flight else []))


def _comparison_lines(comparison: dict | None) -> list[str]:
    if comparison is None:
        return ["  disaggregated / colocated goodput: - (run colocated and another layout)"]
    ratios = comparison.get("ratios", {"disaggregated": comparison["ratio"]})  # results from before "ratios"
    lines = [f"  {name} / colocated goodput: " + ("-" if ratio is None else f"{ratio:.2f}")
             for name, ratio in ratios.items()]
    return lines + [f"  note: {note}" for note in comparison["notes"]]


def _sensitivity_lines(slot: dict) -> list[str]:
    """One line per other SLO: every layout's goodput (>= where a layout met it at its top rate)."""
    block = slot.get("slo_sensitivity")
    if not block:
        return []
    primary = primary_slo(slot)
    headline_tops = {name: max(run["rate"] for run in e["runs"]) for name, e in slot["layouts"].items()}
    lines = ["  other SLO limits, recomputed from the same requests and rates (the SLO above stays the headline):"]
    for item in block:
        limits = [f"{name} <= {value:g} ms" for name, value, own in (("TTFT", item["ttft_ms"], primary.ttft_ms),
                                                                      ("TPOT", item["tpot_ms"], primary.tpot_ms))
                  if value != own]
        # the top rate of the run each goodput came from (a variant's own sweep, where one was chosen)
        tops = {**headline_tops, **{name: max(rate for rate, _ in pts) for name, pts in item["attainment"].items()
                                    if pts}}
        chosen = item.get("chosen", {})
        goods = [f"{name} no per-request records" if name in item.get("no_records", ())
                 else f"{name} {_goodput_text(good, tops[name])}" + (f" [{chosen[name]}]" if name in chosen else "")
                 for name, good in item["goodput"].items()]
        ratio = _ratio_text(item, tops)
        lines.append(f"    {', '.join(limits)}: {', '.join(goods)} req/s" + (f" ({ratio})" if ratio else ""))
    return lines


def _good(good: float | None) -> str:
    return "none" if good is None else f"{good:g}"


def _goodput_text(good: float | None, top: float) -> str:
    return f">={good:g}" if good is not None and good == top else _good(good)


def _ratio_text(item: dict, tops: dict[str, float]) -> str:
    """The ratios to colocated, each marked as a bound where a layout met the SLO at its highest rate."""
    ratios = item.get("ratios", {"disaggregated": item["ratio"]})
    texts = [_one_ratio_text(item, name, ratio, tops) for name, ratio in ratios.items()]
    if not texts:  # one layout alone: nothing to compare
        return ""
    if len(texts) == 1:
        return texts[0]
    # a missing ratio's text names the layouts that met the limit nowhere itself (once: all may name colocated)
    return "; ".join(dict.fromkeys(text if ratio is None and text != "-" else f"{name} {text}"
                                   for (name, ratio), text in zip(ratios.items(), texts)))


def _one_ratio_text(item: dict, name: str, ratio: float | None, tops: dict[str, float]) -> str:
    if ratio is None:
        none = [n for n in (BASELINE, name) if n in item["goodput"] and item["goodput"][n] is None
                and n not in item.get("no_records", ())]
        return f"{' and '.join(none)} met it at no swept rate" if none else "-"
    co_top, dis_top = (item["goodput"][n] == tops[n] for n in (BASELINE, name))
    if co_top and dis_top:
        return "- (both met it at their highest rate)"
    return f"{'>=' if dis_top else '<=' if co_top else ''}{ratio:.2f}x"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def write_plot(report: dict, workload: str, path: Path) -> Path | None:
    """Attainment (both SLOs; TTFT and TPOT alone, thin) vs. rate, one colour per layout."""
    try:
        import matplotlib
    except ImportError:
        log("matplotlib is not installed; no plots (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.4))
    slot = report["workloads"][workload]
    rates: set[float] = set()
    for name, color in zip(LAYOUTS, ("tab:blue", "tab:orange", "tab:green")):
        entry = slot["layouts"].get(name)
        if entry is None:
            continue
        x = [run["rate"] for run in entry["runs"]]
        rates.update(x)
        for key, style, width, label in (("slo_attainment", "o-", 2, "both SLOs"), ("ttft_attainment", "s:", 1,
                                         "TTFT only"), ("tpot_attainment", "^--", 1, "TPOT only")):
            y = [run["summary"][key] if run["summary"][key] is not None else float("nan") for run in entry["runs"]]
            ax.plot(x, y, style, color=color, linewidth=width, markersize=2 + 2 * width, label=f"{name}: {label}",
                    zorder=3 - width)  # the thin lines on top: where they hide, they equal "both"
        if entry["goodput_rate"] is not None:
            ax.axvline(entry["goodput_rate"], color=color, linestyle="-.", linewidth=1)
    ax.axhline(GOODPUT_ATTAINMENT, color="grey", linestyle=":", linewidth=1)
    if max(rates) >= 4 * min(rates):  # doubling sweeps: evenly spaced
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(rates), [f"{r:g}" for r in sorted(rates)])
    ax.set_xlabel("offered rate (requests/s); dash-dot: goodput")
    ax.set_ylabel("SLO attainment")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")
    ax.set_title(f"tandem bench disagg: {workload} ({report['preset']})", fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- re-reporting a stored result ---------------------------------------------------------


def recompute(report: dict, workloads: list[str], other: OtherLimits) -> tuple[dict, list[str]]:
    """(a copy of the report whose ``workloads`` have their comparison and SLO sensitivity
    recomputed, the workloads whose sensitivity differs from the stored one); ``report`` is
    left as it is."""
    shown = {**report, "workloads": dict(report["workloads"])}
    changed = []
    for workload in workloads:
        slot = report["workloads"][workload]
        block = slo_sensitivity(slot["layouts"], sensitivity_slos(slot, other), slot.get("variants"))
        shown["workloads"][workload] = {**slot, "comparison": compare(slot["layouts"]), "slo_sensitivity": block}
        if block != slot.get("slo_sensitivity", []):
            changed.append(workload)
    return shown, changed


def _worker_count(path: Path) -> int:
    """The worker count a results file's name says (results_path's ``-x<workers>``; none: 2)."""
    match = re.search(r"-x(\d+)(_\d+gpu)?\.json$", path.name)
    return int(match.group(1)) if match else 2


def existing_results_path(results_dir: Path, preset: Preset, workers: int = 2) -> Path:
    """The file a run on this machine would write, else the preset's only file in ``results_dir``."""
    try:
        path = results_path(results_dir, preset, workers)
    except (AssertionError, RuntimeError):  # a GPU preset on a machine without CUDA
        path = None
    if path is not None and path.is_file():
        return path
    found = [f for f in sorted(results_dir.glob(f"disagg_{preset.name}_*.json"))
             if _worker_count(f) == workers]
    if len(found) == 1:
        return found[0]
    if not found:
        raise ValueError(f"no {preset.name} results in {results_dir} (name a file with --results-file)")
    raise ValueError(f"{len(found)} {preset.name} results in {results_dir}: "
                     f"{', '.join(f.name for f in found)}; name one with --results-file")


def read_report(path: Path) -> dict:
    """A stored result; ValueError (one line) for a missing or malformed file."""
    if not path.is_file():
        raise ValueError(f"no results file {path}")
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(report, dict) or report.get("benchmark") != "disagg" or \
            not isinstance(report.get("workloads"), dict):
        raise ValueError(f"{path}: not a tandem bench disagg result")
    return report


def reported_workloads(report: dict, selected: str | None, path: Path) -> list[str]:
    """``--workloads`` (default: all of the file's, in its order), each of which must be there."""
    workloads = selected.split(",") if selected else list(report["workloads"])
    if missing := [w for w in workloads if w not in report["workloads"]]:
        raise ValueError(f"{path} has no results for {', '.join(missing)}")
    if not workloads:
        raise ValueError(f"{path} holds no results")
    return workloads
