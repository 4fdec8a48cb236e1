"""Plots: PNG figures for reports (importance, CKA, accuracy matrix). Each function is self-contained."""

from __future__ import annotations


def _save(fig, out_path, layout=True):
    """Lay out, write the PNG atomically (a crash never leaves half a file), close; return the Path.

    ``bbox_inches="tight"`` grows the canvas to whatever the labels need, so no title, tick label or
    legend below the axes is ever cut off."""
    from pathlib import Path

    import matplotlib.pyplot as plt

    from trace_transfer.checkpoint import atomic_path

    if layout:
        fig.tight_layout()
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    return out_path


# --------------------------------------------------------------------------------------------------
# Accuracy matrix (continual learning)
# --------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: runs on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def _draw_accuracy(ax, R, task_names, row_labels=None, vmin=0.0, vmax=1.0, title=None):
    """One accuracy matrix on ``ax``, every cell annotated; returns the image (for a colour bar)."""
    rows = [list(map(float, r)) for r in R]
    labels = list(row_labels) if row_labels is not None else ["before"] + [f"after stage {i}" for i in range(1, len(rows))]
    im = ax.imshow(rows, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(task_names)), labels=list(task_names))
    ax.set_yticks(range(len(rows)), labels=labels)
    for i, r in enumerate(rows):
        for j, v in enumerate(r):
            # dark text on the bright end of viridis, light text elsewhere
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                    color="black" if v > (vmin + vmax) * 0.6 else "white")
    if title:
        ax.set_title(title, fontsize=10)
    return im


