"""PNG plots of `pdserve bench serve`: latency CDFs per workload, goodput vs offered rate, and
the decode stream's TPOT and ITL with and without long prompts among it."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from benchmarks.serve_metrics import RequestRecord

LAYOUT_COLORS = {"disaggregated": "tab:blue", "colocated": "tab:orange"}
LINESTYLES = ("-", "--", ":", "-.")
METRICS = (("ttft_s", "TTFT (s)"), ("tpot_s", "TPOT (s)"), ("itl_s", "ITL (s)"),
           ("e2e_s", "E2E latency (s)"))


def _values(records: Sequence[RequestRecord], metric: str) -> list[float]:
    ok = [r for r in records if r.ok]
    if metric == "itl_s":
        return sorted(x for r in ok for x in r.itls_s)
    if metric == "tpot_s":
        return sorted(r.tpot_s for r in ok if r.tpot_s is not None)
    return sorted(getattr(r, metric) for r in ok if getattr(r, metric) is not None)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def latency_cdfs(path: Path, workload: str,
                 series: Mapping[str, Sequence[RequestRecord]], slos: Mapping[str, float]) -> Path:
    """One panel per metric; one line per series named "LAYOUT @ RATE" (a color per layout,
    a line style per rate)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.6))
    seen: dict[str, int] = {}
    styles = {}
    for name in series:
        layout = name.split(" @ ")[0]
        styles[name] = dict(color=LAYOUT_COLORS.get(layout),
                            linestyle=LINESTYLES[seen.get(layout, 0) % len(LINESTYLES)])
        seen[layout] = seen.get(layout, 0) + 1
    for ax, (metric, label) in zip(axes, METRICS):
        for name, records in series.items():
            xs = _values(records, metric)
            if xs:
                ys = [(i + 1) / len(xs) for i in range(len(xs))]
                ax.step(xs, ys, where="post", label=name, **styles[name])
        if metric in slos:
            ax.axvline(slos[metric], color="grey", linestyle="--", linewidth=1, label="SLO")
        ax.set_xlabel(label)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of requests (ITL: of gaps)")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{workload}: latency CDFs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def goodput_vs_rate(path: Path, curves: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]],
                    slo_text: str) -> Path:
    """curves: workload -> layout -> [(offered rate, goodput)]; one panel per workload."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.8), squeeze=False)
    for ax, (workload, layouts) in zip(axes[0], curves.items()):
        top = 0.0
        for layout, points in layouts.items():
            points = sorted(points)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=layout,
                    color=LAYOUT_COLORS.get(layout))
            top = max([top] + [p[0] for p in points])
        ax.plot([0, top], [0, top], color="grey", linestyle=":", linewidth=1, label="offered")
        ax.set_title(workload)
        ax.set_xlabel("offered load (requests/s)")
        ax.set_ylabel("goodput (requests/s within SLO)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"goodput vs offered load ({slo_text})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def interference_cdfs(path: Path, series: Mapping[str, Mapping[str, Sequence[RequestRecord]]],
                      tpot_slo_s: float | None = None) -> Path:
    """series: layout -> phase ("alone", "with long prompts") -> the decode stream's records.
    Two panels (TPOT, ITL); a color per layout, solid alone, dashed with long prompts."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.8))
    for ax, (metric, label) in zip(axes, (("tpot_s", "TPOT (s)"), ("itl_s", "ITL (s)"))):
        for layout, phases in series.items():
            for k, (phase, records) in enumerate(phases.items()):
                xs = _values(records, metric)
                if xs:
                    ys = [(i + 1) / len(xs) for i in range(len(xs))]
                    ax.step(xs, ys, where="post", label=f"{layout}, {phase}",
                            color=LAYOUT_COLORS.get(layout),
                            linestyle=LINESTYLES[k % len(LINESTYLES)])
        if metric == "tpot_s" and tpot_slo_s is not None:
            ax.axvline(tpot_slo_s, color="grey", linestyle="--", linewidth=1, label="SLO")
        if metric == "itl_s":
            ax.set_xscale("log")  # a prefill stall is one gap tens of times the others
        ax.set_xlabel(label)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of requests (ITL: of gaps)")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.suptitle("decode stream: alone vs with long prompts arriving")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
