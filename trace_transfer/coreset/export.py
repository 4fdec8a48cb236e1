"""Export a CoreSet to the freezing configuration of the trainers users already run.

``export_coreset(cs, fmt, out)`` writes one of:

- ``axolotl`` — a YAML fragment ``unfrozen_parameters: [...]``. Axolotl (``src/axolotl/utils/freeze.py``,
  ``freeze_layers_except``) freezes every parameter, unfreezes those a pattern ``re.match``-es (after
  escaping each ``.`` not followed by ``+``), and for a pattern ending in ``[start:end]`` zeroes the
  gradient rows *outside* the union of ranges, along dim 0 (``gradients[start:end].zero_()``). So it is
  exact for whole tensors and for any core whose mask is a union of dim-0 rows (row and axis-0 head
  cores); columns and elements are refused. The ranges act on gradients only: decoupled weight decay
  (AdamW) still moves the frozen rows of a partly unfrozen tensor, so train with ``weight_decay: 0``.
- ``llamafactory`` — ``finetuning_type: freeze`` with ``freeze_trainable_layers`` (last n, or first n
  when negative), ``freeze_trainable_modules`` and ``freeze_extra_modules``. LLaMA-Factory
  (``src/llamafactory/model/adapter.py``, ``_setup_freeze_tuning``) keeps a parameter trainable when
  one of the strings ``.{layer}.{module}`` (every chosen layer × module) or an extra module name is a
  *substring* of its name. Only whole tensors in a contiguous first/last block of layers can match;
  the exporter searches every setting, writes the exact one, or refuses (with ``approximate=True``:
  writes the closest and reports the parameters added and lost).
- ``peft`` — a PEFT SHiRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``)
  whose sparse indices are exactly the core elements of each ``nn.Linear`` weight, any granularity;
  whole non-Linear tensors go to ``modules_to_save``. SHiRA holds ``r·(in+out)`` scalars per layer
  (one ``r`` per adapter), so a layer with fewer core elements repeats some of its indices: the
  duplicates add up on the same element (the trainable set stays exactly the core; those elements
  take a proportionally larger step, reported as ``max_multiplicity``).
- ``json`` — ``{"parameters": {name: {"shape", "axis", "ranges"}}}``: half-open index ranges along
  ``axis`` (``null``: over the flattened tensor, row-major) for custom trainers.

Example:
    >>> from trace_transfer.coreset import CoreSet
    >>> r = export_coreset(CoreSet.load("cores/math.coreset.safetensors"), "axolotl", "math.axolotl.yaml")
    >>> r.exact, r.added, r.lost
    (True, 0, 0)
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trace_transfer._version import __version__
from trace_transfer.checkpoint import atomic_path, open_checkpoint, write_json_atomic, write_text_atomic
from trace_transfer.coreset.format import CoreSet
from trace_transfer.errors import ConfigError

__all__ = ["EXPORT_FORMATS", "ExportResult", "export_coreset", "row_ranges", "llamafactory_trainable",
           "ranges_to_mask"]

EXPORT_FORMATS = ("axolotl", "llamafactory", "peft", "json")
_NEAREST = "re-score with --granularity row (or tensor), or export --to peft / json, which are exact at any granularity"
# Parameter names are dotted identifiers; anything else would be read as regex syntax by Axolotl.
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.]+$")
_MAX_SEARCH_MODULES = 12  # 2**12 module subsets: beyond that LLaMA-Factory's search is not worth it


@dataclass
class ExportResult:
    """What an export wrote and how faithful it is (parameters the target tool adds to or loses from the core)."""

    format: str
    path: Path
    exact: bool
    added: int = 0
    lost: int = 0
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Ranges
# --------------------------------------------------------------------------------------------------


def row_ranges(selected: np.ndarray) -> list[tuple[int, int]]:
    """Half-open ``(start, end)`` runs of True in a 1-D boolean array.

    Example:
        >>> row_ranges(np.array([1, 1, 0, 1], bool))
        [(0, 2), (3, 4)]
    """
    sel = np.asarray(selected, dtype=bool).reshape(-1)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], sel.astype(np.int8), [0]])))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def ranges_to_mask(shape: tuple[int, ...], axis: int | None, ranges: list[list[int]]) -> torch.Tensor:
    """Inverse of the ``json`` export for one tensor: the full-shape boolean mask."""
    if axis is None:
        flat = torch.zeros(int(np.prod(shape, dtype=np.int64)), dtype=torch.bool)
        for a, b in ranges:
            flat[a:b] = True
        return flat.reshape(shape)
    along = torch.zeros(shape[axis], dtype=torch.bool)
    for a, b in ranges:
        along[a:b] = True
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return along.reshape(view).expand(shape).clone()


def _dim0_rows(cs: CoreSet, name: str) -> np.ndarray | None:
    """Per-row selection when the tensor's core is a union of whole dim-0 rows, else None."""
    shape = cs.shape(name)
    lay = cs.layout(name)
    if lay.kind == "tensor":
        return np.ones(shape[0] if shape else 1, dtype=bool)
    if lay.kind == "axis" and lay.axis == 0:
        return np.repeat(cs.unit_mask(name).numpy(), lay.group)
    m = cs.mask(name).reshape(shape[0] if shape else 1, -1)
    rows = m.any(dim=1)
    return rows.numpy() if bool((m.all(dim=1) == rows).all()) else None