def plot_accuracy_matrix(R, task_names, row_labels=None, out_path="accuracy_matrix.png", title=None, vmin=0.0, vmax=1.0):
    """Heatmap of the accuracy matrix ``R`` (row 0 = before any stage), each cell annotated.

    Args:
        R: ``(S+1) x T`` scores. task_names: column labels. row_labels: default ``before``, ``after stage i``.
        out_path: PNG path (written atomically). vmin/vmax: colour range (scores in [0, 1] by default).

    Returns:
        The path written.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(task_names), 1.0 + 0.55 * len(R)))
    im = _draw_accuracy(ax, R, task_names, row_labels, vmin, vmax, title)
    ax.set_xlabel("evaluated task")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, out_path)


def plot_accuracy_matrices(matrices, out_path="accuracy_matrices.png", ncols=3, vmin=0.0, vmax=1.0):
    """Small multiples: one accuracy matrix per method on a shared colour scale, to compare at a glance.

    Args:
        matrices: ``{method: (R, task_names, row_labels or None)}`` in display order.
        out_path: PNG path (written atomically). ncols: panels per row.

    Returns:
        The path written.

    Example:
        >>> plot_accuracy_matrices({"full": (R_full, tasks, None), "trace-lf": (R_lf, tasks, None)}, "acc.png")
    """
    plt = _pyplot()
    items = list(matrices.items())
    ncols = max(1, min(ncols, len(items)))
    nrows = -(-len(items) // ncols)
    n_tasks = max(len(t) for _, (_, t, _) in items)
    n_rows = max(len(R) for _, (R, _, _) in items)
    fig, axes = plt.subplots(nrows, ncols, squeeze=False, sharey=True,
                             figsize=(1.2 + ncols * (0.75 * n_tasks + 0.5), 0.8 + nrows * (0.42 * n_rows + 0.9)))
    im = None
    for k, ax in enumerate(axes.flat):
        if k >= len(items):
            ax.axis("off")
            continue
        name, (R, tasks, labels) = items[k]
        im = _draw_accuracy(ax, R, tasks, labels, vmin, vmax, title=name)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.025, pad=0.02, label="score")
    return _save(fig, out_path, layout=False)


# --------------------------------------------------------------------------------------------------
# Importance heatmap (TRACE Fig. 6: layers × modules, projections left, norms right)
# --------------------------------------------------------------------------------------------------


def _draw_importance(ax, values, layers, modules, selected=None, title=None):
    """One layer × module importance grid on ``ax``; returns the image (for a colour bar)."""
    import matplotlib
    import numpy as np

    from trace_transfer.report.importance import short_names

    grid = np.array(values, dtype=float).reshape(len(layers), len(modules))
    cmap = matplotlib.colormaps["magma"].with_extremes(bad="#f0f0f0")
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(modules)), labels=short_names(list(modules)), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), labels=[str(la) for la in layers])
    ax.set_ylabel("layer")
    if selected is not None:
        sel = np.array(selected, dtype=float).reshape(grid.shape)
        ys, xs = np.nonzero(np.nan_to_num(sel) > 0)
        ax.scatter(xs, ys, s=8, c="cyan", marker="o", linewidths=0)
    if title:
        ax.set_title(title, fontsize=10)
    return im


def plot_importance_heatmap(values, layers, modules, out_path="importance.png", title=None, value_label="mean score",
                            selected=None):
    """Layer × module heatmap of importance, in the layout of the TRACE paper's Fig. 6.

    Args:
        values: ``len(layers) x len(modules)`` numbers; NaN cells (no such tensor) are left blank.
        layers: row labels (layer indices). modules: column labels, already ordered (projections
            first, norms last — see ``trace_transfer.report.importance.module_rank``).
        out_path: PNG path (written atomically). value_label: colour-bar label.
        selected: optional grid of the share selected per cell; cells with any selection get a dot.

    Returns:
        The path written.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(2.5 + 0.55 * len(modules), 2.2 + 0.28 * len(layers)))
    im = _draw_importance(ax, values, layers, modules, selected, title)
    if selected is not None:
        ax.set_xlabel("module (dots: tensors with selected units)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=value_label)
    return _save(fig, out_path)


def plot_importance_panels(panels, out_path="importance.png", value_label="mean score"):
    """One importance heatmap per task, side by side (each with its own colour scale: score ranges
    differ between tasks, and what matters within a panel is where the importance sits).

    Args:
        panels: ``[(title, values, layers, modules, selected or None), ...]``.

    Returns:
        The path written.
    """
    plt = _pyplot()
    n_mod = max(len(p[3]) for p in panels)
    n_lay = max(len(p[2]) for p in panels)
    ncols = 1 if n_mod > 8 else min(3, len(panels))  # wide grids one under the other, to stay legible
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, squeeze=False,
                             figsize=(ncols * (1.8 + 0.5 * n_mod), nrows * (1.9 + 0.3 * n_lay)))
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    for ax, (title, values, layers, modules, selected) in zip(axes.flat, panels):
        im = _draw_importance(ax, values, layers, modules, selected, title)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=value_label)
    return _save(fig, out_path)


# --------------------------------------------------------------------------------------------------
# CKA between two models' layers, with the layer pairs a transfer used
# --------------------------------------------------------------------------------------------------


