"""`run --dry-run` (every command, nothing created), `run --only STEP`, and multi-node launch lines."""

from __future__ import annotations

import json
import shlex

import pytest
import yaml
from click.testing import CliRunner

from trace_transfer.cli import main
from trace_transfer.errors import TraceTransferError
from trace_transfer.pipeline.config import load_pipeline
from trace_transfer.pipeline.run import _launch_distributed

SMALL = {
    "name": "small",
    "source": {"build": {"arch": "llama", "layers": 2, "hidden": 32, "tokenizer": "char"}},
    "target": {"build": {"arch": "llama", "layers": 2, "hidden": 32, "tokenizer": "char"}},
    "tasks": ["synthetic:math"],
    "probe": {"max_steps": 1, "batch_size": 4, "seq_len": 32, "fisher_batches": 1, "max_examples": 16},
    "training": {"lr": 1e-3, "max_steps": 1, "batch_size": 4, "seq_len": 32},
    "eval": {"limit": 2, "batch_size": 2},
    "methods": ["full", "trace-lf"],
}
STEPS = ["models/source", "models/target", "probe/target/math", "cores/target-lf", "finetune/full/seed0",
         "finetune/trace-lf/seed0", "report"]


def _config(tmp_path, **over) -> str:
    (tmp_path / "ds.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto"}))
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({**SMALL, **over}))
    return str(path)


def _dry(args: list[str]) -> list[str]:
    res = CliRunner().invoke(main, ["run", *args, "--dry-run"])
    assert res.exit_code == 0, res.output
    return res.output.splitlines()


def test_dry_run_lists_every_step_in_order_and_creates_nothing(tmp_path):
    run_dir = tmp_path / "run"
    lines = _dry([_config(tmp_path), "--out", str(run_dir), "--device", "cpu"])
    commands = [ln for ln in lines if not ln.startswith("#")]
    assert [shlex.split(c)[-1] for c in commands] == STEPS
    assert all(shlex.split(c)[:2] == ["trace-transfer", "run"] and "--device cpu" in c for c in commands)
    assert not run_dir.exists()


@pytest.mark.slow
def test_the_printed_commands_run_the_pipeline_a_later_run_skips_everything(tmp_path):
    cfg, run_dir = _config(tmp_path), tmp_path / "run"
    for line in (ln for ln in _dry([cfg, "--out", str(run_dir)]) if not ln.startswith("#")):
        res = CliRunner().invoke(main, shlex.split(line)[1:])
        assert res.exit_code == 0, (line, res.output)
    assert (run_dir / "report" / "step.json").exists()
    res = CliRunner().invoke(main, ["run", cfg, "--out", str(run_dir)])
    assert res.exit_code == 0 and "[run ]" not in res.output and res.output.count("[skip]") == len(STEPS)


def test_only_refuses_a_step_whose_inputs_are_not_done(tmp_path):
    cfg, run_dir = _config(tmp_path), tmp_path / "run"
    res = CliRunner().invoke(main, ["run", cfg, "--out", str(run_dir), "--only", "probe/target/math"])
    assert res.exit_code == 1 and "consumes models/target, which is not done" in res.output
    res = CliRunner().invoke(main, ["run", cfg, "--out", str(run_dir), "--only", "models/target"])
    assert res.exit_code == 0, res.output
    assert (run_dir / "models/target/step.json").exists() and not (run_dir / "models/source").exists()


def test_multi_node_torchrun_lines_carry_nnodes_rank_and_rendezvous(tmp_path):
    cfg = _config(tmp_path, methods=["full"], launch={"deepspeed": "ds.json", "nproc_per_node": 8, "nnodes": 2,
                                                       "rdzv_endpoint": "node0:29500"})
    lines = _dry([cfg, "--out", "runs/x"])
    launch = [i for i, ln in enumerate(lines) if ln.startswith("torchrun")]
    assert len(launch) == 1 and lines[launch[0] - 1] == "# every node"
    argv = lines[launch[0]]
    for part in ("--nnodes=2", "--nproc_per_node=8", "--node_rank=${NODE_RANK:?}", "--rdzv_endpoint=node0:29500",
                 "-m trace_transfer finetune", "--out runs/x/finetune/full/seed0", "--deepspeed"):
        assert part in argv, part
    # The step directory is marked with the hash a real run computes, then the --only line records it.
    assert lines[launch[0] - 3].startswith("printf %s ") and lines[launch[0] - 3].endswith("seed0/.attempt")
    assert lines[launch[0] + 2].endswith("--only finetune/full/seed0")


