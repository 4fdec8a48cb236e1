"""Worker for tests/probe/test_probe_distributed.py, run by `torchrun --nproc_per_node=2` with
DS_ACCELERATOR=cpu: the distributed probe under each ZeRO stage named, into OUT/<phase>.

usage: _ds_probe_ranks.py MODEL OUT zero3,zero2,zero3-base,zero3-gc  (zero3 goes through the CLI;
-gc: with gradient checkpointing)

Each rank also writes OUT/<phase>-rank<r>.json: how often the first decoder layer's MLP ran during the
Fisher pass (once per micro-batch, twice when the backward pass recomputes the layer).
"""

import sys
from pathlib import Path

# The single-process reference uses batch 4; here 2 ranks × micro-batch 2 make the same global batch.
SETTINGS = dict(max_steps=3, lr=1e-3, seq_len=32, seed=0, precision="fp32")  # each one a CLI flag too
SINGLE_BATCH, WORLD = 4, 2


def write_task(folder: Path) -> Path:
    """A task YAML of sums with zero-padded answers: every sequence has the same number of tokens and
    of response tokens. Both the warm start and the Fisher weight ranks by their response tokens (exact
    for uneven answers too: tests/train/test_ds_token_loss.py); equal lengths keep this test about the
    probe, not about padding."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    for split, offset in (("train", 0), ("eval", 16)):
        rows = [{"prompt": f"{i * 7 % 50:02d}+{i * 13 % 50:02d}=", "response": f"{i * 7 % 50 + i * 13 % 50:03d}"}
                for i in range(offset, offset + 16)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = folder / "fixed_sums.yaml"
    task.write_text("name: fixed-sums\ndata: {files: {train: train.jsonl, eval: eval.jsonl}}\n"
                    "splits: {train: train, eval: eval}\nmetric: exact_match\n")
    return task


def zero(stage: int) -> dict:
    conf = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "zero_optimization": {"stage": stage}, "steps_per_print": 1000, "wall_clock_breakdown": False}
    if stage == 3:  # tiny model: every tensor goes through partitioning rather than staying persistent
        conf["zero_optimization"].update({"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0})
    return conf


def count_fisher_layer_runs():
    """Wrap the distributed probe's Fisher-pass checkpointing to count the first layer's MLP forwards."""
    import contextlib

    import trace_transfer.probe.distributed as dist_probe
    from trace_transfer.probe.fisher import checkpoint_layers

    real, calls = dist_probe.eval_checkpointing, [0]

    @contextlib.contextmanager
    def counting(model, enabled=True):
        hook = checkpoint_layers(model)[0].mlp.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        try:
            with real(model, enabled=enabled):
                yield
        finally:
            hook.remove()

    dist_probe.eval_checkpointing = counting
    return calls


def main(model: str, out: Path, phases: list[str]) -> None:
    import json

    import torch.distributed as dist

    from trace_transfer.cli import main as cli
    from trace_transfer.probe import ProbeConfig
    from trace_transfer.probe.distributed import probe_deepspeed

    task = str(out / "task" / "fixed_sums.yaml")  # the test writes it and zero3.json before the launch
    calls = count_fisher_layer_runs()
    for phase in phases:
        calls[0] = 0
        stage = int(phase[len("zero")])
        at = "base" if phase.endswith("-base") else "probe"
        if phase == "zero3":  # through the CLI: --deepspeed, rank-0 output claim, flags -> ProbeConfig
            args = ["probe", "--model", model, "--task", task, "--out", str(out / phase), "--deepspeed",
                    str(out / "zero3.json"), "--batch-size", str(SINGLE_BATCH // WORLD)]
            for key, value in SETTINGS.items():
                args += [f"--{key.replace('_', '-')}", str(value)]
            cli.main(args, standalone_mode=False)
        else:
            cfg = ProbeConfig.from_flat(**SETTINGS, batch_size=SINGLE_BATCH // WORLD, fisher_at=at,
                                        gradient_checkpointing=phase.endswith("-gc"))
            probe_deepspeed(model, task, out / phase, cfg, ds_config=zero(stage))
        (out / f"{phase}-rank{dist.get_rank()}.json").write_text(json.dumps({"fisher_mlp_calls": calls[0]}))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3].split(","))
