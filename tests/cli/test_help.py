"""`--help` of every command is fast: it loads no torch or transformers, and shows an example.

The check runs in a fresh interpreter (this test process has long since imported torch), one
subprocess for all commands: each `--help` goes through click's CliRunner and the heavy modules are
looked up in sys.modules after each, so a failure names the first command that pulled them in.
"""

from __future__ import annotations

import json
import subprocess
import sys

import click

from trace_transfer.cli import main

HEAVY = ("torch", "transformers")

_SCRIPT = """
import json, sys
import click
from click.testing import CliRunner
from trace_transfer.cli import main

def paths(group, prefix):
    for name, cmd in group.commands.items():
        yield [*prefix, name]
        if isinstance(cmd, click.Group):
            yield from paths(cmd, [*prefix, name])

heavy = %r
report = {"at_import": [m for m in heavy if m in sys.modules], "commands": []}
runner = CliRunner()
for path in [[], *paths(main, [])]:
    res = runner.invoke(main, [*path, "--help"])
    report["commands"].append({"path": path, "exit_code": res.exit_code, "output": res.output,
                               "heavy": [m for m in heavy if m in sys.modules]})
print(json.dumps(report))
"""


def _all_paths(group: click.Group, prefix: list[str]) -> list[list[str]]:
    out = []
    for name, cmd in group.commands.items():
        out.append([*prefix, name])
        if isinstance(cmd, click.Group):
            out += _all_paths(cmd, [*prefix, name])
    return out


def test_help_imports_no_torch_and_shows_an_example():
    proc = subprocess.run([sys.executable, "-c", _SCRIPT % (HEAVY,)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["at_import"] == [], f"importing trace_transfer.cli loads {report['at_import']}"
    seen = [c["path"] for c in report["commands"]]
    assert seen[1:] == _all_paths(main, []), "the subprocess saw other commands than this process"
    assert len(seen) > 20
    for c in report["commands"]:
        name = " ".join(["trace-transfer", *c["path"]])
        assert c["exit_code"] == 0, f"{name} --help failed:\n{c['output']}"
        assert not c["heavy"], f"`{name} --help` imports {c['heavy']}: move that import into the command body"
        assert "example" in c["output"].lower(), f"`{name} --help` shows no example"
