"""The closing table of `bench/gpu_check.sh`: one row per step with its status and headline.

Reads what the steps left in the results folder (`steps.tsv`, written by the script: name,
status, seconds, note per line; `env.json`, `attention.json`, `pytest_gpu.log`, `engine.json`,
`serve.json`), prints the table and writes `summary.json` beside them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def cmd_summary(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    steps = _read_steps(folder / "steps.tsv")
    headlines = {
        "env": _env(folder),
        "attention": _attention(folder),
        "pytest_gpu": _last_line(folder / "pytest_gpu.log"),
        "checkpoint": _last_line(folder / "checkpoint.log"),
        "serve": _serve(folder),
        "engine": _engine(folder),
    }
    for step in steps:
        step["headline"] = headlines.get(step["name"], "")
    rows = [("step", "status", "seconds", "result")]
    rows += [(s["name"], s["status"], s["seconds"], s["headline"] or s["note"]) for s in steps]
    widths = [max(len(str(r[i])) for r in rows) for i in range(3)]
    print("\n== GPU check summary")
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row[:3], widths)) + "  " + str(row[3]))
    summary = {"steps": steps, "all_ok": all(s["status"] == "ok" for s in steps)}
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def _read_steps(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        name, status, seconds, note = (line.split("\t") + ["", "", ""])[:4]
        steps.append({"name": name, "status": status, "seconds": seconds, "note": note})
    return steps


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1].strip("= ") if lines else ""


def _env(folder: Path) -> str:
    env = _load(folder / "env.json")
    if env is None:
        return ""
    missing = ",".join(env["missing"]) or "none"
    return f"{env['device']}, torch {env['torch']} (CUDA {env['torch_cuda']}), missing: {missing}"


def _attention(folder: Path) -> str:
    report = _load(folder / "attention.json")
    if report is None:
        return ""
    cases = [c for c in report["cases"] if "torch_ms" in c]
    text = f"{len(cases)} shapes, fast backend {report['fast_backend']}"
    if report["max_abs_diff"] is not None:
        speedups = sorted(c["speedup"] for c in cases if "speedup" in c)
        text += (f", max |flashinfer - torch| {report['max_abs_diff']:.2e}, speedup "
                 f"{speedups[0]:.1f}-{speedups[-1]:.1f}x")  # fmt: skip
    refs = [c["torch_vs_reference"] for c in cases if "torch_vs_reference" in c]
    if refs:
        text += f", max |torch - reference| {max(refs):.2e}"
    return text + (f", {report['num_errors']} errors" if report["num_errors"] else "")


def _serve(folder: Path) -> str:
    report = _load(folder / "serve.json")
    if report is None:
        return ""
    parts = []
    for run in report["runs"]:
        parts.append(f"rate {run['request_rate']}: {run['completed']}/{run['num_prompts']} ok, "
                     f"{run['output_throughput']:.0f} out tok/s, TTFT p50 "
                     f"{_ms(run['ttft_ms'].get('p50'))}, ITL p50 {_ms(run['itl_ms'].get('p50'))}")  # fmt: skip
    return "; ".join(parts)


def _engine(folder: Path) -> str:
    report = _load(folder / "engine.json")
    if report is None:
        return ""
    parts = [f"{size}: ours {r['ours_tokens_per_s']:.0f} tok/s, {r['ratio']:.1f}x transformers, "
             f"identical {r['tokens_identical']}"
             for size, r in report["checkpoints"].items()]  # fmt: skip
    return "; ".join(parts)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"
