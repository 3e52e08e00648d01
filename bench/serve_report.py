"""Plots and side-by-side tables of `bench/serve.py` results.

    python -m bench.serve_report --sweep disaggregated=a.json --sweep colocated=b.json \
        --mixed disaggregated=c.json --mixed colocated=d.json \
        --markdown bench/results/serve.md --plot bench/results/serve.png

`--sweep` files are request-rate sweeps (one run per rate); `--mixed` files hold one run of the
mixed load (groups `short` and `long`). Each flag takes `LABEL=PATH` and may repeat, one per
system, in the same order for both.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

METRICS = (("ttft_ms", "time to first token"), ("itl_ms", "inter-token latency"),
           ("tpot_ms", "time per output token"), ("e2e_ms", "end-to-end latency"))  # fmt: skip
STYLES = {"p50": ("-", "o"), "p90": ("--", "s"), "p99": (":", "^")}
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red")
BARS = ("p50", "p90", "p99", "max")


def _rate(run: dict[str, Any]) -> float:
    """The offered rate; `inf` (all at once) is placed at the measured throughput."""
    rate = run["request_rate"]
    return run["request_throughput"] if rate == "inf" else rate


def _plain_log_ticks(axis) -> None:
    """Ticks at 1, 2, 5 x 10^k written as plain numbers (no minor labels)."""
    if axis.axis_name == "y":
        axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def _sweep_panels(axes, series: dict[str, list[dict[str, Any]]]) -> None:
    for ax, (key, title) in zip(axes, METRICS):
        for color, (label, runs) in zip(COLORS, series.items()):
            runs = sorted(runs, key=_rate)
            for pct, (style, marker) in STYLES.items():
                points = [(_rate(r), r[key][pct]) for r in runs if r[key][pct] is not None]
                if points:
                    ax.plot(*zip(*points), style, marker=marker, markersize=5, linewidth=1.8,
                            color=color, label=f"{label} {pct}")  # fmt: skip
        ax.set_title(title)
        ax.set_xlabel("offered request rate (requests/s)")
        ax.set_ylabel("ms (log scale)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        _plain_log_ticks(ax.xaxis)
        _plain_log_ticks(ax.yaxis)
        ax.grid(True, which="major", alpha=0.4)


def _mixed_panel(ax, mixed: dict[str, dict[str, Any]], group: str, key: str, title: str) -> None:
    """Bars: p50, p90, p99 and max of one metric of one group, one colour per system."""
    width = 0.8 / max(1, len(mixed))
    for i, (color, (label, run)) in enumerate(zip(COLORS, mixed.items())):
        stats = run["groups"].get(group, {}).get(key, {})
        values = [stats.get(p) or 0.0 for p in BARS]
        xs = [j + i * width for j in range(len(BARS))]
        bars = ax.bar(xs, values, width, color=color, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks([j + width * (len(mixed) - 1) / 2 for j in range(len(BARS))], list(BARS))
    ax.set_title(title)
    ax.set_ylabel("ms")
    if key.startswith("itl"):  # p50 and max are orders of magnitude apart
        ax.set_ylabel("ms (log scale)")
        ax.set_yscale("log")
        _plain_log_ticks(ax.yaxis)
    ax.legend(fontsize=7)


def _throughput_panel(ax, series: dict[str, list[dict[str, Any]]]) -> None:
    """Achieved request throughput and goodput against the offered rate."""
    top = 0.0
    for color, (label, runs) in zip(COLORS, series.items()):
        runs = sorted(runs, key=_rate)
        xs = [_rate(r) for r in runs]
        ax.plot(xs, [r["request_throughput"] for r in runs], "-", marker="o", color=color,
                label=f"{label} throughput")  # fmt: skip
        ax.plot(xs, [r["goodput"] for r in runs], "--", marker="s", color=color,
                label=f"{label} goodput")  # fmt: skip
        top = max([top, *xs])
    ax.plot([0, top], [0, top], color="grey", linewidth=0.8, label="offered")
    ax.set_title("throughput, and goodput (requests within the SLOs)")
    ax.set_xlabel("offered request rate (requests/s)")
    ax.set_ylabel("requests/s")
    ax.grid(True, alpha=0.4)
    ax.legend(fontsize=7)


def plot_latency(series: dict[str, list[dict[str, Any]]], path: str,
                 mixed: dict[str, dict[str, Any]] | None = None) -> None:  # fmt: skip
    """Latency percentiles and throughput against request rate, one colour per system; with
    `mixed`, a row for the mixed load: short requests' inter-token latency and longest pause, long
    prompts' TTFT."""
    rows = 3 if mixed else 2
    fig, grid = plt.subplots(rows, 3, figsize=(15.6, 4.1 * rows + 0.6))
    sweep_axes = [grid[0][0], grid[0][1], grid[0][2], grid[1][0]]
    _sweep_panels(sweep_axes, series)
    _throughput_panel(grid[1][1], series)
    grid[1][2].axis("off")
    if mixed:
        for ax, (group, key, title) in zip(grid[2], (
            ("short", "itl_ms", "mixed load: inter-token latency, short requests"),
            ("short", "itl_worst_ms", "mixed load: longest pause of each short request"),
            ("long", "ttft_ms", "mixed load: time to first token, long prompts"),
        )):  # fmt: skip
            _mixed_panel(ax, mixed, group, key, title)
    fig.suptitle("kimiserve serving latency: " + " vs ".join(series))
    handles, labels = sweep_axes[0].get_legend_handles_labels()
    grid[1][2].legend(handles, labels, loc="center", fontsize=10, frameon=False,
                      title="latency panels (log scales)")  # fmt: skip
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- markdown


