"""Text output of long runs: progress lines with rate and ETA, and tables that survive a pipe.

Both are for output that may end up in a log file rather than a terminal: no control characters, one
line per event, nothing that depends on the terminal's width.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["ProgressLines", "format_duration", "print_rich", "wide_console"]


def format_duration(seconds: float) -> str:
    """``75`` → ``1m15s``; ``4000`` → ``1h06m``; under a minute ``12s``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class ProgressLines:
    """A ``(stage, done, total)`` progress callback that writes plain lines with rate and ETA.

    One line at every ``every`` share of a stage (10 % by default), also after ``max_interval``
    seconds without one (a slow loop under load still says it is alive), and at its end; the rate
    counts from the stage's first report, so a slow start-up (model load) does not distort it.
    ``quiet_for``: say nothing about a stage until it has run that long (a pipeline of many
    seconds-long stages would drown in lines); a stage that ends sooner says nothing at all.
    A ``total`` of None (unknown length) gives ``stage done steps · rate`` every ``max_interval``.

    Example:
        >>> tick = ProgressLines(print)
        >>> for step in range(1, 201): tick("pretrain", step, 200)
        pretrain 20/200 (10%) · 41.3 steps/s · ETA 4s
    """

    def __init__(self, say: Callable[[str], None], every: float = 0.1, unit: str = "steps", indent: str = "",
                 clock: Callable[[], float] = time.monotonic, max_interval: float | None = None,
                 quiet_for: float = 0.0) -> None:
        self.say, self.every, self.unit, self.indent, self.clock = say, every, unit, indent, clock
        self.max_interval, self.quiet_for = max_interval, quiet_for
        self._start: dict[str, tuple[float, int]] = {}
        self._next: dict[str, int] = {}
        self._last: dict[str, float | None] = {}  # when the stage last got a line (None: never)

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        now = self.clock()
        if stage not in self._start or done < self._start[stage][1]:
            self._start[stage] = (now, done)
            self._next[stage] = 0
            self._last[stage] = None
        started, last = self._start[stage][0], self._last[stage]
        if now - started < self.quiet_for and (total is None or done < total):
            return
        finished = total is not None and done >= total
        overdue = self.max_interval is not None and now - (started if last is None else last) >= self.max_interval
        if total is None:
            if overdue:
                self._last[stage] = now
                self.say(self.indent + self.line(stage, done, None, now))
            return
        if not total or (finished and self.quiet_for and last is None and now - started < self.quiet_for):
            return
        if not (finished or done >= self._next[stage] or overdue):
            return
        self._next[stage] = done + max(1, int(total * self.every))
        self._last[stage] = now
        self.say(self.indent + self.line(stage, done, total, now))

    def line(self, stage: str, done: int, total: int | None, now: float | None = None) -> str:
        """``stage done/total (pct) · rate · ETA`` (or the elapsed time once the stage is done)."""
        t0, d0 = self._start.get(stage, (now, done))
        elapsed = (now if now is not None else self.clock()) - t0
        text = f"{stage} {done} {self.unit}" if total is None else f"{stage} {done}/{total} ({100 * done // max(1, total)}%)"
        if done > d0 and elapsed > 0:
            rate = (done - d0) / elapsed
            text += f" · {rate:.1f} {self.unit}/s"
            if total is not None:
                text += f" · took {format_duration(elapsed)}" if done >= total else \
                    f" · ETA {format_duration((total - done) / rate)}"
        return text


def wide_console():
    """A rich Console for tables on stdout.

    In a terminal rich fits tables to its width. Without one (a pipe, a CI log) rich assumes 80
    columns and folds every header and cell that does not fit into fragments on extra lines; nothing
    re-wraps a log, so there tables keep their natural width instead (rich never pads a table to the
    console's width, so the large width only lifts the limit).
    """
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, _LOG_WIDTH))


_LOG_WIDTH = 400


def print_rich(*renderables: Any) -> None:
    """Print rich renderables (tables) on stdout through :func:`wide_console`."""
    console = wide_console()
    for r in renderables:
        console.print(r)
