"""PNG plots of a ``tandem bench serve`` report (matplotlib, Agg backend: no display needed).

    <stem>_latency_cdf.png     empirical CDFs of TTFT and TPOT of successful requests, one line per rate
                               (log-scale latency axis)
    <stem>_slo_attainment.png  (sweeps only) attainment of both SLOs, TTFT only and TPOT only vs. the
                               offered rate, the 90 % line, and the goodput rate marked
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def write_plots(report: dict, stem: Path, log: Callable[[str], None]) -> list[Path]:
    try:
        import matplotlib
    except ImportError:
        log("matplotlib is not installed; no plots (pip install matplotlib)")
        return []
    matplotlib.use("Agg")
    paths = [_latency_cdfs(report, Path(f"{stem}_latency_cdf.png"))]
    if len(report["runs"]) > 1:
        paths.append(_attainment(report, Path(f"{stem}_slo_attainment.png")))
    return paths


def _title(report: dict) -> str:
    return f"tandem bench serve: {report['workload']} ({report['label']})"


def _latency_cdfs(report: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, limit, label in ((axes[0], "ttft_ms", report["slo"]["ttft_ms"], "TTFT (ms)"),
                                  (axes[1], "tpot_ms", report["slo"]["tpot_ms"], "TPOT (ms)")):
        for run in report["runs"]:
            values = sorted(r[key] for r in run["requests"] if r["ok"] and r[key] is not None)
            if values:
                fractions = [(i + 1) / len(values) for i in range(len(values))]
                ax.step(values, fractions, where="post", label=f"{run['rate']:g} req/s")
        if limit is not None:
            ax.axvline(limit, color="grey", linestyle="--", linewidth=1, label="SLO")
        ax.set_xscale("log")  # low-rate and overloaded runs differ by orders of magnitude
        ax.set_xlabel(f"{label}, log scale")
        ax.set_ylabel("fraction of successful requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(_title(report))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _attainment(report: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    rates = [run["rate"] for run in report["runs"]]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for key, label, style in (("slo_attainment", "both SLOs", "o-"), ("ttft_attainment", "TTFT only", "s--"),
                              ("tpot_attainment", "TPOT only", "^--")):
        values = [run["summary"][key] for run in report["runs"]]
        ax.plot(rates, [v if v is not None else float("nan") for v in values], style, label=label)
    threshold = report["goodput"]["attainment_threshold"]
    ax.axhline(threshold, color="grey", linestyle=":", linewidth=1, label=f"{threshold:.0%}")
    good = report["goodput"]["rate"]
    if good is not None:
        ax.axvline(good, color="green", linestyle="--", linewidth=1, label=f"goodput {good:g} req/s")
    if max(rates) >= 4 * min(rates):  # doubling sweeps: evenly spaced
        ax.set_xscale("log", base=2)
        ax.set_xticks(rates, [f"{r:g}" for r in rates])
    ax.set_xlabel("offered rate (requests/s)")
    ax.set_ylabel("SLO attainment")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(_title(report), fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
