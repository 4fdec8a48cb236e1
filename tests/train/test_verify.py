"""verify-frozen: catches a planted change outside the cores (library and CLI exit status), compares
bitwise, and reports tensors present on one side only."""

import json

import pytest
import torch
from _tiny_masking import coreset_at, tiny_llama
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from trace_transfer.cli import main
from trace_transfer.errors import FrozenParameterChanged, ModelMismatchError
from trace_transfer.train.verify import verify_frozen


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    model = tiny_llama()
    model.save_pretrained(root / "base", max_shard_size="20KB")  # several shards + index: streaming path
    cs = coreset_at(model, "row")
    cs_path = cs.save(root / "rows.coreset.safetensors")
    return root, model, cs, cs_path


def _tuned(root, model, name, edits, dtype=None):
    """Save ``model`` with ``edits`` [(tensor, flat index, new value)] into ``root/name/model.safetensors``."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for tensor, idx, value in edits:
        sd[tensor].view(-1)[idx] = value
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    (root / name).mkdir(exist_ok=True)
    save_file(sd, str(root / name / "model.safetensors"))
    return root / name


def _frozen_and_core_index(cs, name):
    m = cs.mask(name).reshape(-1)
    return int((~m).nonzero()[0]), int(m.nonzero()[0])


def test_unchanged_checkpoint_passes(setup):
    root, model, cs, cs_path = setup
    tuned = _tuned(root, model, "same", [])
    report = verify_frozen(root / "base", tuned, [cs_path])
    assert report.ok and report.changed_outside == 0
    assert report.tensors_checked == len(model.state_dict())
    assert report.elements_allowed == cs.num_selected()


def test_planted_change_is_caught_and_a_core_change_is_allowed(setup):
    root, model, cs, cs_path = setup
    name = cs.names()[1]
    frozen_i, core_i = _frozen_and_core_index(cs, name)
    old = model.state_dict()[name].view(-1)[frozen_i].item()
    tuned = _tuned(root, model, "planted", [(name, frozen_i, old + 0.25), (name, core_i, 9.0)])
    report = verify_frozen(root / "base", tuned, cs_path)
    assert not report.ok
    assert report.changed_outside == 1 and report.changed_in_core == 1
    assert report.first_offender == name
    assert report.max_abs_diff == pytest.approx(0.25, rel=1e-5)
    row = report.offenders[0]
    assert row.changed == 1 and row.first_index == [frozen_i // model.state_dict()[name].shape[1], frozen_i % model.state_dict()[name].shape[1]]
    with pytest.raises(FrozenParameterChanged, match=name.replace(".", r"\.")):
        report.raise_if_changed()
    # the same change inside the core only is fine
    ok = _tuned(root, model, "core-only", [(name, core_i, 9.0)])
    assert verify_frozen(root / "base", ok, cs_path).ok


def test_bitwise_not_numeric(setup):
    root, model, cs, cs_path = setup
    name = next(n for n in model.state_dict() if not cs.num_selected(n))
    # -0.0 == 0.0 numerically but not bitwise; a bf16 one-ulp step is caught too.
    sd = {k: v.detach().clone().to(torch.bfloat16) for k, v in model.state_dict().items()}
    sd[name].view(-1)[0] = 0.0
    base = root / "bf16-base.safetensors"
    save_file(sd, str(base))
    sd[name].view(-1)[0] = -0.0
    sd[name].view(-1)[1] = torch.nextafter(sd[name].view(-1)[1], torch.tensor(10.0, dtype=torch.bfloat16))
    tuned = root / "bf16-tuned.safetensors"
    save_file(sd, str(tuned))
    report = verify_frozen(base, tuned, cs_path)
    assert report.changed_outside == 2 and report.first_offender == name


def test_cli_exit_status_and_json(setup, tmp_path):
    root, model, cs, cs_path = setup
    runner = CliRunner()
    same = _tuned(root, model, "same", [])
    res = runner.invoke(main, ["verify-frozen", "--base", str(root / "base"), "--tuned", str(same),
                               "--coreset", str(cs_path)])
    assert res.exit_code == 0, res.output
    assert "OK: every element outside the cores is bit-identical" in res.output

    name = cs.names()[0]
    frozen_i, _ = _frozen_and_core_index(cs, name)
    planted = _tuned(root, model, "planted-cli", [(name, frozen_i, 123.0)])
    out_json = tmp_path / "report.json"
    res = runner.invoke(main, ["verify-frozen", "--base", str(root / "base"), "--tuned", str(planted),
                               "--coreset", str(cs_path), "--json", str(out_json)])
    assert res.exit_code == 1, res.output
    assert f"first offending tensor: {name}" in res.output and "FAIL" in res.output
    data = json.loads(out_json.read_text())
    assert data["ok"] is False and data["changed_outside"] == 1 and data["offenders"][0]["name"] == name

    # two CoreSets: their union is allowed
    other = coreset_at(model, "element", seed=5)
    other_path = other.save(tmp_path / "other.coreset.safetensors")
    res = runner.invoke(main, ["verify-frozen", "--base", str(root / "base"), "--tuned", str(same),
                               "--coreset", str(cs_path), "--coreset", str(other_path)])
    assert res.exit_code == 0, res.output


def test_tensors_on_one_side_only_fail_unless_allowed(setup):
    root, model, cs, cs_path = setup
    same = _tuned(root, model, "same", [])
    missing = root / "missing"
    missing.mkdir(exist_ok=True)
    sd = load_file(str(same / "model.safetensors"))
    sd.pop("lm_head.weight")
    save_file(sd, str(missing / "model.safetensors"))
    report = verify_frozen(root / "base", missing, cs_path)
    assert not report.ok and report.only_in_base == ["lm_head.weight"]
    assert "tied weight" in report.format()
    assert verify_frozen(root / "base", missing, cs_path, allow_missing=True).ok
    res = CliRunner().invoke(main, ["verify-frozen", "--base", str(root / "base"), "--tuned", str(missing),
                                    "--coreset", str(cs_path), "--allow-missing"])
    assert res.exit_code == 0, res.output


def test_dtype_mismatch_cannot_be_compared(setup):
    root, model, cs, cs_path = setup
    bf16 = _tuned(root, model, "bf16", [], dtype=torch.bfloat16)
    report = verify_frozen(root / "base", bf16, cs_path)
    assert not report.ok and report.mismatched and "base dtype" in report.mismatched[0]


def test_coreset_for_another_model_is_rejected(setup, tmp_path):
    root, model, cs, cs_path = setup
    from trace_transfer.coreset import CoreSet, UnitLayout

    wrong = CoreSet.from_unit_masks({"lm_head.weight": torch.tensor([True])}, {"lm_head.weight": UnitLayout()},
                                    {"lm_head.weight": (3, 3)})
    with pytest.raises(ModelMismatchError, match="lm_head.weight"):
        verify_frozen(root / "base", root / "base", wrong)
    res = CliRunner().invoke(main, ["verify-frozen", "--base", str(root / "base"), "--tuned", str(root / "base"),
                                    "--coreset", str(wrong.save(tmp_path / "w.coreset.safetensors"))])
    assert res.exit_code != 0 and "different model" in res.output


def test_aliases_check_a_tied_copy_against_its_source(setup, tmp_path):
    root, model, cs, cs_path = setup
    tied = tiny_llama(tie=True)
    sd = {k: v.detach().clone() for k, v in tied.state_dict().items()}  # lm_head saved as its own copy
    tcs = coreset_at(tied, "row")  # universe has embed_tokens only
    assert "lm_head.weight" not in tcs.all_names() and "model.embed_tokens.weight" in tcs.names()
    base, tuned = dict(sd), {k: v.clone() for k, v in sd.items()}
    core_row = int(tcs.unit_mask("model.embed_tokens.weight").nonzero()[0])
    for k in ("lm_head.weight", "model.embed_tokens.weight"):
        tuned[k][core_row] += 1.0
    strict = verify_frozen(base, tuned, tcs)
    assert not strict.ok and strict.not_in_coresets == ["lm_head.weight"]
    assert verify_frozen(base, tuned, tcs, aliases={"lm_head.weight": "model.embed_tokens.weight"}).ok