def test_hostfile_launches_once_with_the_deepspeed_launcher(tmp_path):
    (tmp_path / "hosts").write_text("node0 slots=8\nnode1 slots=8\n")
    cfg = _config(tmp_path, methods=["full"], launch={"deepspeed": "ds.json", "nproc_per_node": 8, "hostfile": "hosts",
                                                       "node_rank": 0})
    lines = _dry([cfg, "--out", "runs/x"])
    launch = next(ln for ln in lines if ln.startswith("deepspeed "))
    assert f"--hostfile={tmp_path / 'hosts'}" in launch and "--num_gpus=8" in launch
    assert "--module trace_transfer finetune" in launch and "# every node" not in lines


def test_cpi_ft_passes_check_and_launches_the_cpi_ft_command_under_deepspeed(tmp_path):
    tasks = ["synthetic:math", "synthetic:medical"]
    cfg = _config(tmp_path, tasks=tasks, methods=["cpi-ft"], launch={"deepspeed": "ds.json", "nproc_per_node": 2})
    res = CliRunner().invoke(main, ["run", cfg, "--check"])
    assert res.exit_code == 0 and "valid" in res.output, res.output
    lines = _dry([cfg, "--out", "runs/x"])
    launch = next(ln for ln in lines if ln.startswith("torchrun"))
    argv = shlex.split(launch)
    assert argv[argv.index("-m") + 1:][:2] == ["trace_transfer", "cpi-ft"]
    assert "--deepspeed" in argv and "--resume" in argv and "--out" in argv
    # Every rank's arguments are ones `trace-transfer cpi-ft` accepts, the tasks in the config's order.
    args = argv[argv.index("cpi-ft") + 1:]
    params = main.commands["cpi-ft"].make_context("cpi-ft", args).params
    assert list(params["tasks"]) == tasks and params["deepspeed_config"] == str(tmp_path / "ds.json")
    assert (params["lr"], params["max_steps"], params["eval_limit"]) == (1e-3, 1, 2)


@pytest.mark.parametrize("launch,problem", [
    ({"deepspeed": "ds.json", "nnodes": 2}, "needs the rendezvous"),
    ({"nnodes": 2, "rdzv_endpoint": "h:1"}, "needs launch.deepspeed"),
    ({"deepspeed": "ds.json", "nnodes": 2, "rdzv_endpoint": "h:1", "node_rank": 2}, "not below nnodes"),
    ({"deepspeed": "ds.json", "hostfile": "missing"}, "'missing' does not exist"),
    ({"device": "gpu"}, "launch.device"),
])
def test_launch_problems_are_config_errors(tmp_path, launch, problem):
    res = CliRunner().invoke(main, ["run", _config(tmp_path, methods=["full"], launch=launch), "--check"])
    assert res.exit_code == 1 and problem in res.output, res.output


def test_a_multi_node_step_is_recorded_never_launched_in_process(tmp_path):
    cfg = load_pipeline(_config(tmp_path, methods=["full"], launch={"deepspeed": "ds.json", "nnodes": 2,
                                                                     "rdzv_endpoint": "h:1"}))
    d = tmp_path / "step"
    d.mkdir()
    with pytest.raises(TraceTransferError, match="across 2 node"):
        _launch_distributed(d, ["-m", "trace_transfer", "finetune"], cfg, print)
    (d / "results.json").write_text(json.dumps({"complete": True, "metrics": {"aa": 0.5}}))
    assert _launch_distributed(d, ["-m", "trace_transfer", "finetune"], cfg, print)["metrics"]["aa"] == 0.5


