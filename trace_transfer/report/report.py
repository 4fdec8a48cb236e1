"""The run report: markdown and a self-contained HTML page (plots embedded as base64 PNG).

Plots, each with one sentence saying what to read from it: the accuracy matrices of all methods as
small multiples (first seed), an importance heatmap per task on the target and the source (Fig. 6
shape), the CKA heatmap with the layer pairs the transfer used (and any source layer whose core was
dropped), core-set overlaps between tasks, and between source-transferred and target-native cores.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from trace_transfer.checkpoint import write_text_atomic
from trace_transfer.report.summary import (MONITOR_NOTE, environment_line, markdown_table, monitor_rows, spread_note,
                                           summary_rows)


def _coresets(d: Path | None) -> dict[str, Path]:
    if d is None or not d.exists():
        return {}
    from trace_transfer.coreset import SUFFIX

    return {f.name.removesuffix(SUFFIX): f for f in sorted(d.glob("*" + SUFFIX))}


def _short(ref: str) -> str:
    """A model reference as an axis label: ``…/models/target-pretrained/model`` → ``target-pretrained``."""
    parts = [x for x in Path(str(ref)).parts if x not in ("model", "/")]
    return parts[-1] if parts else str(ref)


def _model_name(cfg: Any, side: str) -> str:
    """``qwen3, 4 layers`` for a built model, the hub id or directory name otherwise."""
    spec = getattr(cfg, side, None)
    if spec is None:
        return side
    if getattr(spec, "model", None):
        return _short(spec.model)
    build = getattr(spec, "build", None)
    return f"{build.arch}, {build.layers} layers" if build is not None else side


def _transfer_reports(d: Path | None) -> list[dict[str, Any]]:
    return [json.loads(f.read_text()) for f in sorted(d.glob("*.report.json"))] if d is not None and d.exists() else []


# What to read from each figure: one sentence under it, keyed by file name (prefix).
CAPTIONS = {
    "accuracy_matrices": "Each panel is one method: row k is the score on every task after stage k (row 0 = the base "
                         "model); read down a column to see a task learned (its own stage) and then forgotten (the "
                         "rows below), and along the last row for the final scores.",
    "importance_target": "Where the target's own LF core sits for each task: brighter = higher mean importance score, "
                         "dots = tensors with selected rows; columns are attention projections, then MLP, then norms.",
    "importance_source": "The same for the source model's cores, the ones the transfer maps onto the target.",
    "cka_layermap": "How similar each source layer's activations are to each target layer's (numbers in the cells, "
                    "colours stretched to this matrix's own range); red squares are the layer pairs the transfer "
                    "used, and a hatched row is a source layer whose core was dropped.",
    "overlap_tasks": "Jaccard overlap of the tasks' cores: low off-diagonal values mean each task trains its own "
                     "parameters, which is what keeps later stages from overwriting earlier ones.",
    "overlap_transferred_vs_native": "Rows: cores transferred from the source; columns: the target's own cores. A "
                                     "diagonal above the off-diagonal cells means the transfer found the target's "
                                     "own parameters for the same task.",
    "cost_accuracy": "Average accuracy against the target-side cost of choosing the cores: up and to the left is better.",
}


def caption(png: Path) -> str:
    """The sentence saying what to read from a report figure ('' for an unknown one)."""
    return next((text for key, text in CAPTIONS.items() if png.stem.startswith(key)), "")


def _plots(out: Path, results: dict[str, list[dict[str, Any]]], step_dirs: dict[str, Path],
           models: tuple[str, str] = ("source", "target")) -> list[tuple[str, Path]]:
    from trace_transfer.coreset import CoreSet, overlap_stats
    from trace_transfer.report.importance import layer_module_grid
    from trace_transfer.report.plots import (plot_accuracy_matrices, plot_cka_layer_pairs, plot_importance_panels,
                                             plot_overlap_heatmap)

    figs: list[tuple[str, Path]] = []
    matrices = {}
    for label, runs in results.items():
        run = next((r for r in runs if r.get("R")), None)
        if run:
            matrices[label] = (run["R"], run["tasks"], run.get("row_labels"))
    if matrices:
        figs.append(("Accuracy matrices (first seed)", plot_accuracy_matrices(matrices, out / "accuracy_matrices.png")))
    stream = next(iter(matrices.values()))[1] if matrices else []

    def in_stream_order(sets: dict[str, Path]) -> dict[str, Path]:
        return dict(sorted(sets.items(), key=lambda kv: (stream.index(kv[0]) if kv[0] in stream else len(stream), kv[0])))

    native, transferred, source = (
        in_stream_order(_coresets(step_dirs.get(f"cores/{side}-lf")) or _coresets(step_dirs.get(f"cores/{side}-cs")))
        for side in ("target", "transfer", "source"))
    for tag, sets in (("target", native), ("source", source)):
        if sets:
            panels, value_label = [], "mean score"
            for task, path in sets.items():
                grid = layer_module_grid(CoreSet.load(path))
                values, value_label = grid.values("auto")
                panels.append((task, values, grid.layers, grid.modules, grid.selected))
            p = plot_importance_panels(panels, out / f"importance_{tag}.png", value_label=value_label)
            figs.append((f"Importance of each task's core ({tag} model)", p))
    cka_dir, lm_dir = step_dirs.get("cka"), step_dirs.get("layermap")
    if cka_dir is not None and (cka_dir / "cka.safetensors").exists():
        from safetensors.numpy import load_file

        tensors = load_file(str(cka_dir / "cka.safetensors"))
        M = tensors.get("cka", next(iter(tensors.values())))
        lm_file = lm_dir / "layer_map.json" if lm_dir else None
        forward = json.loads(lm_file.read_text()).get("forward") if lm_file and lm_file.exists() else None
        reports = _transfer_reports(step_dirs.get("cores/transfer-lf")) or _transfer_reports(step_dirs.get("cores/transfer-cs"))
        used = reports[0].get("layer_pairs") if reports else None
        unused: dict[int, int] = {}
        for r in reports:  # core parameters dropped per unused source layer, summed over the tasks
            for s in r.get("source_layers_unused") or []:
                unused[int(s)] = unused.get(int(s), 0) + int(r.get("lost_core_params") or 0)
        direction = reports[0].get("direction", "reverse") if reports else None
        title = "CKA between source and target layers" + (f" ({direction} map used)" if direction else "")
        p = plot_cka_layer_pairs(M, out / "cka_layermap.png", used_pairs=used, forward=forward, unused=unused,
                                 source_name=_short(models[0]), target_name=_short(models[1]), title=title)
        figs.append(("CKA (source × target layers) and the layer pairs the transfer used", p))
    for tag, sets in (("target-native", native), ("transferred", transferred)):
        if len(sets) >= 2:
            names = list(sets)
            loaded = [CoreSet.load(sets[n]) for n in names]
            M = [[a.jaccard(b) for b in loaded] for a in loaded]
            p = out / f"overlap_tasks_{tag}.png"
            plot_overlap_heatmap(M, names, p, title=f"Overlap of task cores ({tag})")
            figs.append((f"Core overlap between tasks ({tag})", p))
    if native and transferred:
        common = [n for n in native if n in transferred]
        if common:
            M = [[overlap_stats(CoreSet.load(transferred[a]), CoreSet.load(native[b]))["overall"]["jaccard"]
                  for b in common] for a in common]
            p = out / "overlap_transferred_vs_native.png"
            plot_overlap_heatmap(M, common, p, title="Transferred (rows) vs native (columns)")
            figs.append(("Transferred vs target-native cores", p))
    return figs


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    return "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" + "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>"


def write_report(out: Path, cfg: Any, summary: dict[str, Any], results: dict[str, list[dict[str, Any]]],
                 step_dirs: dict[str, Path]) -> list[Path]:
    """Write ``summary.json``, ``report.md`` and ``report.html`` (+ PNGs) into ``out``."""
    from trace_transfer.checkpoint import write_json_atomic

    out.mkdir(parents=True, exist_ok=True)
    figs = _plots(out, results, step_dirs, models=(_model_name(cfg, "source"), _model_name(cfg, "target")))
    points = {k: (e["target_cost"], 100 * e["aa"][0], 100 * (e["aa"][1] or 0.0)) for k, e in summary["methods"].items()
              if e.get("target_cost") is not None and e["aa"][0] is not None}
    if points:
        from trace_transfer.report.plots import plot_cost_accuracy

        figs.append(("Cost and accuracy: how the target's cores are chosen", plot_cost_accuracy(points, out / "cost_accuracy.png")))
    write_json_atomic(out / "summary.json", summary)
    md = [f"# trace-transfer run: {getattr(cfg, 'name', 'run')}", "",
          f"Tasks (in order): {' → '.join(summary['tasks'])} · seeds: {summary.get('seeds')} · "
          f"best baseline: {summary.get('best_baseline')}", "",
          f"Scores in % ({spread_note(summary)}): final score per task after the last stage, average (AA), "
          "change of AA against the best baseline, BWT and FWT (GEM definitions, denominator T−1).", "",
          markdown_table(summary), ""]
    monitored = monitor_rows(summary)
    if monitored:
        md += [MONITOR_NOTE, "", markdown_table(summary, monitor_rows), ""]
    n_head = len(md)
    verdict = (summary.get("layer_map") or {}).get("verdict")
    if verdict:
        md += [f"Layer map: **{summary['layer_map']['method']}** — CKA {'is' if verdict['informative'] else 'is not'} "
               f"informative ({verdict['reason']}).", ""]
    env = environment_line(summary)
    if env:
        md += [f"Produced with {env} (see the README's Determinism section).", ""]
    n_notes = len(md)
    for title, p in figs:
        md += [f"## {title}", "", f"![{title}]({p.name})", "", *([caption(p), ""] if caption(p) else [])]
    md += ["## Conventions", "", *[f"- **{k}**: {v}" for k, v in summary["conventions"].items()], ""]
    write_text_atomic(out / "report.md", "\n".join(md))
    tables = f"<div class='scroll'>{_html_table(*summary_rows(summary))}</div>"
    if monitored:
        tables += f"<p>{html.escape(MONITOR_NOTE)}</p><div class='scroll'>{_html_table(*monitored)}</div>"
    imgs = "".join(
        f"<figure><h2>{html.escape(t)}</h2><img alt='{html.escape(t)}' src='data:image/png;base64,"
        f"{base64.b64encode(p.read_bytes()).decode()}'/><figcaption>{html.escape(caption(p))}</figcaption></figure>"
        for t, p in figs)
    notes = "".join(f"<p>{html.escape(line.replace('**', ''))}</p>" for line in md[n_head:n_notes] if line)
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'><title>trace-transfer report</title><style>"
        "body{font-family:sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;line-height:1.4}"
        ".scroll{overflow-x:auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right;white-space:nowrap}"
        "td:first-child,th:first-child{text-align:left}figure{margin:2em 0}"
        "img{max-width:100%;height:auto}figcaption{color:#444;max-width:50em}</style></head><body>"
        f"<h1>trace-transfer run: {html.escape(str(getattr(cfg, 'name', 'run')))}</h1>"
        f"<p>Tasks: {html.escape(' → '.join(summary['tasks']))}; seeds {summary.get('seeds')}; "
        f"scores in % ({html.escape(spread_note(summary))})</p>{tables}{notes}{imgs}"
        "</body></html>"
    )
    write_text_atomic(out / "report.html", page)
    return [out / "report.md", out / "report.html", out / "summary.json", *[p for _, p in figs]]
