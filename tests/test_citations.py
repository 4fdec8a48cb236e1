"""The code and its docs cite only what ships with them: DESIGN.md is a workplace brief outside the
repository, so a "DESIGN §4" pointer leaves a reader with nothing to open (issue 15.8)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"DESIGN(\.md)?\s*§|shared/DESIGN")
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".txt", ".cfg"}


def test_no_file_cites_the_unshipped_design_brief():
    roots = [ROOT / d for d in ("trace_transfer", "examples", "bench", "docs", "tests")] + [ROOT / "README.md"]
    files = [f for r in roots for f in ([r] if r.is_file() else r.rglob("*"))
             if f.is_file() and f.suffix in SUFFIXES and f != Path(__file__).resolve()]
    hits = [f"{f.relative_to(ROOT)}:{n}" for f in files
            for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1) if CITATION.search(line)]
    assert not hits, f"state the cited fact inline or point to a doc in the repo: {hits}"