# --------------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------------


def _header(cs: CoreSet, fmt: str) -> str:
    m = cs.metadata
    facts = {k: m.get(k) for k in ("task", "strategy", "granularity", "ratio") if m.get(k) is not None}
    src = f" from {cs.source}" if cs.source else ""
    return (f"# trace-transfer {__version__}: CoreSet{src} exported for {fmt}\n"
            f"# {', '.join(f'{k}={v}' for k, v in facts.items())}; "
            f"{cs.num_selected():,} of {cs.num_total():,} parameters; sha256={cs.file_sha256() or 'unsaved'}\n")


def _axolotl(cs: CoreSet, out: Path) -> ExportResult:
    import yaml

    patterns, refused, partial = [], [], False
    for name in cs.names():
        if not _PLAIN_NAME.match(name):
            raise ConfigError(f"tensor {name!r}: its name holds characters Axolotl would read as regex syntax; "
                              f"export --to json instead")
        rows = _dim0_rows(cs, name)
        if rows is None:
            refused.append(f"{name}: {cs.granularity(name)} core (Axolotl ranges select dim-0 rows only)")
        elif rows.all():
            patterns.append(f"^{name}$")
        else:
            partial = True
            patterns += [f"^{name}$[{a}:{b}]" for a, b in row_ranges(rows)]
    if refused:
        raise ConfigError(f"cannot export to axolotl exactly; {_NEAREST}:", refused)
    notes = ["Axolotl masks gradients of the frozen rows only: set weight_decay: 0.0 so AdamW's decoupled decay "
             "leaves them unchanged"] if partial else []
    text = _header(cs, "axolotl (unfrozen_parameters; src/axolotl/utils/freeze.py)")
    text += "".join(f"# NOTE: {n}\n" for n in notes)
    text += yaml.safe_dump({"unfrozen_parameters": patterns}, sort_keys=False, width=1 << 16)
    write_text_atomic(out, text)
    return ExportResult("axolotl", out, True, notes=notes)


def _layer_of(name: str) -> int | None:
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def llamafactory_trainable(names: list[str], num_layers: int, trainable_layers: int, modules: list[str],
                           extra: list[str]) -> set[str]:
    """Which parameter names LLaMA-Factory's freeze tuning leaves trainable (its rule, without LLaMA-Pro
    and multimodal projectors): last ``n`` layers for ``n > 0``, first ``-n`` for ``n < 0``; a name is
    trainable when ``.{layer}.{module}`` (``all``: ``.{layer}.``) or an extra module is a substring of it."""
    ids = range(max(0, num_layers - trainable_layers), num_layers) if trainable_layers > 0 \
        else range(min(-trainable_layers, num_layers))
    keys = [f".{i}.{'' if mod == 'all' else mod}" for mod in modules for i in ids] + list(extra)
    return {n for n in names if any(k in n for k in keys)}