@pytest.mark.slow
def test_slurm_example_runs_each_command_once_and_launches_on_every_node(tmp_path):
    """examples/slurm/pipeline.sbatch against stub srun/scontrol/torchrun: the one-process steps run once
    (here), the torchrun launch once per node with that node's NODE_RANK."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[2] / "examples" / "slurm" / "pipeline.sbatch"
    cfg = _config(tmp_path, methods=["full"], launch={"deepspeed": "ds.json", "nproc_per_node": 2, "nnodes": 2,
                                                       "rdzv_endpoint": "${HEAD_NODE}:29500"})
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    stubs = {
        "scontrol": "printf 'nodeA\\nnodeB\\n'",
        # srun [options] bash -c CMD: run CMD as each of the job's 2 nodes
        "srun": 'while [ "$1" != bash ]; do shift; done; for i in 0 1; do SLURM_NODEID=$i "$@"; done',
        "torchrun": f'echo "torchrun NODE_RANK=$NODE_RANK $*" >> {log}',
        "tt": f'case " $* " in *" --dry-run "*) exec {sys.executable} -m trace_transfer "$@";; '
              f'*) echo "tt $*" >> {log};; esac',
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node[A-B]",
           "SLURM_NNODES": "2", "TRACE_TRANSFER": "tt"}
    run_dir = tmp_path / "run"
    res = subprocess.run(["bash", str(script), cfg, str(run_dir)], env=env, capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    calls = log.read_text().splitlines()
    launches = [c for c in calls if c.startswith("torchrun")]
    assert [c.split()[1] for c in launches] == ["NODE_RANK=0", "NODE_RANK=1"]
    assert all("--node_rank=0" in c or "--node_rank=1" in c for c in launches)
    assert all("--rdzv_endpoint=nodeA:29500" in c for c in launches)
    only = [c.split("--only ")[1] for c in calls if c.startswith("tt run")]
    assert only == ["models/source", "models/target", "finetune/full/seed0", "report"], only
    assert (run_dir / "finetune/full/seed0/.attempt").exists()


def test_torchrun_passes_every_launched_argument_through_unchanged(tmp_path):
    """torchrun's argparse prefix-matches the script's arguments against its own options (``--monitor``
    would be taken for ``--monitor-interval`` and the launch would die), so every argument list the
    pipeline launches must come out of torchrun's own parser exactly as it went in, and parse in ours."""
    from torch.distributed.run import get_args_parser

    tasks = ["synthetic:math", "synthetic:medical"]
    cfg = _config(tmp_path, tasks=tasks, methods=["full", "cpi-ft"], monitor=["synthetic:general"],
                  training={**SMALL["training"], "gradient_checkpointing": True},
                  launch={"deepspeed": "ds.json", "nproc_per_node": 2})
    launches = [shlex.split(ln) for ln in _dry([cfg, "--out", "runs/x"]) if ln.startswith("torchrun")]
    assert len(launches) == 2
    for argv in launches:
        parsed = get_args_parser().parse_args(argv[1:])
        module, *script = argv[argv.index("-m") + 1:]
        assert (parsed.training_script, parsed.training_script_args) == (module, script)
        params = main.commands[script[0]].make_context(script[0], script[1:]).params
        if script[0] == "finetune":
            assert list(params["monitor"]) == ["synthetic:general"]


def _probe_launches(lines: list[str]) -> dict[str, list[str]]:
    """The dry run's torchrun probe lines, by step (the step directory is the probe's --out)."""
    out = {}
    for ln in (ln for ln in lines if ln.startswith("torchrun ")):
        argv = shlex.split(ln)
        if argv[argv.index("-m") + 2] == "probe" and argv[argv.index("-m") + 2] == "probe":
            out[argv[argv.index("--out") + 1].split("runs/x/", 1)[1]] = argv
    return out


def test_probe_steps_launch_under_deepspeed_with_the_in_process_settings(tmp_path):
    """launch.deepspeed: every probe step (source and target) is a torchrun `probe --deepspeed` line whose
    arguments parse in `trace-transfer probe` to the in-process probe's ProbeConfig, its batch split over
    the ranks, and pass unchanged through torchrun's own parser; `run --check` accepts the config."""
    from torch.distributed.run import get_args_parser

    from trace_transfer.probe import ProbeConfig

    probe = {**SMALL["probe"], "batch_size": 8, "lr": 3e-4, "epochs": 2.0}
    cfg = _config(tmp_path, methods=["trace-lf", "transfer-lf"], probe=probe,
                  launch={"deepspeed": "ds.json", "nproc_per_node": 2})
    res = CliRunner().invoke(main, ["run", cfg, "--check"])
    assert res.exit_code == 0 and "valid" in res.output, res.output
    lines = _dry([cfg, "--out", "runs/x"])
    launches = _probe_launches(lines)
    assert sorted(launches) == ["probe/source/math", "probe/target/math"]
    for step, argv in launches.items():
        i = lines.index(shlex.join(argv))
        assert lines[i - 2].startswith("printf %s ") and lines[i + 2].endswith(f"--only {step}")
        parsed = get_args_parser().parse_args(argv[1:])
        module, *script = argv[argv.index("-m") + 1:]
        assert (parsed.training_script, parsed.training_script_args, parsed.nproc_per_node) == (module, script, "2")
        params = main.commands["probe"].make_context("probe", script[1:]).params
        assert params["deepspeed_config"] == str(tmp_path / "ds.json") and params["force"] and params["task"] == "synthetic:math"
        assert params["model"] == f"runs/x/models/{step.split('/')[1]}/model"
        launched = ProbeConfig.from_flat(**{k: params[k] for k in (
            "epochs", "max_steps", "lr", "batch_size", "seq_len", "precision", "gradient_checkpointing", "fisher",
            "fisher_at", "fisher_batches", "fisher_elements", "max_examples", "device", "seed")})
        in_process = ProbeConfig.from_flat(**probe, seed=0, device="auto")
        # The same probe, but each of the 2 ranks takes half of the global batch (DS: global = world x micro).
        assert launched.train.batch_size == 4
        assert launched == ProbeConfig.from_flat(**{**probe, "batch_size": 4}, seed=0, device="auto")
        assert in_process.train.batch_size == 8


