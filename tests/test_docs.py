"""Documentation that is generated from the code must match the code."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_is_current():
    # In a fresh interpreter: help texts list the registered strategies/methods, and other tests in
    # this process register plug-ins.
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_cli_reference.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr + "\nrun: python tools/gen_cli_reference.py"


def test_readme_names_every_command():
    from trace_transfer.cli import main

    readme = (ROOT / "README.md").read_text()
    missing = [name for name in main.commands if f"`{name}" not in readme]
    assert not missing, f"README's CLI table lacks: {missing}"


def test_ci_runs_exactly_readme_command_2():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    readme = (ROOT / "README.md").read_text()
    assert ci in readme, "README command (2) and .ci/run differ"
    assert "trace-transfer demo" in readme.split("# (1)")[1].splitlines()[1]  # command (1) runs the demo


def test_both_readme_commands_and_ci_install_from_the_constraints_file():
    readme = (ROOT / "README.md").read_text()
    commands = [readme.split(f"# ({i})")[1].splitlines()[1] for i in (1, 2)]
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    for line in [*commands, ci]:
        assert "pip install" in line and all("-c constraints.txt" in part for part in line.split("&&") if "pip install" in part), line
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert {"torch", "transformers", "tokenizers", "safetensors", "accelerate", "numpy"} <= set(pins)
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme  # the CPU-only option, offered