def _llamafactory_vocab(names: list[str]) -> tuple[list[str], list[str]]:
    hidden, other = [], []
    for name in names:  # the same scan as _setup_freeze_tuning, so the modules it accepts
        for sep in (".0.", ".1."):
            if sep in name:
                hidden.append(name.split(sep)[-1].split(".")[0])
                break
        if re.search(r"\.\d+\.", name) is None and "." in name:
            other.append(name.split(".")[-2])
    return list(dict.fromkeys(hidden)), list(dict.fromkeys(other))


def _llamafactory(cs: CoreSet, out: Path, approximate: bool, num_layers: int | None) -> ExportResult:
    import yaml

    names = cs.all_names()
    layers = [i for i in map(_layer_of, names) if i is not None]
    num_layers = num_layers or (max(layers) + 1 if layers else 0)
    hidden, other = _llamafactory_vocab(names)
    if len(hidden) + len(other) > _MAX_SEARCH_MODULES:
        raise ConfigError(f"{len(hidden)} per-layer and {len(other)} other modules are too many to search "
                          f"LLaMA-Factory settings for; export --to axolotl, peft or json")
    numel = np.array([int(np.prod(cs.shape(n), dtype=np.int64)) for n in names], dtype=np.int64)
    core = np.array([cs.num_selected(n) if n in set(cs.names()) else 0 for n in names], dtype=np.int64)
    index = {n: i for i, n in enumerate(names)}

    def vec(keys: list[str]) -> np.ndarray:
        v = np.zeros(len(names), dtype=bool)
        v[[index[n] for n in names if any(k in n for k in keys)]] = True
        return v

    # Per module, the trainable vector of its first-n and last-n layers, built cumulatively.
    per_layer = {mod: [vec([f".{i}.{mod}"]) for i in range(num_layers)] for mod in hidden}
    blocks: dict[tuple[str, int], np.ndarray] = {}
    for mod, vs in per_layer.items():
        acc_first, acc_last = np.zeros(len(names), bool), np.zeros(len(names), bool)
        for k in range(1, num_layers + 1):
            acc_first = acc_first | vs[k - 1]
            acc_last = acc_last | vs[num_layers - k]
            blocks[mod, -k], blocks[mod, k] = acc_first, acc_last
    extras = {e: vec([e]) for e in other}
    best = None
    for n in range(-num_layers, num_layers + 1):
        for r in range(0 if n == 0 else 1, 1 if n == 0 else len(hidden) + 1):
            for mods in itertools.combinations(hidden, r) if n else [()]:
                base = np.zeros(len(names), bool)
                for mod in mods:
                    base |= blocks[mod, n]
                for re_ in range(len(other) + 1):
                    for ext in itertools.combinations(other, re_):
                        tr = base.copy()
                        for e in ext:
                            tr |= extras[e]
                        added = int((numel - core)[tr].sum())
                        lost = int(core[~tr].sum())
                        key = (added + lost, abs(n) * len(mods) + len(ext))
                        if best is None or key < best[0]:
                            best = (key, n, mods, ext, added, lost)
    assert best is not None
    _, n, mods, ext, added, lost = best
    exact = added == 0 and lost == 0
    if not exact and not approximate:
        raise ConfigError(
            f"LLaMA-Factory freeze tuning cannot express this core exactly (it trains whole tensors of a first/last "
            f"block of layers); the nearest setting adds {added:,} and loses {lost:,} of {cs.num_selected():,} core "
            f"parameters: pass --approximate to write it, or export --to axolotl (rows), peft or json (exact)")
    # Modules by name, never "all": "all" keys on ".{layer}." alone, which also matches e.g. expert indices.
    cfg: dict[str, Any] = {"finetuning_type": "freeze", "freeze_trainable_layers": n,
                           "freeze_trainable_modules": ",".join(mods) if mods else "all"}
    if ext:
        cfg["freeze_extra_modules"] = ",".join(ext)
    notes = [] if exact else [f"approximate: LLaMA-Factory trains {added:,} parameters outside the core and "
                              f"leaves {lost:,} core parameters frozen"]
    text = _header(cs, "LLaMA-Factory freeze tuning (src/llamafactory/model/adapter.py)")
    text += "".join(f"# NOTE: {x}\n" for x in notes)
    text += yaml.safe_dump(cfg, sort_keys=False)
    write_text_atomic(out, text)
    return ExportResult("llamafactory", out, exact, added, lost, notes)


