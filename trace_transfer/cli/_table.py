"""Plain-text tables for CLI output (aligned columns, no colour: pipes and logs stay readable)."""

from __future__ import annotations

import click


def echo_table(headers: list[str], rows: list[list[object]]) -> None:
    """Print ``rows`` under ``headers`` with left-aligned columns and a dashed rule."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    click.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    click.echo("  ".join("-" * w for w in widths))
    for r in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
