"""PNG plots from result-file runs: latency CDFs, and throughput vs latency across a sweep.

matplotlib is optional (`pip install 'leapfrog[plot]'`); it is imported only when a plot is
asked for. Plots take the `runs` entries of the JSON result file, so a saved file can be
re-plotted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_CDF_PANELS = (
    ("ttft_s", "TTFT (ms)"),
    ("tpot_s", "TPOT (ms)"),
    ("itls_s", "ITL (ms)"),
    ("e2el_s", "E2E latency (ms)"),
)


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or a RuntimeError saying how to install it."""
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError(
            "--plot needs matplotlib: pip install matplotlib (or leapfrog[plot])") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _samples(run: dict[str, Any], key: str) -> list[float]:
    """Per-request values in ms for one panel, successful requests only."""
    ok = [r for r in run["requests"] if r["success"]]
    if key == "itls_s":
        return [1000 * g for r in ok for g in r["itls_s"]]
    if key == "tpot_s":
        return [1000 * (r["e2el_s"] - r["ttft_s"]) / (r["output_tokens"] - 1)
                for r in ok if (r["output_tokens"] or 0) > 1]
    return [1000 * r[key] for r in ok]


def plot_cdfs(runs: list[dict[str, Any]], path: str | Path) -> None:
    """Empirical CDFs of TTFT, TPOT, ITL and E2E latency, one line per run."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (key, title) in zip(axes.flat, _CDF_PANELS, strict=True):
        for run in runs:
            values = sorted(_samples(run, key))
            if values:
                ys = [(i + 1) / len(values) for i in range(len(values))]
                ax.step(values, ys, where="post", label=f"rate {run['request_rate']}")
        ax.set_xlabel(title)
        ax.set_ylabel("fraction of samples")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("Latency CDFs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(runs: list[dict[str, Any]], path: str | Path) -> None:
    """Output throughput against mean TPOT and mean TTFT, one point per request rate."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, name in ((axes[0], "tpot_ms", "mean TPOT (ms)"),
                          (axes[1], "ttft_ms", "mean TTFT (ms)")):
        points = [(r[key]["mean"], r["output_throughput"], r["request_rate"])
                  for r in runs if r[key]["mean"] is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        for x, y, rate in points:
            ax.annotate(f"{rate}/s", (x, y), textcoords="offset points", xytext=(4, 4),
                        fontsize="small")
        ax.set_xlabel(name)
        ax.set_ylabel("output throughput (tok/s)")
        ax.grid(alpha=0.3)
    fig.suptitle("Request-rate sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_plot_path(path: str | Path) -> Path:
    """Where the sweep plot goes next to the CDF plot: `X.png` -> `X_sweep.png`."""
    p = Path(path)
    return p.with_name(f"{p.stem}_sweep{p.suffix or '.png'}")