def _json(cs: CoreSet, out: Path) -> ExportResult:
    params = {}
    for name in cs.names():
        shape, lay = cs.shape(name), cs.layout(name)
        if lay.kind == "axis":
            along = np.repeat(cs.unit_mask(name).numpy(), lay.group)
            params[name] = {"shape": list(shape), "axis": lay.axis, "ranges": [list(r) for r in row_ranges(along)]}
        else:
            params[name] = {"shape": list(shape), "axis": None,
                            "ranges": [list(r) for r in row_ranges(cs.mask(name).reshape(-1).numpy())]}
    write_json_atomic(out, {
        "format": "trace-transfer/coreset-ranges", "version": 1,
        "semantics": "train exactly these elements: half-open [start, end) index ranges along 'axis' "
                     "(null: over the flattened tensor, row-major); parameters not listed are frozen",
        "provenance": {"coreset": str(cs.source) if cs.source else None, "sha256": cs.file_sha256(),
                       "trace_transfer": __version__, **{k: cs.metadata.get(k) for k in ("task", "strategy", "granularity", "ratio")}},
        "parameters": params,
    })
    return ExportResult("json", out, True)


def _is_linear_weight(name: str, shape: tuple[int, ...]) -> bool:
    # A CoreSet knows names and shapes, not module types: 2-D weights outside embeddings are nn.Linear in
    # every supported family (PEFT itself refuses a non-Linear target when it loads the adapter).
    module = name.rsplit(".", 1)[0]
    return len(shape) == 2 and name.endswith(".weight") and not re.search(r"embed|wte|wpe", module)