def test_probe_launch_hashes_and_refusals(tmp_path):
    """A launched probe's hash holds the launch (as a fine-tuning step's does); a run without DeepSpeed keeps
    the hash it always had; a probe batch the ranks cannot split evenly is refused by `run --check`, and a
    config that probes nothing is not."""
    from trace_transfer.pipeline.launch import DryRunner, launch_world
    from trace_transfer.pipeline.run import run_pipeline

    def hashes(**over):
        runner = DryRunner(tmp_path / "run")
        run_pipeline(load_pipeline(_config(tmp_path, **over)), tmp_path / "run", runner=runner, base_dir=tmp_path)
        return {n: r.hash for n, r in runner.records.items()}

    plain, launched = hashes(), hashes(launch={"deepspeed": "ds.json", "nproc_per_node": 2})
    assert plain["models/target"] == launched["models/target"]
    assert plain["probe/target/math"] != launched["probe/target/math"]
    assert hashes(launch={"device": "cpu"})["probe/target/math"] == plain["probe/target/math"]

    odd = _config(tmp_path, probe={**SMALL["probe"], "fisher": "per-sample"},
                  launch={"deepspeed": "ds.json", "nproc_per_node": 3})
    res = CliRunner().invoke(main, ["run", odd, "--check"])
    assert res.exit_code == 1 and "probe.batch_size: 4 does not split evenly over the launch's 3 processes" in res.output
    assert "probe.fisher: 'per-sample' is not supported under launch.deepspeed" in res.output
    res = CliRunner().invoke(main, ["run", _config(tmp_path, methods=["full"], launch={"deepspeed": "ds.json",
                                                                                        "nproc_per_node": 3}), "--check"])
    assert res.exit_code == 0, res.output
    (tmp_path / "hosts").write_text("# two nodes\nnode0 slots=2\nnode1 slots=2\n")
    cfg = load_pipeline(_config(tmp_path, launch={"deepspeed": "ds.json", "nproc_per_node": 2, "hostfile": "hosts"}))
    assert launch_world(cfg.launch, tmp_path) == 4


def test_a_finished_probe_launch_is_recorded_not_relaunched(tmp_path):
    """The relaunch of a probe step whose launch finished (probe.json, written last) only records it; across
    nodes an unfinished one is the cluster's to launch."""
    from trace_transfer.pipeline.run import _probe_done

    cfg = load_pipeline(_config(tmp_path, launch={"deepspeed": "ds.json", "nnodes": 2, "rdzv_endpoint": "h:1"}))
    d = tmp_path / "probe"
    d.mkdir()
    with pytest.raises(TraceTransferError, match="this probe runs across 2 node"):
        _launch_distributed(d, ["-m", "trace_transfer", "probe"], cfg, print, done=_probe_done, what="probe")
    (d / "probe.json").write_text(json.dumps({"task": "math", "train": {"steps": 1}}))
    assert _launch_distributed(d, [], cfg, print, done=_probe_done, what="probe")["task"] == "math"


