"""CoreSet exporters: each target tool's own freezing rule, applied to a tiny model, trains exactly the core.

PEFT is installed, so its test loads the exported adapter with PEFT itself. Axolotl and LLaMA-Factory are
not dependencies (each pulls a full training stack); their rules are reproduced here from the files read:
axolotl-ai-cloud/axolotl ``src/axolotl/utils/freeze.py`` (``freeze_layers_except``, ``LayerNamePattern``,
``_merge_ranges``) and hiyouga/LLaMA-Factory ``src/llamafactory/model/adapter.py``
(``_setup_freeze_tuning``).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from click.testing import CliRunner

from trace_transfer.checkpoint import named_shapes
from trace_transfer.coreset import CoreSet, UnitLayout
from trace_transfer.coreset.export import export_coreset, llamafactory_trainable, ranges_to_mask
from trace_transfer.errors import ConfigError


@pytest.fixture(scope="module")
def model(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama)


def _core(model, kind: str, seed: int = 0) -> CoreSet:
    """Random cores: 'row' (rows of every tensor), 'tensor', 'column', 'element' (2-D weights), 'mixed'."""
    g = torch.Generator().manual_seed(seed)
    masks, layouts = {}, {}
    for i, (name, p) in enumerate(model.named_parameters()):
        if kind == "tensor":
            if i % 3 == 0:
                masks[name], layouts[name] = torch.ones(1, dtype=torch.bool), UnitLayout()
        elif kind == "row" or (kind == "column" and p.ndim == 1):
            masks[name], layouts[name] = torch.rand(p.shape[0], generator=g) < 0.3, UnitLayout.rows()
        elif kind == "column":
            masks[name], layouts[name] = torch.rand(p.shape[1], generator=g) < 0.3, UnitLayout.columns()
        elif kind == "element" and p.ndim == 2 and "embed" not in name:
            masks[name], layouts[name] = torch.rand(p.numel(), generator=g) < 0.05, UnitLayout("element")
        elif kind == "element" and name.endswith("input_layernorm.weight"):
            masks[name], layouts[name] = torch.ones(1, dtype=torch.bool), UnitLayout()
    return CoreSet.from_unit_masks(masks, layouts, model, metadata={"task": kind})


def _assert_trainable_is_core(trainable: dict[str, torch.Tensor], cs: CoreSet) -> None:
    for name in cs.all_names():
        got = trainable.get(name, torch.zeros(cs.shape(name), dtype=torch.bool))
        assert torch.equal(got, cs.mask(name)), name


# -- Axolotl ---------------------------------------------------------------------------------------


def _axolotl_trainable(model, patterns: list[str]) -> dict[str, torch.Tensor]:
    """Axolotl's freeze_layers_except: unfrozen iff some pattern matches; with ranges, the gradient hook
    zeroes dim-0 rows outside the merged ranges."""
    parsed = []
    for pat in patterns:
        m = re.match(r"^(.+)\[([0-9]*)(?::([0-9]*))?\]$", pat)
        base, rng = (pat, None) if not m else (m.group(1), (int(m.group(2) or 0), int(m.group(3)) if m.group(3) else None))
        if m and m.group(3) is None and m.group(2).isdecimal():
            rng = (int(m.group(2)), int(m.group(2)) + 1)
        parsed.append((re.compile(re.sub(r"\.(?!\+)", "\\.", base)), rng))
    out = {}
    for name, p in model.named_parameters():
        hits = [rng for rx, rng in parsed if rx.match(name)]
        if not hits:
            continue
        ranges = [(a, len(p) if b is None else b) for a, b in (r for r in hits if r is not None)]
        rows = torch.zeros(len(p), dtype=torch.bool)
        for a, b in ranges:
            rows[a:b] = True
        if not ranges:
            rows[:] = True
        out[name] = rows.reshape([-1] + [1] * (p.ndim - 1)).expand(p.shape).clone()
    return out


@pytest.mark.parametrize("kind", ["row", "tensor"])
def test_axolotl_export_is_exact_for_rows_and_tensors(model, kind, tmp_path):
    cs = _core(model, kind)
    res = export_coreset(cs, "axolotl", tmp_path / "a.yaml")
    patterns = yaml.safe_load((tmp_path / "a.yaml").read_text())["unfrozen_parameters"]
    assert res.exact and patterns
    _assert_trainable_is_core(_axolotl_trainable(model, patterns), cs)
    assert any("$[" in p for p in patterns) == (kind == "row")


@pytest.mark.parametrize("kind", ["column", "element"])
def test_axolotl_refuses_columns_and_elements_naming_the_alternative(model, kind, tmp_path):
    with pytest.raises(ConfigError, match="granularity row.*peft / json"):
        export_coreset(_core(model, kind), "axolotl", tmp_path / "a.yaml")
    assert not (tmp_path / "a.yaml").exists()


# -- LLaMA-Factory ---------------------------------------------------------------------------------


def _llamafactory_apply(model, cfg: dict) -> dict[str, torch.Tensor]:
    """LLaMA-Factory's _setup_freeze_tuning on the model, as written there (no LLaMA-Pro, text-only)."""
    num_layers = model.config.num_hidden_layers
    n = cfg["freeze_trainable_layers"]
    ids = range(max(0, num_layers - n), num_layers) if n > 0 else range(min(-n, num_layers))
    hidden, non_hidden = set(), set()
    for name, _ in model.named_parameters():
        if ".0." in name:
            hidden.add(name.split(".0.")[-1].split(".")[0])
        elif ".1." in name:
            hidden.add(name.split(".1.")[-1].split(".")[0])
        if re.search(r"\.\d+\.", name) is None:
            non_hidden.add(name.split(".")[-2])
    trainable_layers = []
    for mod in [m.strip() for m in cfg["freeze_trainable_modules"].split(",")]:
        assert mod == "all" or mod in hidden
        trainable_layers += [".{:d}.{}".format(i, mod if mod != "all" else "") for i in ids]
    for mod in [m.strip() for m in cfg.get("freeze_extra_modules", "").split(",") if m.strip()]:
        assert mod in non_hidden
        trainable_layers.append(mod)
    return {name: torch.ones(p.shape, dtype=torch.bool) for name, p in model.named_parameters()
            if any(t in name for t in trainable_layers)}