def _peft(cs: CoreSet, out: Path, base_model: str | None) -> ExportResult:
    try:
        from peft import ShiraConfig
    except ImportError:
        raise ConfigError("export --to peft needs peft >= 0.15 (SHiRA adapters): pip install -U 'peft>=0.15'") from None
    from safetensors.torch import save_file

    linear, whole, refused = {}, [], []
    modules: dict[str, list[str]] = {}
    for name in cs.all_names():
        modules.setdefault(name.rsplit(".", 1)[0], []).append(name)
    core_names = set(cs.names())
    for name in cs.names():
        shape = cs.shape(name)
        full = cs.num_selected(name) == int(np.prod(shape, dtype=np.int64))
        if _is_linear_weight(name, shape) and not full:
            linear[name] = cs.mask(name)
            continue
        module = name.rsplit(".", 1)[0]
        if full and all(n in core_names and cs.num_selected(n) == int(np.prod(cs.shape(n), dtype=np.int64))
                        for n in modules[module]):
            whole.append(module)
        elif full:
            other = next(n for n in modules[module] if n != name)
            refused.append(f"{name}: the whole tensor is core but {other} of the same module is not "
                           f"(PEFT trains a whole module through modules_to_save)")
        else:
            refused.append(f"{name}: part of a {len(shape)}-D non-Linear tensor is core (SHiRA adapts nn.Linear only)")
    if refused:
        raise ConfigError("cannot export to a PEFT adapter exactly; export --to json, or re-score with a --scope "
                          "that leaves these tensors out:", refused)
    sizes = {n: sum(cs.shape(n)) for n in linear}
    r = max((-(-int(m.sum()) // sizes[n]) for n, m in linear.items()), default=1)
    tensors, max_mult = {}, 1
    for name, m in linear.items():
        k_slots = r * sizes[name]
        if k_slots > m.numel():
            raise ConfigError(f"{name}: SHiRA rank {r} (set by the layer with the largest core) needs "
                              f"{k_slots:,} slots but the matrix holds {m.numel():,}; export this core in "
                              f"parts (coreset diff) or --to json")
        idx = torch.nonzero(m, as_tuple=False).T.to(torch.int32)
        # Spread the extra slots evenly over the core: multiplicities differ by at most one.
        reps = torch.arange(k_slots) % idx.shape[1]
        max_mult = max(max_mult, -(-k_slots // idx.shape[1]))
        prefix = f"base_model.model.{name.rsplit('.', 1)[0]}"
        tensors[f"{prefix}.shira_indices"] = idx[:, reps].contiguous()
        tensors[f"{prefix}.shira_weight"] = torch.zeros(k_slots, dtype=torch.float32)
    base_model = base_model or cs.metadata.get("model")
    if whole:
        # PEFT stores a modules_to_save copy in the adapter and reads it back on load: it needs the base values.
        weights = Path(str(base_model)) if base_model else None
        if weights is None or not weights.exists():
            raise ConfigError(f"{len(whole)} whole modules of the core (e.g. {whole[0]}) go to modules_to_save, whose "
                              f"base weights the adapter must hold: pass --base-model MODEL_DIR")
        reader = open_checkpoint(weights)
        for module in whole:
            for name in modules[module]:
                tensors[f"base_model.model.{name}"] = reader.get(name)
    # inference_mode=True is what save_pretrained records; PeftModel.from_pretrained(is_trainable=True)
    # flips it. Indices come from the weights file, so no mask function is needed when loading.
    config = ShiraConfig(r=r, mask_type="coreset", inference_mode=True, base_model_name_or_path=base_model,
                         target_modules=sorted(n.rsplit(".", 1)[0] for n in linear) or None,
                         modules_to_save=sorted(whole) or None)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    with atomic_path(out / "adapter_model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    notes = [f"SHiRA r={r}: {len(linear)} Linear weights adapted, {len(whole)} whole modules in modules_to_save"]
    if max_mult > 1:
        notes.append(f"max_multiplicity={max_mult}: in layers with fewer core elements than r·(in+out) slots some "
                     f"indices repeat; their updates add up, so those elements take up to {max_mult}× the step")
    write_json_atomic(out / "trace_transfer_export.json", {
        "coreset": str(cs.source) if cs.source else None, "sha256": cs.file_sha256(), "trace_transfer": __version__,
        "r": r, "max_multiplicity": max_mult, "targets": sorted(linear), "modules_to_save": sorted(whole)})
    return ExportResult("peft", out, True, notes=notes)


# --------------------------------------------------------------------------------------------------
# The verb
# --------------------------------------------------------------------------------------------------


def export_coreset(coreset: CoreSet | str | Path, fmt: str, out: str | Path, *, approximate: bool = False,
                   force: bool = False, num_layers: int | None = None, base_model: str | None = None) -> ExportResult:
    """Write ``coreset`` as the freezing configuration of another trainer (see the module docstring).

    Args:
        coreset: a CoreSet or the path of a ``*.coreset.safetensors`` file.
        fmt: one of ``EXPORT_FORMATS``.
        out: the file to write (``peft``: a directory).
        approximate: ``llamafactory`` only — write the closest setting when none is exact.
        force: overwrite an existing ``out``.
        num_layers: ``llamafactory`` — the model's layer count (default: inferred from the tensor names).
        base_model: ``peft`` — ``base_model_name_or_path`` for the adapter (default: the CoreSet's model).

    Returns:
        ExportResult: the path, whether the trainable set equals the core, parameters added/lost.

    Raises:
        ConfigError: unknown format; ``out`` exists without ``force``; the core is not expressible in the
            format (the message names the tensors and the nearest exact alternative).
    """
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"export format {fmt!r} is not known; choose one of: {', '.join(EXPORT_FORMATS)}")
    if approximate and fmt != "llamafactory":
        raise ConfigError(f"--approximate applies to --to llamafactory only; {fmt} exports are exact or refused")
    out = Path(out)
    if out.exists() and not force and not (out.is_dir() and not any(out.iterdir())):
        raise ConfigError(f"{out} exists; pass --force to overwrite it, or choose another --out")
    cs = coreset if isinstance(coreset, CoreSet) else CoreSet.load(coreset)
    if fmt == "axolotl":
        return _axolotl(cs, out)
    if fmt == "llamafactory":
        return _llamafactory(cs, out, approximate, num_layers)
    if fmt == "peft":
        return _peft(cs, out, base_model)
    return _json(cs, out)
