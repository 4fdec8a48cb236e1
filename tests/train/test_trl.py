"""TRL's SFTTrainer trains exactly a CoreSet through CoreSetCallback (trl is optional: skipped without it)."""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl", reason="trl is an optional extra: pip install 'trace-transfer[trl]'")


def _row_core(model, ratio: float = 0.25, seed: int = 0):
    from trace_transfer.coreset import CoreSet, UnitLayout

    g = torch.Generator().manual_seed(seed)
    masks, layouts = {}, {}
    for name, p in model.named_parameters():
        if p.ndim == 2:
            masks[name], layouts[name] = torch.rand(p.shape[0], generator=g) < ratio, UnitLayout.rows()
    return CoreSet.from_unit_masks(masks, layouts, model)


@pytest.mark.slow
def test_sft_trainer_with_coreset_callback_keeps_non_core_bit_identical(tiny_llama, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from trace_transfer.models import load_model, load_tokenizer
    from trace_transfer.train.hf import CoreSetCallback

    model, tok = load_model(tiny_llama), load_tokenizer(tiny_llama)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    core = _row_core(model)
    data = Dataset.from_list([{"text": f"{a}+{b}={a + b}"} for a in range(8) for b in range(4)])
    args = SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-2,
                     weight_decay=0.0, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                     logging_steps=1, max_length=32, disable_tqdm=True, seed=0)
    callback = CoreSetCallback(core)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[callback])
    trainer.train()
    callback.handle.remove()
    moved = 0
    for name, p in trainer.model.named_parameters():
        changed = p.detach() != before[name]
        assert not (changed & ~core.mask(name)).any(), f"{name}: a non-core element changed"
        moved += int(changed.sum())
    assert moved > 0  # the core did train


def test_coreset_callback_refuses_weight_decay_on_partly_core_tensors(tiny_llama, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from trace_transfer.errors import ConfigError
    from trace_transfer.models import load_model, load_tokenizer
    from trace_transfer.train.hf import CoreSetCallback

    model, tok = load_model(tiny_llama), load_tokenizer(tiny_llama)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, weight_decay=0.1, use_cpu=True, bf16=False,
                     report_to="none", max_length=16)
    with pytest.raises(ConfigError, match="weight_decay=0"):
        SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list([{"text": "1+1=2"}] * 4),
                   processing_class=tok, callbacks=[CoreSetCallback(_row_core(model))])


@pytest.mark.slow
def test_train_with_trl_example_runs(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "examples" / "train_with_trl.py"
    run = subprocess.run([sys.executable, str(script), "--quick", "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "verify_frozen OK" in run.stdout
