"""The one place where the CLI turns a deliberate error into `Error: <message>` and exit code 1.

Commands call the library and let its errors propagate; :class:`Group` catches them around every
sub-command. What counts as deliberate is :class:`~trace_transfer.errors.TraceTransferError`: its
messages are written for users (the offending input, the valid choices, the next step), so a
traceback would only bury them. ``-vv`` logs the traceback too, for bug reports.

Anything else (``KeyError``, ``RuntimeError`` from torch, a plain ``ValueError``) is a bug or an
unanticipated input, and keeps its full traceback: hiding it behind one line would make the bug
invisible. The fix for such a traceback is a ``TraceTransferError`` raised where the input is
checked, not a broader catch here. Click's own usage errors and ``SystemExit`` pass through untouched.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import click

from trace_transfer.errors import TraceTransferError

log = logging.getLogger("trace_transfer.cli")


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Re-raise a :class:`TraceTransferError` as a :class:`click.ClickException` (``Error: ...``, exit 1)."""
    try:
        yield
    except TraceTransferError as exc:
        log.debug("where the error below was raised", exc_info=exc)
        raise click.ClickException(str(exc)) from exc


class Group(click.Group):
    """A click group whose commands' deliberate errors print as one ``Error: ...`` line (exit code 1).

    Used by the top-level ``trace-transfer`` group and by the nested groups (``coreset``, ``rules``,
    ``delta``), so a nested group invoked on its own (as tests do) behaves the same.
    """

    def invoke(self, ctx: click.Context) -> Any:
        with user_errors():
            return super().invoke(ctx)
