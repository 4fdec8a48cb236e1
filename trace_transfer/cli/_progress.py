"""Progress display for long CLI work, on stderr: one rich bar per stage with rate and ETA in a
terminal, plain lines (``stage 120/1200 (10%) · 3.2 steps/s · ETA 4m41s``) otherwise.

Library functions report ``(stage, done, total)``; this turns that into bars without the library
knowing about terminals. Without a terminal (CI logs, ``2> log``) the bars' control characters would
garble the log, so it gets one line per 10 % of each stage (and at least every 30 s) instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.text import Text


class _RateColumn(ProgressColumn):
    """Units per second (rich's own speed column counts bytes)."""

    def render(self, task) -> Text:
        return Text(f"{task.speed:.1f}/s" if task.speed else "", style="progress.data.speed")


@contextlib.contextmanager
def progress_bars(enabled: bool = True) -> Iterator[Callable[[str, int, int], None]]:
    """Yield a ``(stage, done, total)`` callback that drives one bar per stage name."""
    import click

    from trace_transfer.report.console import ProgressLines

    console = Console(stderr=True)
    if not enabled:
        yield lambda *_: None
        return
    if not console.is_terminal:
        # Also every 30 s: under load 10 % of a long stage can take minutes of silence.
        yield ProgressLines(lambda line: click.echo(line, err=True), unit="it", max_interval=30.0)
        return
    bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False)
    ids: dict[str, int] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in ids:
            ids[stage] = bars.add_task(stage, total=total)
        bars.update(ids[stage], completed=done, total=total)

    with bars:
        yield update