def _tensor_core(model, names) -> CoreSet:
    return CoreSet.from_unit_masks({n: torch.ones(1, dtype=torch.bool) for n in names}, {}, model)


def test_llamafactory_exact_for_an_expressible_tensor_core(model, tmp_path):
    # The last layer, lm_head, the final norm and every layer norm: "norm" as an extra module is a substring
    # of every input_layernorm/post_attention_layernorm, so only with all of them is the final norm exact.
    names = [n for n, _ in model.named_parameters()
             if ".1." in n or "norm" in n or n == "lm_head.weight"]
    cs = _tensor_core(model, names)
    res = export_coreset(cs, "llamafactory", tmp_path / "lf.yaml")
    cfg = yaml.safe_load((tmp_path / "lf.yaml").read_text())
    assert res.exact and cfg["finetuning_type"] == "freeze" and cfg["freeze_trainable_layers"] == 1
    _assert_trainable_is_core(_llamafactory_apply(model, cfg), cs)


def test_llamafactory_refuses_then_approximates_with_honest_counts(model, tmp_path):
    cs = _core(model, "tensor")
    with pytest.raises(ConfigError, match="--approximate"):
        export_coreset(cs, "llamafactory", tmp_path / "lf.yaml")
    res = export_coreset(cs, "llamafactory", tmp_path / "lf.yaml", approximate=True)
    cfg = yaml.safe_load((tmp_path / "lf.yaml").read_text())
    got = _llamafactory_apply(model, cfg)
    added = sum(int((~cs.mask(n))[got[n]].sum()) for n in got)
    lost = sum(cs.num_selected(n) for n in cs.names() if n not in got)
    assert not res.exact and (res.added, res.lost) == (added, lost) and added + lost > 0


def test_llamafactory_rule_matches_the_test_copy(model):
    names = [n for n, _ in model.named_parameters()]
    got = llamafactory_trainable(names, 2, -1, ["mlp"], ["lm_head"])
    cfg = {"freeze_trainable_layers": -1, "freeze_trainable_modules": "mlp", "freeze_extra_modules": "lm_head"}
    assert got == set(_llamafactory_apply(model, cfg))


# -- PEFT ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["element", "row", "column"])
def test_peft_adapter_trains_exactly_the_core(model, tiny_llama, kind, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cs = _core(model, kind)
    if kind != "element":  # rows/columns of embeddings and norms are not SHiRA-adaptable: Linear weights only
        cs = CoreSet.from_unit_masks({n: cs.unit_mask(n) for n in cs.names() if n.endswith("proj.weight")},
                                     {n: cs.layout(n) for n in cs.names()}, model)
    res = export_coreset(cs, "peft", tmp_path / "adapter", base_model=str(tiny_llama))
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter"), is_trainable=True)
    trainable = {}
    for mod_name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "shira_indices") and "default" in module.shira_indices:
            idx = module.shira_indices["default"].long()
            m = torch.zeros(module.out_features, module.in_features, dtype=torch.bool)
            m[idx[0], idx[1]] = True
            trainable[f"{mod_name}.weight"] = m
    for name, p in peft_model.named_parameters():
        if p.requires_grad and "modules_to_save" in name:
            trainable[name.replace("base_model.model.", "").replace(".modules_to_save.default", "")] = \
                torch.ones(p.shape, dtype=torch.bool)
    _assert_trainable_is_core(trainable, cs)
    assert res.exact
    # one training step: the merged weights move only inside the core
    torch.manual_seed(0)
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(0, 50, (2, 12))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    merged = peft_model.merge_and_unload()
    for name, p in merged.named_parameters():
        moved = p.detach() != model.get_parameter(name).detach()
        assert not (moved & ~cs.mask(name)).any(), name


def test_peft_refuses_partial_non_linear(model, tmp_path):
    with pytest.raises(ConfigError, match="non-Linear"):
        export_coreset(_core(model, "row"), "peft", tmp_path / "adapter")


# -- JSON, CLI ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["row", "column", "element", "tensor"])
def test_json_round_trips_every_granularity(model, kind, tmp_path):
    cs = _core(model, kind)
    export_coreset(cs, "json", tmp_path / "c.json")
    params = json.loads((tmp_path / "c.json").read_text())["parameters"]
    got = {n: ranges_to_mask(tuple(v["shape"]), v["axis"], v["ranges"]) for n, v in params.items()}
    _assert_trainable_is_core(got, cs)


def test_cli_export_writes_and_refuses_to_overwrite(model, tmp_path):
    from trace_transfer.cli import main

    path = _core(model, "row").save(tmp_path / "c")
    out = tmp_path / "a.yaml"
    r = CliRunner().invoke(main, ["coreset", "export", str(path), "--to", "axolotl", "--out", str(out)])
    assert r.exit_code == 0 and "exact" in r.output and "weight_decay" in r.output, r.output
    r = CliRunner().invoke(main, ["coreset", "export", str(path), "--to", "axolotl", "--out", str(out)])
    assert r.exit_code == 1 and "--force" in r.output
    assert named_shapes(model)  # the universe the core was built on
