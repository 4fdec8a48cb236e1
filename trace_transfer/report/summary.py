"""Aggregate per-seed sequential-runner results into the paper's Table 1/4 shape.

For every method: the final score on each task (last row of R), the average (AA), the change
against the best baseline's average, BWT and FWT (GEM), the plasticity (score on each task right
after its own stage) — as mean ± std over seeds (std with ddof=1; None for a single seed, so a
printed "± 0.0" always means several seeds agreed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

# The default for callers without the pipeline's method table (bench/reproduce.py); the pipeline passes
# the methods its table marks as baselines.
BASELINE_METHODS = ("full", "joint", "lora", "replay")


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def summarise(cfg: Any, results: dict[str, list[dict[str, Any]]],
              baselines: Sequence[str] = BASELINE_METHODS) -> dict[str, Any]:
    """``{"tasks", "methods": {label: {...}}, "best_baseline", "rows"}`` from per-seed results.json dicts.

    ``baselines``: the method names (labels without ``@lr``) every method is compared against; the
    pipeline passes those its method table marks as baselines."""
    tasks: list[str] = []
    methods: dict[str, Any] = {}
    for label, runs in results.items():
        runs = [r for r in runs if r.get("R")]
        if not runs:
            continue
        tasks = tasks or list(runs[0]["tasks"])
        final = [[run["R"][-1][j] for run in runs] for j in range(len(tasks))]
        plast = [[(run["metrics"].get("plasticity") or [None] * len(tasks))[j] for run in runs]
                 for j in range(len(tasks))]
        entry = {
            "n_seeds": len(runs),
            "final": [_mean_std(v) for v in final],
            "plasticity": [_mean_std(v) for v in plast],
            "aa": _mean_std([run["metrics"]["aa"] for run in runs]),
            "bwt": _mean_std([run["metrics"].get("bwt") for run in runs]),
            "fwt": _mean_std([run["metrics"].get("fwt") for run in runs]),
            "base": [_mean_std([run["R"][0][j] for run in runs]) for j in range(len(tasks))],
        }
        monitored = _monitored(runs)
        if monitored:  # only when monitored: summaries of runs without it stay as they were
            entry["monitor"] = monitored
        methods[label] = entry
    reference = {k: v for k, v in methods.items() if k.split("@")[0] in baselines and v["aa"][0] is not None}
    best = max(reference, key=lambda k: reference[k]["aa"][0]) if reference else None
    for label, entry in methods.items():
        entry["delta_vs_best_baseline"] = (
            entry["aa"][0] - methods[best]["aa"][0] if best and entry["aa"][0] is not None else None
        )
    return {"tasks": tasks, "methods": methods, "best_baseline": best,
            "seeds": list(getattr(cfg, "seeds", []) or []),
            "environment": environment(),
            "conventions": {
                "final": "R[T][j]: score on task j after the last stage",
                "aa": "mean of the last row of R",
                "bwt": "mean over j<T of R[T][j] - R[j][j] (denominator T-1); joint has none",
                "fwt": "mean over j>=2 of R[j-1][j] - R[0][j] (denominator T-1)",
                "plasticity": "R[j][j]: score on task j right after its own stage",
                "spread": "mean ± sample std over seeds",
            }}


def _monitored(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Monitored tasks (evaluated at every row, never trained): base and final score, over seeds."""
    mon = [r["monitor"] for r in runs if r.get("monitor") and r["monitor"].get("rows")]
    if not mon:
        return None
    names = list(mon[0]["tasks"])
    return {"tasks": names,
            "base": [_mean_std([m["rows"][0][j] for m in mon]) for j in range(len(names))],
            "final": [_mean_std([m["rows"][-1][j] for m in mon]) for j in range(len(names))]}


def monitor_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """Header and rows of the monitored-tasks table (scores in %: base -> after the last stage, and the
    change), or None when no method monitored a task."""
    entries = {k: e["monitor"] for k, e in summary["methods"].items() if e.get("monitor")}
    if not entries:
        return None
    tasks = next(iter(entries.values()))["tasks"]
    rows = []
    for label, m in entries.items():
        cells = []
        for j in range(len(tasks)):
            (b, _), final = m["base"][j], m["final"][j]
            change = "" if b is None or final[0] is None else f" ({100 * (final[0] - b):+.1f})"
            cells.append(f"{_fmt(m['base'][j])} → {_fmt(final)}{change}")
        rows.append([label, *cells])
    return ["method", *[f"{name}: base → last stage" for name in tasks]], rows


