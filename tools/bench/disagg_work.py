"""The model work each swept rate of ``tandem bench disagg`` offers, held against the matmul
rate measured in the same run: how near a rate is to what the GPUs can compute at all.

A layout entry stores its model's FLOP counts and the measured matmul rate under ``work``
(disagg_bench.measure_work); entries from before it name a random shape in their settings, from which the
counts follow, and no matmul rate. Both layouts of a rate send the same requests, so the work
is read from the first entry that ran the rate.
"""

from __future__ import annotations

from collections.abc import Iterator

from tools.bench.model_work import WorkModel, flop_s_text, flop_text, llama_shape_config, offered_flop_s


def entry_work_model(entry: dict) -> WorkModel | None:
    if model := entry.get("work", {}).get("model"):
        return WorkModel.from_json(model)
    from tools.bench.disagg_presets import RANDOM_SHAPES  # results from before ``work``

    shape = RANDOM_SHAPES.get(entry["settings"].get("random_shape") or "")
    return WorkModel.from_config(llama_shape_config(shape)) if shape is not None else None


def _rate_requests(entries: list[dict]) -> Iterator[tuple[float, WorkModel, float, list[dict]]]:
    """(rate, work model, send window s, requests) once per swept rate, from the first entry
    that ran it with records and a known model."""
    seen = set()
    for entry in entries:
        if (work := entry_work_model(entry)) is None:
            continue
        for run in entry["runs"]:
            if run["rate"] not in seen and run.get("requests"):
                seen.add(run["rate"])
                yield run["rate"], work, entry["settings"]["duration_s"], run["requests"]


def offered_by_rate(entries: list[dict]) -> dict[float, float]:
    """FLOP/s each swept rate's requests offer (prompt and asked output lengths), by rate."""
    offered = {}
    for rate, work, duration_s, requests in _rate_requests(entries):
        pairs = [(r.get("input_len"), r["output_len_requested"]) for r in requests]
        if (flop_s := offered_flop_s(work, pairs, duration_s)) is not None:
            offered[rate] = flop_s
    return dict(sorted(offered.items()))


def mean_request_flops(entries: list[dict]) -> tuple[float, float] | None:
    """Mean prefill and decode FLOPs of a request, over every rate's requests."""
    prefill, decode = [], []
    for _, work, _, requests in _rate_requests(entries):
        for r in requests:
            if r.get("input_len") is not None:
                prefill.append(work.prefill_flops(r["input_len"]))
                decode.append(work.decode_flops(r["input_len"], r["output_len_requested"]))
    return (sum(prefill) / len(prefill), sum(decode) / len(decode)) if prefill else None


def work_lines(entries: list[dict]) -> list[str]:
    """Report lines: model FLOP/s offered at each rate, and where the run timed a matmul, its share
    of that rate times the layout's GPUs (all layouts compared use as many) and the most requests/s
    those GPUs could serve computing at it and nothing else."""
    offered = offered_by_rate(entries)
    if not offered:
        return []
    measured = next((e for e in entries if e.get("work", {}).get("matmul_flop_s")), None)
    if measured is None:
        return ["  model work offered, at rate: "
                + ", ".join(f"{rate:g}: {flop_s_text(v)}" for rate, v in offered.items())]
    matmul = measured["work"]["matmul_flop_s"]
    gpus = max(1, len({w["device"] for w in measured["layout"]["workers"].values()}))
    where = f"{gpus} x " if gpus > 1 else ""
    lines = [f"  model work offered, at rate (share of {where}{flop_s_text(matmul)}, "
             f"a large {measured['work'].get('matmul_dtype', '')} matmul measured in the run): "
             + ", ".join(f"{rate:g}: {flop_s_text(v)} ({v / (gpus * matmul):.0%})" for rate, v in offered.items())]
    if means := mean_request_flops(entries):
        prefill, decode = means
        devices = f"{gpus} devices" if gpus > 1 else "1 device"
        lines.append(f"  computing at that matmul rate and nothing else, {devices} could serve at most "
                     f"{gpus * matmul / (prefill + decode):.1f} req/s of these requests (each "
                     f"{flop_text(prefill + decode)}: prompt {flop_text(prefill)}, decode {flop_text(decode)})")
    return lines
