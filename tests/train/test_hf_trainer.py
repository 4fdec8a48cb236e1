"""HF Trainer integration: CoreSetTrainer and CoreSetCallback keep non-core elements bit-identical in a
plain Trainer run on CPU."""

import pytest
import torch
from _tiny_masking import batches_fn, coreset_at, snapshot, tiny_llama
from transformers import Trainer, TrainingArguments

from trace_transfer.errors import ConfigError
from trace_transfer.train.hf import CoreSetCallback, CoreSetTrainer
from trace_transfer.train.verify import verify_frozen


def _dataset():
    # one example per row, as a Trainer wants; default_data_collator stacks them
    return [{k: v[i] for k, v in b.items()} for b in batches_fn(n=4, batch_size=4)(0) for i in range(4)]


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), use_cpu=True, max_steps=6, per_device_train_batch_size=4,
                gradient_accumulation_steps=2, learning_rate=1e-2, weight_decay=0.1, lr_scheduler_type="constant",
                logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=0)
    base.update(kw)
    return TrainingArguments(**base)


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("granularity", ["row", "element"])
def test_coreset_trainer_keeps_non_core_bit_identical(tmp_path, granularity):
    model = tiny_llama()
    cs = coreset_at(model, granularity)
    before = snapshot(model)
    trainer = CoreSetTrainer(model=model, args=_args(tmp_path), train_dataset=_dataset(), coreset=cs)
    assert trainer.mask_handle.num_trainable() == cs.num_selected()
    trainer.train()
    # partly-core tensors sit in a zero-decay group; entirely-core matrices keep the requested decay
    partial = {id(e.param) for e in trainer.mask_handle.partial.values()}
    for g in trainer.optimizer.param_groups:
        if any(id(p) in partial for p in g["params"]):
            assert g["weight_decay"] == 0.0
    trainer.mask_handle.remove()
    report = verify_frozen(before, model.state_dict(), cs)
    assert report.ok, report.format()
    assert report.changed_in_core > 0
    losses = _losses(trainer)
    assert losses[-1] < losses[0]


def test_callback_with_a_plain_trainer(tmp_path):
    model = tiny_llama()
    cs = coreset_at(model, "head")
    before = snapshot(model)
    cb = CoreSetCallback(cs)
    trainer = Trainer(model=model, args=_args(tmp_path, weight_decay=0.0), train_dataset=_dataset(), callbacks=[cb])
    trainer.train()
    cb.handle.remove()
    assert verify_frozen(before, model.state_dict(), cs).ok


def test_callback_refuses_weight_decay_on_partial_tensors(tmp_path):
    model = tiny_llama()
    cs = coreset_at(model, "row")
    with pytest.raises(ConfigError, match="weight_decay=0 or use CoreSetTrainer"):
        Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset(), callbacks=[CoreSetCallback(cs)])
    assert all(p.requires_grad for p in model.parameters())  # nothing left applied


def test_prebuilt_optimizer_that_decays_partial_tensors_is_refused(tmp_path):
    model = tiny_llama()
    cs = coreset_at(model, "row")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    with pytest.raises(ConfigError, match="partly-core"):
        CoreSetTrainer(model=model, args=_args(tmp_path), train_dataset=_dataset(), coreset=cs,
                       optimizers=(opt, None))