def test_probe_gradient_checkpointing_reaches_every_probe_and_no_step_hash(tmp_path):
    """probe.gradient_checkpointing (TrainConfig's execution-only field): the in-process probe's ProbeConfig and
    the launched probe's argv carry it, and it enters no step hash (probe, refine-based cores), so runs from
    before the key keep their hashes and switching it reruns nothing."""
    from trace_transfer.pipeline.config import probe_hash_params
    from trace_transfer.pipeline.launch import DryRunner
    from trace_transfer.pipeline.run import _probe_settings, run_pipeline
    from trace_transfer.probe import ProbeConfig

    methods = ["trace-lf", "transfer-lf", "cheap-lf"]
    ds = {"deepspeed": "ds.json", "nproc_per_node": 2}

    def hashes(**over):
        runner = DryRunner(tmp_path / "run")
        run_pipeline(load_pipeline(_config(tmp_path, methods=methods, **over)), tmp_path / "run", runner=runner,
                     base_dir=tmp_path)
        return {n: r.hash for n, r in runner.records.items()}

    on = {**SMALL["probe"], "gradient_checkpointing": True}
    for launch in ({}, ds):
        before, after = hashes(launch=launch), hashes(launch=launch, probe=on)
        assert before == after and any(n.startswith("cores/cheap") for n in before)
    cfg = load_pipeline(_config(tmp_path, methods=methods, probe=on))
    assert cfg.probe.gradient_checkpointing
    # The keys the probe section always had: a probe step's hash is the one it had before the key existed.
    assert list(probe_hash_params(cfg.probe)) == ["max_steps", "epochs", "lr", "batch_size", "seq_len", "fisher",
                                                  "fisher_batches", "max_examples"]
    assert ProbeConfig.from_flat(**_probe_settings(cfg, 0)).train.gradient_checkpointing  # in process
    launches = _probe_launches(_dry([_config(tmp_path, methods=methods, probe=on, launch=ds), "--out", "runs/x"]))
    assert sorted(launches) == ["probe/source/math", "probe/target/math"]
    for argv in launches.values():
        script = argv[argv.index("-m") + 2:]
        assert "--gradient-checkpointing" in script
        assert main.commands["probe"].make_context("probe", script[1:]).params["gradient_checkpointing"]
    plain = _probe_launches(_dry([_config(tmp_path, methods=methods, launch=ds), "--out", "runs/x"]))
    assert all("--no-gradient-checkpointing" in argv for argv in plain.values())


def _hashes(tmp_path, **over) -> dict[str, str]:
    """Every step's hash, as a real run computes it, without running anything."""
    from trace_transfer.pipeline.launch import DryRunner
    from trace_transfer.pipeline.run import run_pipeline

    runner = DryRunner(tmp_path / "run")
    run_pipeline(load_pipeline(_config(tmp_path, **over)), tmp_path / "run", runner=runner, base_dir=tmp_path)
    return {n: r.hash for n, r in runner.records.items()}


def test_deepspeed_overrides_hash_only_the_steps_they_name(tmp_path):
    """launch.deepspeed_overrides: a step's hash holds the DeepSpeed config it runs with; every step
    without an override keeps the hash it has without the key (existing runs resume, nothing reruns)."""
    from trace_transfer.pipeline.config import LaunchSpec

    (tmp_path / "offload.json").write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer":
                                                                              {"device": "cpu"}}}))
    methods = ["full", "trace-lf", "transfer-lf"]
    ds = {"deepspeed": "ds.json", "nproc_per_node": 2}
    plain = _hashes(tmp_path, methods=methods, launch=ds)
    # The launch part of a step hash is what it always was without overrides.
    assert LaunchSpec(**ds).step_params() == {"deepspeed": "ds.json", "nproc_per_node": 2}
    # A step's own override changes its hash; the steps that read its output follow through their dependency
    # hashes, as for any changed input; the rest (models, CKA, layer map, the other methods) keep theirs.
    # A launched refine pass is the target's micro-probe: it runs with the target probe's config.
    probe_t = {"probe/target/math", "cores/target-lf", "finetune/trace-lf/seed0", "report", "cores/transfer-lf",
               "finetune/transfer-lf/seed0"}
    probe_s = {"probe/source/math", "cores/source-lf", "cores/transfer-lf", "finetune/transfer-lf/seed0", "report"}
    for overrides, changed in (({"full": "offload.json"}, {"finetune/full/seed0", "report"}),
                               ({"probe/target": "offload.json"}, probe_t),
                               ({"probe": "offload.json"}, probe_t | probe_s),
                               ({"trace-lf": "ds.json"}, set())):  # launch.deepspeed itself: the same hash
        over = _hashes(tmp_path, methods=methods, launch={**ds, "deepspeed_overrides": overrides})
        assert {n for n in plain if plain[n] != over[n]} == changed, overrides


def test_dry_run_launches_each_step_with_its_own_deepspeed_config(tmp_path):
    """The dry run prints every launch with the config it runs with (its note names it); `run --check`
    accepts the overrides."""
    (tmp_path / "offload.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    cfg = _config(tmp_path, methods=["full", "trace-lf", "transfer-lf"],
                  probe={**SMALL["probe"], "batch_size": 8},
                  launch={"deepspeed": "ds.json", "nproc_per_node": 2,
                          "deepspeed_overrides": {"full": "offload.json", "probe/target": "offload.json"}})
    res = CliRunner().invoke(main, ["run", cfg, "--check"])
    assert res.exit_code == 0, res.output
    lines = _dry([cfg, "--out", "runs/x"])
    launched = {}
    for i, ln in enumerate(lines):
        if ln.startswith("torchrun "):
            argv = shlex.split(ln)
            launched[argv[argv.index("--out") + 1].split("runs/x/", 1)[1]] = argv[argv.index("--deepspeed") + 1]
    assert launched == {"probe/source/math": str(tmp_path / "ds.json"),
                        "probe/target/math": str(tmp_path / "offload.json"),
                        "cores/transfer-lf/math.coreset.safetensors": str(tmp_path / "offload.json"),  # refine
                        "finetune/full/seed0": str(tmp_path / "offload.json"),
                        "finetune/trace-lf/seed0": str(tmp_path / "ds.json"),
                        "finetune/transfer-lf/seed0": str(tmp_path / "ds.json")}
    assert "# step finetune/full/seed0: DeepSpeed (offload.json) on 2 processes: mark the step's attempt" in lines
    assert "# step finetune/trace-lf/seed0: DeepSpeed (ds.json) on 2 processes: mark the step's attempt" in lines


