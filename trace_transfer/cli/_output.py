"""``--force``: the one switch that lets a command overwrite outputs it did not create in this run.

Without it every command refuses an existing output (file, or non-empty directory) before doing any
work; see :func:`trace_transfer.checkpoint.output_dir`.
"""

from __future__ import annotations

import click

force_option = click.option("--force", is_flag=True,
                            help="Overwrite an existing output (default: refuse, before any work is done).")
