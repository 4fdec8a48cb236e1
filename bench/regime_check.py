"""Check the tiny-scale regime of the built-in synthetic stream (what it needs: below). Not a test; prints numbers.

1. Build a char-level Llama and pretrain it on ``synthetic:general`` (or reuse ``--base``).
2. Sequential full fine-tuning over the stream (default math -> medical -> code), ``--stage-steps``
   steps each at ``--lr``, evaluating every domain task and every base skill before the first stage
   and after each stage.

What the regime needs: every skill mastered after pretraining; each domain task near 0 before its
stage (a new format) and high after it (learnable in ~150 steps); later stages cut earlier tasks and
base skills clearly but not to zero (partial forgetting).

    python bench/regime_check.py --hidden 128 --layers 4 --pretrain-steps 2400 --threads 2
    python bench/regime_check.py --base runs/regime/base --lr 1e-4      # reuse a pretrained base
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from trace_transfer.data import collate, load_task, pad_id_of, tokenize_examples
from trace_transfer.data.synthetic import SKILLS
from trace_transfer.evaluation.metrics import evaluate
from trace_transfer.models import build_tiny_model, load_model, load_tokenizer
from trace_transfer.train.pretrain import pretrain
from trace_transfer.train.loop import TrainConfig, train


def scores(model, tok, tasks, limit):
    return {t.name: round(float(evaluate(model, tok, t, limit=limit, batch_size=64).score), 3) for t in tasks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/regime")
    ap.add_argument("--base", default=None, help="pretrained base dir to reuse (skips building/pretraining)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--pretrain-steps", type=int, default=2400)
    ap.add_argument("--pretrain-lr", type=float, default=1e-3)
    ap.add_argument("--stream", default="math,medical,code")
    ap.add_argument("--stage-steps", type=int, default=150)
    ap.add_argument("--lr", type=float, nargs="+", default=[3e-4])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--eval-limit", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)

    base = Path(args.base) if args.base else out / f"base-d{args.hidden}-l{args.layers}-s{args.seed}"
    if not (base / "config.json").exists():
        init = build_tiny_model("llama", out / f"init-d{args.hidden}-l{args.layers}-s{args.seed}", layers=args.layers,
                                hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads, seed=args.seed,
                                overwrite=True)
        t0 = time.time()
        res = pretrain(init, base, steps=args.pretrain_steps, lr=args.pretrain_lr, batch_size=args.batch_size,
                       seq_len=32, seed=args.seed, eval_limit=args.eval_limit,
                       progress=lambda _s, d, n: print(f"  pretrain {d}/{n}", flush=True) if d % 200 == 0 else None)
        print(f"pretrained in {time.time() - t0:.0f}s, final loss {res.final_loss:.3f}: {res.scores}", flush=True)
    tok = load_tokenizer(base)
    n_params = sum(p.numel() for p in load_model(base).parameters())
    stream = [load_task(f"synthetic:{n}") for n in args.stream.split(",")]
    skills = [load_task(f"synthetic:general?skills={s}") for s in SKILLS]
    evals = stream + skills
    pad = pad_id_of(tok)

    for lr in args.lr:
        model = load_model(base)
        rows = [("base", scores(model, tok, evals, args.eval_limit))]
        print(f"\n== d={args.hidden} layers={args.layers} ({n_params:,} params), full FT lr {lr}, "
              f"{args.stage_steps} steps/stage, batch {args.batch_size}", flush=True)
        for k, task in enumerate(stream):
            feats = tokenize_examples(tok, task.train_examples(), 32)

            def batches(epoch, feats=feats):
                g = torch.Generator().manual_seed(args.seed * 1000 + k * 10 + epoch)
                order = torch.randperm(len(feats), generator=g).tolist()
                for i in range(0, len(order) - args.batch_size + 1, args.batch_size):
                    yield collate([feats[j] for j in order[i : i + args.batch_size]], pad)

            cfg = TrainConfig(lr=lr, max_steps=args.stage_steps, batch_size=args.batch_size, seq_len=32,
                              warmup_ratio=0.05, seed=args.seed)
            t0 = time.time()
            res = train(model, batches, cfg)
            rows.append((task.name, scores(model, tok, evals, args.eval_limit)))
            print(f"  stage {task.name}: {time.time() - t0:.0f}s, loss {res.losses[0]:.3f} -> "
                  f"{sum(res.losses[-10:]) / 10:.3f}", flush=True)
        names = [t.name for t in evals]
        print("after stage  " + " ".join(f"{n[:13]:>13}" for n in names))
        for label, s in rows:
            print(f"{label:<12} " + " ".join(f"{s[n]:>13.2f}" for n in names))
        first = stream[0].name
        print(f"first task {first}: {rows[1][1][first]:.2f} after its stage -> {rows[-1][1][first]:.2f} at the end; "
              f"base skills mean {sum(rows[0][1][s.name] for s in skills) / len(skills):.2f} -> "
              f"{sum(rows[-1][1][s.name] for s in skills) / len(skills):.2f}", flush=True)
        (out / f"regime-d{args.hidden}-l{args.layers}-lr{lr}-s{args.seed}.json").write_text(
            json.dumps({"args": vars(args), "lr": lr, "params": n_params, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