def test_deepspeed_override_problems_are_reported_at_once(tmp_path):
    """Unknown keys (not a method of the config nor a probe key), missing files and overrides without
    launch.deepspeed are config errors, all in one message at their lines; a probe override that fixes a
    batch the probe's split contradicts is refused by `run --check` as launch.deepspeed's would be."""
    cfg = _config(tmp_path, methods=["full", "trace-lf"],
                  launch={"deepspeed_overrides": {"ful": "ds.json", "probe": "missing.json", "trace-lf": "ds.json"}})
    res = CliRunner().invoke(main, ["run", cfg, "--check"])
    assert res.exit_code == 1
    for problem in ("launch.deepspeed_overrides: needs launch.deepspeed",
                    "launch.deepspeed_overrides.ful: 'ful' is neither a method of this config nor a probe key; "
                    "valid keys: full, trace-lf, probe, probe/source, probe/target",
                    "launch.deepspeed_overrides.probe: config 'missing.json' does not exist"):
        assert problem in res.output, res.output
    assert "p.yaml:" in res.output  # located at the key's line
    (tmp_path / "fixed.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 4}))
    fixed = _config(tmp_path, methods=["full", "trace-lf"], probe={**SMALL["probe"], "batch_size": 4},
                    launch={"deepspeed": "ds.json", "nproc_per_node": 2, "deepspeed_overrides": {"probe": "fixed.json"}})
    res = CliRunner().invoke(main, ["run", fixed, "--check"])
    assert res.exit_code == 1
    assert ("launch.deepspeed_overrides.probe: fixed.json fixes a batch size that contradicts the probe's over 2 "
            "processes: train_micro_batch_size_per_gpu is 4 in the DeepSpeed config but 2") in res.output, res.output
    assert "launch.deepspeed:" not in res.output  # ds.json ("auto") is fine for the fine-tuning steps
    # The same file for `full` (training batch 4 per rank) is fine.
    ok = _config(tmp_path, methods=["full", "trace-lf"],
                 launch={"deepspeed": "ds.json", "nproc_per_node": 2, "deepspeed_overrides": {"full": "fixed.json"}})
    res = CliRunner().invoke(main, ["run", ok, "--check"])
    assert res.exit_code == 0, res.output


def _refine_cfg(tmp_path, **over) -> str:
    return _config(tmp_path, **{"tasks": ["synthetic:math", "synthetic:medical"], "methods": ["transfer-lf", "cheap-lf"],
                                "probe": {**SMALL["probe"], "batch_size": 8},
                                "launch": {"deepspeed": "ds.json", "nproc_per_node": 2}, **over})


def test_refine_steps_launch_one_refine_per_task_under_deepspeed(tmp_path, monkeypatch):
    """launch.deepspeed: each refine step (transfer-lf's budgets pass, cheap-lf's source-free one) is one
    torchrun `refine --deepspeed` line per task, writing that task's CoreSet in the step directory; its
    arguments pass unchanged through torchrun's parser and parse in `trace-transfer refine` to the in-process
    pass's RefineConfig (global batch kept: refine splits it); a transfer-lf launch reads the budgets that the
    `trace-transfer transfer` line printed before it writes."""
    from torch.distributed.run import get_args_parser

    from trace_transfer.refine import RefineConfig

    cfg = _refine_cfg(tmp_path)
    res = CliRunner().invoke(main, ["run", cfg, "--check"])
    assert res.exit_code == 0, res.output
    lines = _dry([cfg, "--out", "runs/x"])
    refines: dict[str, list[tuple[int, list[str]]]] = {}
    for i, ln in enumerate(lines):
        argv = shlex.split(ln) if ln.startswith("torchrun ") else []
        if argv and argv[argv.index("-m") + 2] == "refine":
            step = argv[argv.index("--out") + 1].split("runs/x/", 1)[1].rsplit("/", 1)[0]
            refines.setdefault(step, []).append((i, argv))
    assert sorted(refines) == ["cores/cheap-lf", "cores/transfer-lf"]
    in_process = load_pipeline(cfg)
    monkeypatch.chdir(tmp_path)  # the files the printed commands read, as the earlier steps leave them
    for f in ("layermap/layer_map.json", *(f"{d}/{t}.{ext}" for t in ("math", "medical") for d, ext in (
            ("cores/source-lf", "coreset.safetensors"), ("cores/transfer-lf", "budgets.json")))):
        (tmp_path / "runs/x" / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "runs/x" / f).touch()
    for step, launches in refines.items():
        assert [a[a.index("--task") + 1] for _, a in launches] == ["synthetic:math", "synthetic:medical"]
        assert lines[launches[0][0] - 1] == "# launch 1 of 2"
        assert lines[launches[-1][0] + 2].endswith(f"--only {step}")
        for i, argv in launches:
            parsed = get_args_parser().parse_args(argv[1:])
            module, *script = argv[argv.index("-m") + 1:]
            assert (parsed.training_script, parsed.training_script_args, parsed.nproc_per_node) == (module, script, "2")
            params = main.commands["refine"].make_context("refine", script[1:]).params
            task = params["task"].split(":")[1]
            assert str(params["out"]) == f"runs/x/{step}/{task}.coreset.safetensors"
            assert params["deepspeed_config"] == tmp_path / "ds.json" and params["model"] == "runs/x/models/target/model"
            settings = {k: params[k] for k in RefineConfig.__dataclass_fields__}
            p = in_process.probe
            assert RefineConfig(**settings) == RefineConfig(
                **in_process.refine.model_dump(), lr=p.lr, batch_size=8, seq_len=p.seq_len, max_examples=p.max_examples,
                seed=0, device="auto", **({"ratio": in_process.scoring.ratio} if step == "cores/cheap-lf" else {}))
            if step == "cores/cheap-lf":
                assert params["budgets_path"] is None
                continue
            assert str(params["budgets_path"]) == f"runs/x/{step}/{task}.budgets.json"
            transfer = shlex.split(lines[i - 2])  # "# launch k of 2" between
            assert transfer[:2] == ["trace-transfer", "transfer"]
            tp = main.commands["transfer"].make_context("transfer", transfer[2:]).params
            assert (str(tp["out"]), tp["carry"], tp["ratio"]) == (str(params["budgets_path"]), "budget", 0.05)
            assert str(tp["coreset_path"]) == f"runs/x/cores/source-lf/{task}.coreset.safetensors"


def test_printed_transfer_line_pins_the_configs_rule_files(tmp_path, monkeypatch):
    """The `trace-transfer transfer` line the dry run prints before a transfer-refine launch names the rule
    files the config pins (source.rules / target.rules) with the flags that use them as given, as the
    in-process step does, not --rules (searched by model type, which could pick another file)."""
    import shutil
    from pathlib import Path

    from trace_transfer.rules import loader

    rules = Path(loader.__file__).parent / "families" / "llama.yaml"
    for side in ("source", "target"):
        shutil.copy(rules, tmp_path / f"{side}.yaml")
    cfg = _refine_cfg(tmp_path, source={**SMALL["source"], "rules": "source.yaml"},
                      target={**SMALL["target"], "rules": "target.yaml"})
    line = next(shlex.split(ln) for ln in _dry([cfg, "--out", "runs/x"]) if ln.startswith("trace-transfer transfer"))
    monkeypatch.chdir(tmp_path)  # the files the printed line reads, as the earlier steps leave them
    for f in ("layermap/layer_map.json", "cores/source-lf/math.coreset.safetensors"):
        (tmp_path / "runs/x" / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "runs/x" / f).touch()
    tp = main.commands["transfer"].make_context("transfer", line[2:]).params
    assert (tp["source_rules"], tp["target_rules"], tp["rules"]) == (tmp_path / "source.yaml", tmp_path / "target.yaml",
                                                                      ())


def test_refine_launch_hashes_and_refusals(tmp_path):
    """Without launch.deepspeed a refine step's hash is the one it always had (its parameters exactly as
    before); under it the hash holds the launch with the target probe's config; `run --check` refuses a
    signal or step count the distributed pass cannot run and a batch the ranks cannot split (said once
    when the probes already say it)."""
    from trace_transfer.pipeline.config import probe_hash_params
    from trace_transfer.pipeline.steps import step_hash

    over = {"tasks": ["synthetic:math"], "methods": ["transfer-lf", "cheap-lf"]}
    plain = _hashes(tmp_path, **over)
    cfg = load_pipeline(_config(tmp_path, **over))
    before = {"refine": cfg.refine.model_dump(), "probe": probe_hash_params(cfg.probe)}
    assert plain["cores/transfer-lf"] == step_hash("cores/transfer-lf", {
        "ratio": 0.05, "source_rules": None, "target_rules": None, **before},
        {d: plain[d] for d in ("cores/source-lf", "layermap", "models/target")})
    assert plain["cores/cheap-lf"] == step_hash("cores/cheap-lf", {
        **before, **cfg.scoring.model_dump(exclude_none=True)}, {"models/target": plain["models/target"]})
    launched = _hashes(tmp_path, **over, launch={"deepspeed": "ds.json", "nproc_per_node": 2})
    assert all(plain[s] != launched[s] for s in ("cores/transfer-lf", "cores/cheap-lf"))
    assert plain["models/target"] == launched["models/target"]

    def check(**kw) -> str:
        res = CliRunner().invoke(main, ["run", _refine_cfg(tmp_path, **kw), "--check"])
        assert res.exit_code == 1, res.output
        return res.output

    out = check(refine={"signal": "fisher", "steps": 0})
    assert "refine.signal: 'fisher' is not supported under launch.deepspeed" in out
    assert "refine.steps: 0 under launch.deepspeed" in out
    out = check(methods=["cheap-lf"], probe={**SMALL["probe"], "batch_size": 6},
                launch={"deepspeed": "ds.json", "nproc_per_node": 4})  # probes nothing: refine's own line
    assert "probe.batch_size: 6 does not split evenly over the launch's 4 processes (the launched refine" in out
    out = check(probe={**SMALL["probe"], "batch_size": 6}, launch={"deepspeed": "ds.json", "nproc_per_node": 4})
    assert out.count("probe.batch_size: 6 does not split evenly") == 1
    (tmp_path / "fixed.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 8}))
    out = check(methods=["cheap-lf"], launch={"deepspeed": "ds.json", "nproc_per_node": 2,
                                              "deepspeed_overrides": {"probe/target": "fixed.json"}})
    assert "contradicts the refine pass's over 2 processes" in out


@pytest.mark.slow
def test_launched_refine_step_writes_budgets_first_and_fills_the_native_cost(tmp_path, monkeypatch):
    """The transfer-lf step under launch.deepspeed, its launches played in this process (the launched argv run
    through `trace-transfer refine` without --deepspeed, 1 rank): the budgets are in the step directory before
    each launch, the launched CoreSet (no --native-probe) gets the native probe's cost the in-process step
    records, and it equals the in-process step's CoreSet."""
    from pathlib import Path

    import trace_transfer.pipeline.run as run_mod
    from trace_transfer.coreset import CoreSet
    from trace_transfer.pipeline.run import run_pipeline

    launched: list[str] = []

    def play(d, args, cfg, say, done=None, what=""):
        if done(d) is not None:
            return done(d)
        script = list(args[args.index("-m") + 2:])
        i = script.index("--deepspeed")
        del script[i:i + 2]
        if what == "refine":
            assert Path(script[script.index("--budgets") + 1]).is_file()  # saved before the launch
            launched.append(script[script.index("--task") + 1])
        res = CliRunner().invoke(main, script)
        assert res.exit_code == 0, res.output
        return done(d)

    monkeypatch.setattr(run_mod, "_launch_distributed", play)
    only = ("models", "probe", "cores/source-lf", "cka", "layermap", "cores/transfer-lf")
    over = {"methods": ["transfer-lf"], "refine": {"steps": 1, "batches": 1}}
    run_pipeline(load_pipeline(_config(tmp_path, **over)), tmp_path / "one", only=only, say=lambda _m: None)
    run_pipeline(load_pipeline(_config(tmp_path, **over, launch={"deepspeed": "ds.json", "nproc_per_node": 1})),
                 tmp_path / "ds", only=only, base_dir=tmp_path, say=lambda _m: None)
    assert launched == ["synthetic:math"]
    name = "cores/transfer-lf/math.coreset.safetensors"
    one, ds = CoreSet.load(tmp_path / "one" / name), CoreSet.load(tmp_path / "ds" / name)
    assert ds.metadata["cost"]["native"] == one.metadata["cost"]["native"] is not None
    assert ds.metadata["cost"]["relative_to_native"] == one.metadata["cost"]["relative_to_native"]
    assert ds.names() == one.names() and all(bool((ds.unit_mask(n) == one.unit_mask(n)).all()) for n in one.names())
    step = json.loads((tmp_path / "ds" / "cores/transfer-lf/step.json").read_text())
    assert step["result"]["launched"] == "torchrun" and "launch" in step["params"]