def plot_cka_layer_pairs(matrix, out_path="cka_layermap.png", used_pairs=None, forward=None, unused=None,
                         source_name="source", target_name="target", title=None):
    """CKA heatmap (source layers × target layers) on the data's own colour range, every cell numbered,
    with the layer pairs a transfer used drawn on top.

    Args:
        matrix: ``L_s x L_t`` CKA values.
        used_pairs: ``[(source layer, target layer), ...]`` the transfer used (red squares joined in
            target order); forward: the forward map ``{source: target}``, drawn dashed when it differs.
        unused: ``{source layer: core parameters dropped}`` — source layers whose core reached no
            target layer; their rows are hatched and labelled.
        source_name, target_name: short model names for the axes (not paths).

    Returns:
        The path written.
    """
    plt = _pyplot()
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    M = np.asarray(matrix, dtype=float)
    lo, hi = float(np.nanmin(M)), float(np.nanmax(M))
    if hi - lo < 1e-9:
        lo, hi = lo - 0.01, hi + 0.01
    n_s, n_t = M.shape
    fig, ax = plt.subplots(figsize=(max(6.0, 2.2 + 0.9 * n_t), max(4.0, 1.8 + 0.7 * n_s)))
    im = ax.imshow(M, aspect="auto", origin="lower", cmap="viridis", vmin=lo, vmax=hi)
    fig.colorbar(im, ax=ax, label=f"CKA (colour range {lo:.2f}-{hi:.2f})")
    if n_s * n_t <= 400:  # beyond that the numbers no longer fit their cells
        for i in range(n_s):
            for j in range(n_t):
                ax.text(j, i, f"{M[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if M[i, j] > lo + 0.6 * (hi - lo) else "white")
    from matplotlib.patches import Patch, Rectangle

    handles = []
    used = sorted((int(s), int(t)) for s, t in (used_pairs or []))
    for s, t in used:  # outline the cell, so its number stays readable
        ax.add_patch(Rectangle((t - 0.5, s - 0.5), 1, 1, fill=False, edgecolor="red", lw=2.5, zorder=3))
    if used:
        handles.append(Patch(fill=False, edgecolor="red", lw=2.5, label="layer pairs the transfer used"))
    if forward:
        fwd = sorted((int(k), int(v)) for k, v in forward.items())
        if sorted(fwd) != used:
            for s, t in fwd:
                ax.add_patch(Rectangle((t - 0.38, s - 0.38), 0.76, 0.76, fill=False, edgecolor="0.8", lw=1.2, ls="--",
                                       zorder=3))
            handles.append(Patch(fill=False, edgecolor="0.6", ls="--", label="forward map (not used)"))
    for s, lost in sorted((unused or {}).items()):
        ax.add_patch(Rectangle((-0.5, s - 0.5), n_t, 1, fill=False, hatch="//", edgecolor="orange", lw=0, zorder=2))
        ax.text(-0.45, s + 0.45, f"source layer {s}: no target layer, {lost:,} core params dropped", fontsize=8,
                color="orange", va="top", zorder=4)
    if unused:
        handles.append(Patch(fill=False, hatch="//", edgecolor="orange", label="source layer whose core was dropped"))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"target layer ({target_name})")
    ax.set_ylabel(f"source layer ({source_name})")
    if handles:
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8, frameon=False)
    ax.set_title(title or "CKA between source and target layers", fontsize=10)
    return _save(fig, out_path)


# --------------------------------------------------------------------------------------------------
# Core-region overlap between tasks (CPI-FT clustering)
# --------------------------------------------------------------------------------------------------


