"""Probe texts for CKA: shipped sets, user files and `datasets` sources (see probe_texts/README.md)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from trace_transfer.errors import ArtifactError, ArtifactNotFoundError, ConfigError

PROBES_DIR = Path(__file__).resolve().parent / "probe_texts"


def shipped_probe_sets() -> list[str]:
    """Names of the probe sets shipped in ``trace_transfer/cka/probe_texts`` (``general``, ``math``, ...)."""
    return sorted(p.stem for p in PROBES_DIR.glob("*.jsonl"))


def load_probe_texts(ref: str | Path | Sequence[str], *, max_probes: int | None = None) -> list[str]:
    """Load probe texts.

    Args:
        ref: a ``.jsonl`` file (one ``{"text": ..., "domain": ...}`` object per line), a ``.txt`` file
            (one text per line), a shipped set name (``general``, ``probes/math.jsonl``, ``all``), a
            comma-separated list of those, ``hf:<id>:<split>:<field>`` or
            ``hf:<id>:<config>:<split>:<field>`` (loaded with ``datasets``), or a list of strings.
        max_probes: keep only the first N texts.

    Returns:
        The texts, in file order.

    Raises:
        ArtifactNotFoundError: the file or shipped set does not exist, or the dataset cannot be loaded.
        ArtifactError: a line is not a JSON object with a non-empty ``"text"`` string.

    Example:
        >>> texts = load_probe_texts("general", max_probes=64)
    """
    if isinstance(ref, (list, tuple)):
        texts = [str(t) for t in ref]
        source = "<list>"
    else:
        source = str(ref)
        if source.startswith("hf:"):
            texts = _load_hf_texts(source)
        else:
            texts = []
            parts = [source] if Path(source).exists() else [p.strip() for p in source.split(",") if p.strip()]
            for part in parts:
                for path in _resolve_probe_paths(part):
                    texts.extend(_read_probe_file(path))
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise ArtifactError(f"probe source {source!r}: text #{bad[0]} is empty; remove empty probe texts")
    if max_probes is not None:
        if max_probes < 1:
            raise ConfigError(f"max_probes must be >= 1, got {max_probes}")
        texts = texts[:max_probes]
    if not texts:
        raise ArtifactError(f"probe source {source!r} holds no texts")
    return texts


def _resolve_probe_paths(ref: str) -> list[Path]:
    path = Path(ref).expanduser()
    if path.exists():
        return [path]
    if ref == "all":
        return sorted(PROBES_DIR.glob("*.jsonl"))
    # 'general', 'general.jsonl' and 'probes/general.jsonl' all name the shipped set.
    name = Path(ref).name.removesuffix(".jsonl")
    shipped = PROBES_DIR / f"{name}.jsonl"
    if shipped.exists() and (Path(ref).parent in (Path("."), Path("probes"))):
        return [shipped]
    raise ArtifactNotFoundError(
        f"probe file {ref!r} not found; pass a .jsonl/.txt path, one of the shipped sets "
        f"{shipped_probe_sets() + ['all']}, or hf:<dataset>:<split>:<field>"
    )


def _read_probe_file(path: Path) -> list[str]:
    texts: list[str] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if path.suffix != ".jsonl":
                texts.append(line.rstrip("\n"))
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ArtifactError(f"{path}:{lineno}: not valid JSON ({exc.msg}); each line must be "
                                    '{"text": "...", "domain": "..."}') from exc
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"].strip():
                raise ArtifactError(f'{path}:{lineno}: expected an object with a non-empty "text" string, '
                                    f"got {line.strip()[:80]!r}")
            texts.append(obj["text"])
    return texts


def _load_hf_texts(ref: str) -> list[str]:
    parts = ref.split(":")[1:]
    if len(parts) == 3:
        name, config, split, fieldname = parts[0], None, parts[1], parts[2]
    elif len(parts) == 4:
        name, config, split, fieldname = parts
    else:
        raise ConfigError(f"bad dataset reference {ref!r}; use hf:<id>:<split>:<field> or "
                          "hf:<id>:<config>:<split>:<field>, e.g. hf:wikitext:wikitext-2-raw-v1:test:text")
    import datasets  # heavy; only needed for this source

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # datasets raises many unrelated types for "not reachable / not found"
        raise ArtifactNotFoundError(f"could not load dataset {name!r} (config={config}, split={split!r}): {exc}. "
                                    "Without network access, export the texts to a local .jsonl file.") from exc
    if fieldname not in ds.column_names:
        raise ConfigError(f"dataset {name!r} has no field {fieldname!r}; fields: {ds.column_names}")
    return [t for t in ds[fieldname] if isinstance(t, str) and t.strip()]
