"""Write docs/CLI.md from the click commands' own --help, so the reference cannot drift.

    python tools/gen_cli_reference.py            # rewrite docs/CLI.md
    python tools/gen_cli_reference.py --check    # exit 1 if docs/CLI.md is stale (tests run this)
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "docs" / "CLI.md"


def _help(cmd: click.Command, path: list[str]) -> str:
    ctx = click.Context(cmd, info_name=" ".join(path), terminal_width=110, max_content_width=110)
    return cmd.get_help(ctx)


def render() -> str:
    from trace_transfer.cli import main

    parts = ["# CLI reference\n", "Generated from `--help` by `tools/gen_cli_reference.py`; do not edit by hand.\n"]
    parts.append("```text\n" + _help(main, ["trace-transfer"]) + "\n```\n")

    def walk(cmd: click.Command, path: list[str]) -> None:
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                parts.append(f"## `{' '.join([*path, name])}`\n")
                parts.append("```text\n" + _help(sub, [*path, name]) + "\n```\n")
                walk(sub, [*path, name])

    walk(main, ["trace-transfer"])
    return "\n".join(parts)


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET} is stale: run python tools/gen_cli_reference.py", file=sys.stderr)
            sys.exit(1)
    else:
        TARGET.write_text(text)
        print(f"wrote {TARGET}")