def _cell(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


SWEEP_ROWS = (
    ("completed / sent", None),
    ("throughput (req/s)", lambda r: _cell(r["request_throughput"], 2)),
    ("input tokens/s", lambda r: _cell(r["input_throughput"], 1)),
    ("output tokens/s", lambda r: _cell(r["output_throughput"], 1)),
    ("goodput (req/s)", lambda r: _cell(r["goodput"], 2)),
    *((f"{name} {pct} (ms)", lambda r, k=key, p=pct: _cell(r[k][p]))
      for key, name in (("ttft_ms", "TTFT"), ("itl_ms", "ITL"), ("tpot_ms", "TPOT"),
                        ("e2e_ms", "E2E")) for pct in ("mean", "p50", "p90", "p99")),
)  # fmt: skip
# The router's view (mean ms over the run): where the time to the first token went.
SERVER_ROWS = tuple(
    (f"router: {name} mean (ms)", lambda r, k=key: _cell(r.get("server_mean_ms", {}).get(k)))
    for key, name in (("queue", "reservation"), ("prefill", "prefill (queue + compute)"),
                      ("kv_transfer", "KV transfer"), ("first_decode_step", "first decode step"))
)  # fmt: skip


def _row(name: str, runs: list[dict[str, Any]], fmt) -> str:
    cells = [f"{r['completed']} / {r['num_prompts']}" if fmt is None else fmt(r) for r in runs]
    return f"| {name} | " + " | ".join(cells) + " |"


def sweep_table(series: dict[str, list[dict[str, Any]]]) -> list[str]:
    """One table per request rate: metrics down, systems across."""
    labels = list(series)
    lines = []
    rates = sorted({str(r["request_rate"]) for runs in series.values() for r in runs},
                   key=lambda r: float(r))  # fmt: skip
    for rate in rates:
        runs = [
            next(r for r in series[label] if str(r["request_rate"]) == rate) for label in labels
        ]
        lines += [f"**{rate} requests/s**", "", "| | " + " | ".join(labels) + " |",
                  "|---|" + "---:|" * len(labels)]  # fmt: skip
        lines += [_row(name, runs, fmt) for name, fmt in SWEEP_ROWS + SERVER_ROWS] + [""]
    return lines


def mixed_table(mixed: dict[str, dict[str, Any]]) -> list[str]:
    labels = list(mixed)
    runs = list(mixed.values())
    lines = ["| | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    lines.append(_row("completed / sent", runs, None))
    lines.append(_row("output tokens/s", runs, lambda r: _cell(r["output_throughput"], 1)))
    for group, key, name in (("short", "itl_ms", "short: ITL"),
                             ("short", "itl_worst_ms", "short: longest pause per request"),
                             ("short", "tpot_ms", "short: TPOT"),
                             ("short", "ttft_ms", "short: TTFT"), ("long", "ttft_ms", "long: TTFT"),
                             ("long", "e2e_ms", "long: E2E")):  # fmt: skip
        for pct in ("p50", "p90", "p99", "max"):
            cells = [_cell(r["groups"].get(group, {}).get(key, {}).get(pct)) for r in runs]
            lines.append(f"| {name} {pct} (ms) | " + " | ".join(cells) + " |")
    lines.append(_row("all: ITL p99 (ms)", runs, lambda r: _cell(r["itl_ms"]["p99"])))
    lines += [_row(name, runs, fmt) for name, fmt in SERVER_ROWS]
    return lines + [""]


def _workload(result: dict[str, Any]) -> str:
    d = result["dataset"]
    text = (f"{d['num_prompts']} requests per rate, prompts of {d['input_len']} tokens, "
            f"{d['output_len']} tokens out")  # fmt: skip
    if d["long_fraction"]:
        text += (f"; {d['long_fraction']:.0%} long ({d['long_input_len']} tokens in, "
                 f"{d['long_output_len']} out), counts {d['groups']}")  # fmt: skip
    return text


def markdown(series: dict[str, list[dict[str, Any]]], mixed: dict[str, dict[str, Any]],
             results: dict[str, dict[str, Any]], plot: str) -> str:  # fmt: skip
    lines = ["# Serving benchmark: disaggregated against colocated", "",
             "Written by `bench/compare.sh` (`bench/serve.py`, `bench/serve_report.py`); "
             "`docs/bench.md` explains the setup and how to read it.", ""]  # fmt: skip
    for name, result in results.items():
        env, notes = result["environment"], result.get("notes")
        lines.append(f"- `{name}`: {notes + '; ' if notes else ''}{_workload(result)}; "
                     f"{env['num_cpus']} CPUs, load average "
                     f"{env['load_average_before'][0]:.1f} before, "
                     f"{env['load_average_after'][0]:.1f} after")  # fmt: skip
    lines += ["", f"![latency against request rate]({Path(plot).name})", "",
              "## Request-rate sweep", ""]  # fmt: skip
    lines += sweep_table(series)
    if mixed:
        lines += ["## Mixed load: long prompts among short ones", ""] + mixed_table(mixed)
    return "\n".join(lines)


def _pairs(items: list[str]) -> dict[str, dict[str, Any]]:
    pairs = [item.split("=", 1) for item in items]
    return {label: json.loads(Path(path).read_text()) for label, path in pairs}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", action="append", default=[], help="LABEL=PATH (repeat)")
    parser.add_argument("--mixed", action="append", default=[], help="LABEL=PATH (repeat)")
    parser.add_argument("--markdown", default="")
    parser.add_argument("--plot", required=True)
    args = parser.parse_args(argv)
    sweeps, mixes = _pairs(args.sweep), _pairs(args.mixed)
    series = {label: result["runs"] for label, result in sweeps.items()}
    mixed = {label: result["runs"][0] for label, result in mixes.items()}
    plot_latency(series, args.plot, mixed or None)
    if args.markdown:
        results = {f"{k} sweep": v for k, v in sweeps.items()}
        results.update({f"{k} mixed": v for k, v in mixes.items()})
        Path(args.markdown).write_text(markdown(series, mixed, results, args.plot) + "\n")


if __name__ == "__main__":
    main()
