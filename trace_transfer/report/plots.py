"""Plots: PNG figures for reports (importance, CKA, accuracy matrix). Each function is self-contained."""

from __future__ import annotations


def _save(fig, out_path):
    """Lay out, write the PNG atomically (a crash never leaves half a file), close; return the Path."""
    from pathlib import Path

    import matplotlib.pyplot as plt

    from trace_transfer.checkpoint import atomic_path

    fig.tight_layout()
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return out_path


# --------------------------------------------------------------------------------------------------
# Accuracy matrix (continual learning)
# --------------------------------------------------------------------------------------------------


def plot_accuracy_matrix(R, task_names, row_labels=None, out_path="accuracy_matrix.png", title=None, vmin=0.0, vmax=1.0):
    """Heatmap of the accuracy matrix ``R`` (row 0 = before any stage), each cell annotated.

    Args:
        R: ``(S+1) x T`` scores. task_names: column labels. row_labels: default ``before``, ``after stage i``.
        out_path: PNG path (written atomically). vmin/vmax: colour range (scores in [0, 1] by default).

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: runs on servers and in CI
    import matplotlib.pyplot as plt

    rows = [list(map(float, r)) for r in R]
    labels = list(row_labels) if row_labels is not None else ["before"] + [f"after stage {i}" for i in range(1, len(rows))]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(task_names), 1.0 + 0.55 * len(rows)))
    im = ax.imshow(rows, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(task_names)), labels=list(task_names))
    ax.set_yticks(range(len(rows)), labels=labels)
    ax.set_xlabel("evaluated task")
    for i, r in enumerate(rows):
        for j, v in enumerate(r):
            # dark text on the bright end of viridis, light text elsewhere
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="black" if v > (vmin + vmax) * 0.6 else "white")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title:
        ax.set_title(title)
    return _save(fig, out_path)


# --------------------------------------------------------------------------------------------------
# Importance heatmap (TRACE Fig. 6: layers × modules, projections left, norms right)
# --------------------------------------------------------------------------------------------------


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
    import matplotlib

    matplotlib.use("Agg")  # headless: runs on servers and in CI
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.array(values, dtype=float).reshape(len(layers), len(modules))
    short = [m.removesuffix(".weight").split(".")[-1] if m.endswith(".weight") else ".".join(m.split(".")[-2:])
             for m in modules]
    short = [s if short.count(s) == 1 else m.removesuffix(".weight") for s, m in zip(short, modules)]
    fig, ax = plt.subplots(figsize=(2.5 + 0.55 * len(modules), 2.2 + 0.28 * len(layers)))
    cmap = matplotlib.colormaps["magma"].with_extremes(bad="#f0f0f0")
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(modules)), labels=short, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), labels=[str(la) for la in layers])
    ax.set_ylabel("layer")
    if selected is not None:
        sel = np.array(selected, dtype=float).reshape(grid.shape)
        ys, xs = np.nonzero(np.nan_to_num(sel) > 0)
        ax.scatter(xs, ys, s=8, c="cyan", marker="o", linewidths=0)
        ax.set_xlabel("module (dots: tensors with selected units)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=value_label)
    if title:
        ax.set_title(title)
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
    for i, (name, (cost, mean, std)) in enumerate(sorted(points.items(), key=lambda kv: (kv[1][0], kv[1][1]))):
        ax.errorbar([100 * cost], [mean], yerr=[std or 0.0], fmt="o", capsize=3)
        # Staggered labels: methods of equal cost (e.g. every refine signal at 16 passes) sit on one x.
        ax.annotate(name, (100 * cost, mean), textcoords="offset points", xytext=(5, 4 - 11 * (i % 3)), fontsize=8)
    ax.set_xlabel("target passes per task (% of a native probe)")
    ax.set_ylabel("average accuracy (%)")
    ax.set_title(title or "cost-accuracy: how the target core is chosen")
    ax.grid(alpha=0.3)
    return _save(fig, out_path)