MONITOR_NOTE = ("Monitored tasks, never trained: score of the base model → after the last stage (change). A drop is "
                "forgetting of what the model could do before fine-tuning; these scores are not part of the table above.")


def environment() -> dict[str, Any]:
    """What decides the numbers besides the config: library versions and torch's thread counts (a
    different intra-op thread count changes the order of float sums, hence the last digits)."""
    import sys

    from trace_transfer._version import versions

    env: dict[str, Any] = versions()
    torch = sys.modules.get("torch")  # only report what this process used; never import torch for it
    if torch is not None:
        env["torch_threads"] = torch.get_num_threads()
        env["torch_interop_threads"] = torch.get_num_interop_threads()
    return env


def environment_line(summary: dict[str, Any]) -> str:
    """``torch 2.13.0 · transformers 5.24.0 · ... · 2 threads``: one line for the table's foot."""
    env = summary.get("environment") or {}
    parts = [f"{k} {env[k]}" for k in ("trace_transfer", "torch", "transformers", "tokenizers", "numpy", "python")
             if k in env]
    if "torch_threads" in env:
        parts.append(f"{env['torch_threads']} torch thread(s)")
    return " · ".join(parts)


def spread_note(summary: dict[str, Any]) -> str:
    """How to read the ± in the table: only claim a spread over seeds when there are several."""
    n = max((e["n_seeds"] for e in summary["methods"].values()), default=0)
    return "mean ± std over seeds" if n > 1 else "one seed, so no spread"


def _fmt(ms: tuple[float | None, float | None], pct: bool = True, signed: bool = False) -> str:
    m, s = ms
    if m is None:
        return "n/a"
    scale = 100.0 if pct else 1.0
    body = f"{m * scale:+.1f}" if signed else f"{m * scale:.1f}"
    return body + (f" ± {s * scale:.1f}" if s is not None else "")


def summary_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the results table (scores in %)."""
    costs = any("target_cost" in e for e in summary["methods"].values())
    header = ["method", *summary["tasks"], "avg", "Δ vs best baseline", "BWT", "FWT"] + (["target cost"] if costs else [])
    rows = []
    for label, e in summary["methods"].items():
        delta = e["delta_vs_best_baseline"]
        cost = e.get("target_cost")
        rows.append([
            label + (" (best baseline)" if label == summary["best_baseline"] else ""),
            *[_fmt(v) for v in e["final"]],
            _fmt(e["aa"]),
            "—" if delta is None or label == summary["best_baseline"] else f"{100 * delta:+.1f}",
            _fmt(e["bwt"], signed=True),
            _fmt(e["fwt"], signed=True),
        ] + ([("—" if cost is None else f"{100 * cost:.0f} %")] if costs else []))
    return header, rows


def markdown_table(summary: dict[str, Any], rows_of: Any = None) -> str:
    """The results table as markdown (``rows_of``: another ``summary -> (header, rows)``, e.g. :func:`monitor_rows`)."""
    header, rows = (rows_of or summary_rows)(summary)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def print_table(summary: dict[str, Any], title: str | None = None) -> None:
    """The results table on stdout; the method column never wraps (``joint (best baseline)`` is one
    cell), and the versions that produced the numbers follow it on one line."""
    from rich.table import Table
    from rich.text import Text

    from trace_transfer.report.console import print_rich

    header, rows = summary_rows(summary)
    table = Table(title=title or f"results (scores in %, {spread_note(summary)})")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for r in rows:
        table.add_row(*r)
    env = environment_line(summary)
    print_rich(table, *([Text(env, style="dim")] if env else []))
    monitored = monitor_rows(summary)
    if monitored:
        watch = Table(title="monitored tasks, never trained (%)")
        for i, h in enumerate(monitored[0]):
            watch.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
        for r in monitored[1]:
            watch.add_row(*r)
        print_rich(watch)
