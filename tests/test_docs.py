"""Documentation that is generated from the code must match the code."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_cli_reference_is_current():
    spec = importlib.util.spec_from_file_location("gen_cli_reference", ROOT / "tools" / "gen_cli_reference.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (ROOT / "docs" / "CLI.md").read_text() == gen.render(), "run: python tools/gen_cli_reference.py"


def test_readme_names_every_command():
    from trace_transfer.cli import main

    readme = (ROOT / "README.md").read_text()
    missing = [name for name in main.commands if f"`{name}" not in readme]
    assert not missing, f"README's CLI table lacks: {missing}"