def plot_overlap_heatmap(matrix, names, out_path="overlap.png", groups=None, tau=None, title=None):
    """Heatmap of the pairwise Jaccard overlap of tasks' core regions, tasks ordered by group.

    Args:
        matrix: N x N Jaccard similarities (``ClusterResult.matrix``). names: the N task names.
        out_path: PNG path (written atomically). groups: lists of task names (``ClusterResult.groups``);
            tasks are reordered group by group and each group is outlined. tau: the clustering
            threshold, shown in the title.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: runs on servers and in CI
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    names = list(names)
    order = [names.index(n) for g in groups for n in g] if groups else list(range(len(names)))
    m = [[float(matrix[i][j]) for j in order] for i in order]
    labels = [names[i] for i in order]
    n = len(labels)
    fig, ax = plt.subplots(figsize=(2.2 + 0.75 * n, 1.6 + 0.7 * n))
    im = ax.imshow(m, cmap="magma", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), labels=labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels=labels)
    if n <= 16:  # beyond that the numbers no longer fit their cells
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{m[i][j]:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if m[i][j] > 0.6 else "white")
    start = 0
    for g in groups or []:
        ax.add_patch(Rectangle((start - 0.5, start - 0.5), len(g), len(g), fill=False, edgecolor="cyan", linewidth=2))
        start += len(g)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="Jaccard overlap of core regions")
    heading = title or "core-region overlap"
    if tau is not None:
        heading += f" (tau = {tau:g}, {len(groups or [])} groups)"
    ax.set_title(heading)
    return _save(fig, out_path)


# --------------------------------------------------------------------------------------------------
# Whole runs: training writes results, the report draws them (no plotting inside training)
# --------------------------------------------------------------------------------------------------


def _read_results(out_dir):
    import json
    from pathlib import Path

    from trace_transfer.errors import ArtifactNotFoundError

    path = Path(out_dir) / "results.json"
    if not path.is_file():
        raise ArtifactNotFoundError(f"{path} not found; plot a run directory written by `finetune` or `cpi-ft`")
    return json.loads(path.read_text())


def plot_run(out_dir, title=None):
    """Draw ``OUT/accuracy_matrix.png`` from a run's ``results.json`` (``run_sequence`` or ``cpi_ft``).

    Args:
        out_dir: a run directory holding ``results.json``.
        title: default ``"<method>: accuracy matrix R"``.

    Returns:
        The PNG path, or None when the run has no stage after the base row yet (nothing to compare).

    Raises:
        ArtifactNotFoundError: ``out_dir`` holds no ``results.json``.

    Example:
        >>> run_sequence(model, stages, "trace", "runs/trace", cfg); plot_run("runs/trace")
    """
    from pathlib import Path

    results = _read_results(out_dir)
    if len(results["R"]) < 2:
        return None
    method = results.get("method") or results.get("provenance", {}).get("method", "run")
    return plot_accuracy_matrix(results["R"], results["tasks"], results.get("row_labels"),
                                Path(out_dir) / "accuracy_matrix.png", title=title or f"{method}: accuracy matrix R")


def plot_cpi_ft(out_dir):
    """Draw a CPI-FT run's ``overlap.png`` (from ``clusters.json``) and ``accuracy_matrix.png`` (from ``results.json``).

    Returns:
        The paths written (the overlap first; the matrix once SFT has a stage).

    Raises:
        ArtifactNotFoundError: ``out_dir`` holds no ``clusters.json`` (step 2 has not run).
    """
    import json
    from pathlib import Path

    from trace_transfer.errors import ArtifactNotFoundError

    out = Path(out_dir)
    clusters_path = out / "clusters.json"
    if not clusters_path.is_file():
        raise ArtifactNotFoundError(f"{clusters_path} not found; point at a `cpi-ft` run directory")
    c = json.loads(clusters_path.read_text())
    written = [plot_overlap_heatmap(c["jaccard"], c["names"], out / "overlap.png", groups=c["groups"], tau=c["tau"])]
    if (out / "results.json").is_file():
        matrix = plot_run(out)
        if matrix is not None:
            written.append(matrix)
    return written


# --------------------------------------------------------------------------------------------------
# Cost-accuracy frontier (transfer against cheap target passes)
# --------------------------------------------------------------------------------------------------


def plot_cost_accuracy(points, out_path="cost_accuracy.png", title=None):
    """Average accuracy against target cost: one point per method, error bars = std over seeds.

    Args:
        points: ``{method: (cost, mean accuracy, std)}``; cost is the method's forward+backward
            passes on the target per task relative to a native probe (0 = nothing run on the target).
        out_path: PNG path.

    Returns:
        The written path.

    Example:
        >>> plot_cost_accuracy({"trace-lf": (1.0, 43.4, 0.8), "transfer-fisher": (0.16, 40.3, 2.6)}, "frontier.png")
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    markers = "osD^vP*Xh<>"
    for i, (name, (cost, mean, std)) in enumerate(sorted(points.items(), key=lambda kv: (kv[1][0], -kv[1][1]))):
        # A legend, not labels at the points: methods of equal cost (every refine signal at K passes)
        # sit on one x, where labels would overlap or land next to the wrong point.
        ax.errorbar([100 * cost], [mean], yerr=[std or 0.0], fmt=markers[i % len(markers)], capsize=3, label=name)
    ax.legend(fontsize=7, loc="best")
    ax.set_xlabel("target passes per task (% of a native probe)")
    ax.set_ylabel("average accuracy (%)")
    ax.set_title(title or "cost-accuracy: how the target core is chosen")
    ax.grid(alpha=0.3)
    return _save(fig, out_path)
