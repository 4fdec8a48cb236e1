"""The run report: markdown and a self-contained HTML page (plots embedded as base64 PNG).

Plots: accuracy matrix per method (first seed), the importance heatmap of the first task's core on
the target (Fig. 6 shape), the CKA heatmap with the chosen layer map, core-set overlaps between
tasks, and between source-transferred and target-native cores.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from trace_transfer.checkpoint import write_text_atomic
from trace_transfer.report.summary import markdown_table, summary_rows


def _coresets(d: Path | None) -> dict[str, Path]:
    if d is None or not d.exists():
        return {}
    from trace_transfer.coreset import SUFFIX

    return {f.name.removesuffix(SUFFIX): f for f in sorted(d.glob("*" + SUFFIX))}


def _plots(out: Path, results: dict[str, list[dict[str, Any]]], step_dirs: dict[str, Path]) -> list[tuple[str, Path]]:
    from trace_transfer.coreset import CoreSet, overlap_stats
    from trace_transfer.report.importance import layer_module_grid
    from trace_transfer.report.plots import plot_accuracy_matrix, plot_importance_heatmap, plot_overlap_heatmap

    figs: list[tuple[str, Path]] = []
    for label, runs in results.items():
        run = next((r for r in runs if r.get("R")), None)
        if run:
            p = out / f"accuracy_{label.replace('@', '_at_')}.png"
            plot_accuracy_matrix(run["R"], run["tasks"], run.get("row_labels"), p, title=f"{label}: accuracy matrix R")
            figs.append((f"Accuracy matrix — {label}", p))
    native = _coresets(step_dirs.get("cores/target-lf")) or _coresets(step_dirs.get("cores/target-cs"))
    transferred = _coresets(step_dirs.get("cores/transfer-lf")) or _coresets(step_dirs.get("cores/transfer-cs"))
    source = _coresets(step_dirs.get("cores/source-lf")) or _coresets(step_dirs.get("cores/source-cs"))
    for tag, sets in (("target", native), ("source", source)):
        if sets:
            task, path = next(iter(sets.items()))
            grid = layer_module_grid(CoreSet.load(path))
            values, label = grid.values("auto")
            p = out / f"importance_{tag}_{task}.png"
            plot_importance_heatmap(values, grid.layers, grid.modules, p, title=f"{tag} core importance: {task}",
                                    value_label=label, selected=grid.selected)
            figs.append((f"Importance heatmap ({tag}, {task})", p))
    cka_dir, lm_dir = step_dirs.get("cka"), step_dirs.get("layermap")
    if cka_dir is not None and (cka_dir / "cka.safetensors").exists():
        p = out / "cka_layermap.png"
        _plot_cka_with_map(cka_dir, lm_dir / "layer_map.json" if lm_dir else None, p)
        figs.append(("CKA (source × target layers) with the layer map", p))
    for tag, sets in (("target-native", native), ("transferred", transferred)):
        if len(sets) >= 2:
            names = list(sets)
            loaded = [CoreSet.load(sets[n]) for n in names]
            M = [[a.jaccard(b) for b in loaded] for a in loaded]
            p = out / f"overlap_tasks_{tag}.png"
            plot_overlap_heatmap(M, names, p, title=f"Jaccard overlap between task cores ({tag})")
            figs.append((f"Core overlap between tasks ({tag})", p))
    if native and transferred:
        common = [n for n in native if n in transferred]
        if common:
            M = [[overlap_stats(CoreSet.load(transferred[a]), CoreSet.load(native[b]))["overall"]["jaccard"]
                  for b in common] for a in common]
            p = out / "overlap_transferred_vs_native.png"
            plot_overlap_heatmap(M, common, p, title="Jaccard: transferred (rows) vs target-native (cols) cores")
            figs.append(("Transferred vs target-native cores", p))
    return figs


def _plot_cka_with_map(cka_dir: Path, layer_map: Path | None, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from safetensors.numpy import load_file

    tensors = load_file(str(cka_dir / "cka.safetensors"))
    M = tensors.get("cka", next(iter(tensors.values())))
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(M, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, label="CKA")
    if layer_map is not None and layer_map.exists():
        fwd = json.loads(layer_map.read_text()).get("forward", {})
        xs = sorted(int(k) for k in fwd)
        ax.plot([fwd[str(s)] if str(s) in fwd else fwd[s] for s in xs], xs, "r.-", label="layer map")
        ax.legend(loc="upper left")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("target layer")
    ax.set_ylabel("source layer")
    ax.set_title("CKA between source and target layers (red: forward layer map)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_report(out: Path, cfg: Any, summary: dict[str, Any], results: dict[str, list[dict[str, Any]]],
                 step_dirs: dict[str, Path]) -> list[Path]:
    """Write ``summary.json``, ``report.md`` and ``report.html`` (+ PNGs) into ``out``."""
    from trace_transfer.checkpoint import write_json_atomic

    out.mkdir(parents=True, exist_ok=True)
    figs = _plots(out, results, step_dirs)
    points = {k: (e["target_cost"], 100 * e["aa"][0], 100 * (e["aa"][1] or 0.0)) for k, e in summary["methods"].items()
              if e.get("target_cost") is not None and e["aa"][0] is not None}
    if points:
        from trace_transfer.report.plots import plot_cost_accuracy

        figs.append(("Cost and accuracy: how the target's cores are chosen", plot_cost_accuracy(points, out / "cost_accuracy.png")))
    write_json_atomic(out / "summary.json", summary)
    md = [f"# trace-transfer run: {getattr(cfg, 'name', 'run')}", "",
          f"Tasks (in order): {' → '.join(summary['tasks'])} · seeds: {summary.get('seeds')} · "
          f"best baseline: {summary.get('best_baseline')}", "",
          "Scores in % (mean ± std over seeds): final score per task after the last stage, average (AA), "
          "change of AA against the best baseline, BWT and FWT (GEM definitions, denominator T−1).", "",
          markdown_table(summary), ""]
    verdict = (summary.get("layer_map") or {}).get("verdict")
    if verdict:
        md += [f"Layer map: **{summary['layer_map']['method']}** — CKA {'is' if verdict['informative'] else 'is not'} "
               f"informative ({verdict['reason']}).", ""]
    for title, p in figs:
        md += [f"## {title}", "", f"![{title}]({p.name})", ""]
    md += ["## Conventions", "", *[f"- **{k}**: {v}" for k, v in summary["conventions"].items()], ""]
    write_text_atomic(out / "report.md", "\n".join(md))
    header, rows = summary_rows(summary)
    table = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" + "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>"
    imgs = "".join(
        f"<h2>{html.escape(t)}</h2><img alt='{html.escape(t)}' src='data:image/png;base64,"
        f"{base64.b64encode(p.read_bytes()).decode()}'/>" for t, p in figs)
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>trace-transfer report</title><style>"
        "body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
        "img{max-width:100%}</style></head><body>"
        f"<h1>trace-transfer run: {html.escape(str(getattr(cfg, 'name', 'run')))}</h1>"
        f"<p>Tasks: {html.escape(' → '.join(summary['tasks']))}; seeds {summary.get('seeds')}</p>{table}{imgs}"
        "</body></html>"
    )
    write_text_atomic(out / "report.html", page)
    return [out / "report.md", out / "report.html", out / "summary.json", *[p for _, p in figs]]
