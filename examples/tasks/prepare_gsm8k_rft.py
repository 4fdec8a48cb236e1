"""Write the data of examples/tasks/gsm8k_rft.yaml: GSM8K-RFT for training, GSM8K test for evaluation.

GSM8K-RFT is distributed as JSONL in github.com/OFA-Sys/gsm8k-ScRel (``data/rft/*.jsonl``, rows
``{"query", "response"}``), the GSM8K test set as the hub dataset ``openai/gsm8k`` (config ``main``,
rows ``{"question", "answer"}``). A task spec reads one dataset, so both halves are written with the
RFT column names:

    python examples/tasks/prepare_gsm8k_rft.py --rft ~/gsm8k-ScRel/data/rft/u13b.jsonl
    python examples/tasks/prepare_gsm8k_rft.py --rft u13b.jsonl --test ~/grade-school-math/test.jsonl  # offline

writes ``examples/tasks/data/gsm8k_rft/train.jsonl`` and ``test.jsonl`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ANSWER_MARK = "####"  # every GSM8K / RFT solution ends in "#### <number>"; the task's metric reads it


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def as_query_response(row: dict, where: str) -> dict:
    query = row.get("query", row.get("question"))
    response = row.get("response", row.get("answer"))
    if not isinstance(query, str) or not isinstance(response, str):
        raise SystemExit(f"{where}: expected query/response or question/answer strings, got keys {sorted(row)}")
    if ANSWER_MARK not in response:
        raise SystemExit(f"{where}: the solution has no '{ANSWER_MARK} <answer>' line: {response[-80:]!r}")
    return {"query": query, "response": response}


def load_test(ref: str) -> list[dict]:
    if Path(ref).exists():
        return read_jsonl(Path(ref))
    import datasets  # a hub id: needs network access or a local datasets cache

    return [dict(r) for r in datasets.load_dataset(ref, "main", split="test")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rft", required=True, type=Path, help="an RFT file of gsm8k-ScRel (data/rft/*.jsonl)")
    ap.add_argument("--test", default="openai/gsm8k", help="hub id (config main, split test) or a local GSM8K test .jsonl")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "data" / "gsm8k_rft")
    args = ap.parse_args()

    train = [as_query_response(r, f"{args.rft} row {i}") for i, r in enumerate(read_jsonl(args.rft))]
    test = [as_query_response(r, f"{args.test} row {i}") for i, r in enumerate(load_test(args.test))]
    test_questions = {r["query"].strip() for r in test}
    leaked = sum(r["query"].strip() in test_questions for r in train)
    if leaked:
        raise SystemExit(f"{leaked} training rows ask a test question: is --rft a training file?")
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        path = args.out / f"{name}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        tmp.replace(path)
        print(f"wrote {path} ({len(rows):,} rows, {len({r['query'] for r in rows}):,} questions)")


if __name__ == "__main__":
    main()
