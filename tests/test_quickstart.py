"""The README's Quickstart, run as written from a copy of the repo root, at a tiny size.

What a new user does after README command (1): paste the Quickstart block in the repo root. The block
is read from the README itself (so the test follows any edit to it); only the sizes are shrunk.
Measured: 578 s on a 2-core machine under a load of ~16 (nine CLI processes, each loading torch);
at full size from a pretrained base the same lines print math 2 % -> 74 % after its stage.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# README size -> test size. Every substitution must apply (a renamed flag fails the test, not skips it).
SHRINK = [
    ("--layers 3 --hidden 96", "--layers 1 --hidden 32"),
    ("--steps 1200", "--steps 20 --eval-limit 5"),
    ("--max-steps 50", "--max-steps 2 --fisher-batches 2"),
    ("--max-steps 80", "--max-steps 2"),
    ("--eval-limit 50", "--eval-limit 4"),
]


def quickstart_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, re.S)[1]


def _repo_root_copy(dest: Path) -> Path:
    """The repo root's layout (files and folders a clone has), without the venv, git data and runs."""
    skip = {".git", ".venv", "runs", ".pytest_cache", "__pycache__", "build", "dist"}
    dest.mkdir()
    for entry in ROOT.iterdir():
        if entry.name in skip or entry.name.endswith(".egg-info"):
            continue
        if entry.is_dir():
            shutil.copytree(entry, dest / entry.name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(entry, dest / entry.name)
    return dest


@pytest.mark.slow
def test_readme_quickstart_runs_from_the_repo_root(tmp_path):
    script = quickstart_block()
    for big, small in SHRINK:
        assert big in script, f"README Quickstart no longer contains {big!r}; update SHRINK"
        script = script.replace(big, small)
    root = _repo_root_copy(tmp_path / "clone")
    # `trace-transfer` as installed by command (1), pinned to this interpreter
    prelude = f'trace-transfer() {{ "{sys.executable}" -m trace_transfer "$@"; }}\nset -euo pipefail\n'
    proc = subprocess.run(["bash", "-c", prelude + script], cwd=root, capture_output=True, text=True, timeout=900,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    qs = root / "runs" / "qs"
    results = json.loads((qs / "trace" / "results.json").read_text())
    assert len(results["R"]) == 4 and results["tasks"] == ["math", "medical", "code"]
    assert (qs / "math.png").stat().st_size > 0
    # verify-frozen exits 1 on any change outside the core (set -e would have stopped the script)
    assert "checked" in proc.stdout and "FAIL" not in proc.stdout, proc.stdout[-2000:]
