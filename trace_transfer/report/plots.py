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
