"""Layer maps between a source and a target model from their CKA matrix.

A mapper turns an ``L_s x L_t`` similarity matrix into one target layer per source layer. Built-ins:

- ``argmax``: each source layer's most similar target layer (TRACE §5.5). Not order-preserving.
- ``monotone``: order-preserving map minimising the summed ``1 - CKA`` by dynamic programming; first
  and last layers pinned to each other; many-to-one allowed (a deeper model needs it one way or the other).
- ``hungarian``: maximum-similarity assignment (scipy). With ``L_s > L_t`` every target is offered
  ``ceil(L_s / L_t)`` times so that every source layer gets one, spread evenly.
- ``relative-depth``: ``i * (L_t - 1) / (L_s - 1)`` rounded half up; ignores the similarities (a baseline).

The same mapper applied to the transposed matrix gives the reverse map (each target layer's source),
which transfer needs when the target is deeper: a forward map leaves some target layers without a source.

Each row carries its CKA, the margin over the best other choice (negative when the method overrode the
row's argmax, e.g. to keep order) and, with ``bootstrap > 0``, a stability: the share of probe
resamples on which the method picks the same layer. Resamples draw ``fraction * n`` probes *without*
replacement: duplicated probes would put self-similarity terms back into the debiased estimator.

Every map carries a **verdict** on its CKA matrix (:func:`cka_verdict`, saved in ``layer_map.json``):
whether the mapped layers are more similar than a random layer by more than flat CKA or probe
resampling noise can explain. Between independently trained tiny models CKA is flat and the map is
noise; the pipeline then maps by relative depth instead.

Layer indices are 0-based decoder-layer indices, as in ``model.layers.{i}`` parameter names.

Example:
    >>> from trace_transfer.cka.layermap import map_layers
    >>> lm = map_layers("out/cka", method="monotone", bootstrap=100)
    >>> lm.forward[0], lm.reverse[lm.num_target_layers - 1]
    (0, 31)
    >>> lm.save("layer_map.json")
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from trace_transfer._version import versions
from trace_transfer.checkpoint import read_json_object, write_json_atomic
from trace_transfer.errors import ArtifactError, ArtifactNotFoundError, ConfigError
from trace_transfer.registry import Registry, must_be_callable

FORMAT = "trace-transfer/layer-map"
FORMAT_VERSION = 1

LayerMapper = Callable[[np.ndarray], np.ndarray]
"""``(L_s, L_t)`` similarity matrix (finite) -> int array of length ``L_s`` with a target per row."""


LAYER_MAPPERS: Registry[LayerMapper] = Registry(
    "layer-mapping method", cli_hint="--method", how_to_add="or register your own with register_layer_mapper",
    validate=must_be_callable("(L_s x L_t similarity) -> L_s target layers"))


def register_layer_mapper(name: str, fn: LayerMapper | None = None, *, description: str = "",
                          replace: bool = False, overwrite: bool = False) -> Any:
    """Register a layer-mapping method under ``name``; usable as a decorator.

    ``overwrite`` is the older spelling of ``replace``; either replaces a registered method on purpose.

    Example:
        >>> @register_layer_mapper("nearest-even", description="argmax over even target layers")
        ... def nearest_even(sim):
        ...     return 2 * sim[:, ::2].argmax(axis=1)

    Raises:
        ConfigError: the name is malformed or taken, or ``fn`` is not callable.
    """
    return LAYER_MAPPERS.register(name, fn, description=description, replace=replace or overwrite)


def available_layer_mappers() -> dict[str, str]:
    """Registered method names with their one-line descriptions."""
    return LAYER_MAPPERS.describe()


def get_layer_mapper(name: str) -> LayerMapper:
    return LAYER_MAPPERS.get(name)


@register_layer_mapper("argmax")
def _argmax(sim: np.ndarray) -> np.ndarray:
    """Most similar target layer per source layer (the paper)."""
    return sim.argmax(axis=1)


@register_layer_mapper("monotone")
def _monotone(sim: np.ndarray) -> np.ndarray:
    """Order-preserving map minimising sum(1 - CKA), endpoints pinned, many-to-one allowed."""
    Ls, Lt = sim.shape
    if Ls == 1:  # one layer cannot be pinned to both ends
        return sim.argmax(axis=1)
    cost = 1.0 - sim
    # best[i, j]: cheapest non-decreasing path for rows 0..i that ends with row i on target j.
    best = np.full((Ls, Lt), np.inf)
    came_from = np.zeros((Ls, Lt), dtype=np.int64)
    best[0, 0] = cost[0, 0]
    for i in range(1, Ls):
        # Running minimum over j' <= j of the previous row, with where it was attained.
        prefix_arg = np.zeros(Lt, dtype=np.int64)
        for j in range(1, Lt):
            prefix_arg[j] = j if best[i - 1, j] < best[i - 1, prefix_arg[j - 1]] else prefix_arg[j - 1]
        best[i] = cost[i] + best[i - 1, prefix_arg]
        came_from[i] = prefix_arg
    path = np.empty(Ls, dtype=np.int64)
    path[-1] = Lt - 1
    for i in range(Ls - 1, 0, -1):
        path[i - 1] = came_from[i, path[i]]
    return path


@register_layer_mapper("hungarian")
def _hungarian(sim: np.ndarray) -> np.ndarray:
    """Maximum-similarity assignment; targets reused evenly when the source is deeper."""
    from scipy.optimize import linear_sum_assignment

    Ls, Lt = sim.shape
    copies = math.ceil(Ls / Lt)
    rows, cols = linear_sum_assignment(np.tile(sim, (1, copies)), maximize=True)
    out = np.empty(Ls, dtype=np.int64)
    out[rows] = cols % Lt
    return out


@register_layer_mapper("relative-depth")
def _relative_depth(sim: np.ndarray) -> np.ndarray:
    """Same relative depth, ignoring the similarities: i * (L_t - 1) / (L_s - 1), rounded half up."""
    Ls, Lt = sim.shape
    if Ls == 1:
        return np.zeros(1, dtype=np.int64)
    # Round half up (np.rint rounds half to even, which makes the map look irregular).
    return np.floor(np.arange(Ls) * (Lt - 1) / (Ls - 1) + 0.5).astype(np.int64)


@dataclass
class LayerMapRow:
    """One mapped layer. In forward rows ``source`` is the row; in reverse rows ``target`` is."""

    source: int
    target: int
    cka: float | None
    margin: float | None
    stability: float | None = None


@dataclass
class LayerMap:
    """Forward (source layer -> target layer) and reverse (target layer -> source layer) maps."""

    method: str
    num_source_layers: int
    num_target_layers: int
    rows: list[LayerMapRow]
    reverse_rows: list[LayerMapRow]
    provenance: dict[str, Any] = field(default_factory=dict)
    verdict: dict[str, Any] = field(default_factory=dict)  # is the CKA informative? see cka_verdict()

    @property
    def informative(self) -> bool | None:
        """Whether the CKA matrix behind this map carries layer structure (None: not judged)."""
        return self.verdict.get("informative")

    def __post_init__(self) -> None:
        problems = []
        if [r.source for r in self.rows] != list(range(self.num_source_layers)):
            problems.append(f"forward rows must list source layers 0..{self.num_source_layers - 1} in order")
        if [r.target for r in self.reverse_rows] != list(range(self.num_target_layers)):
            problems.append(f"reverse rows must list target layers 0..{self.num_target_layers - 1} in order")
        problems += [f"forward row {r.source}: target {r.target} out of range" for r in self.rows
                     if not 0 <= r.target < self.num_target_layers]
        problems += [f"reverse row {r.target}: source {r.source} out of range" for r in self.reverse_rows
                     if not 0 <= r.source < self.num_source_layers]
        if problems:
            raise ArtifactError("invalid layer map:\n" + "\n".join(f"  - {p}" for p in problems))

    @property
    def forward(self) -> dict[int, int]:
        """Source layer -> target layer."""
        return {r.source: r.target for r in self.rows}

    @property
    def reverse(self) -> dict[int, int]:
        """Target layer -> source layer (every target layer has one)."""
        return {r.target: r.source for r in self.reverse_rows}

    @classmethod
    def relative_depth(cls, num_source_layers: int, num_target_layers: int) -> LayerMap:
        """A map by relative depth alone, for when no CKA is available (e.g. same-family transfer)."""
        sim = np.zeros((num_source_layers, num_target_layers))
        fwd, rev = _relative_depth(sim), _relative_depth(sim.T)
        return cls("relative-depth", num_source_layers, num_target_layers,
                   [LayerMapRow(i, int(j), None, None) for i, j in enumerate(fwd)],
                   [LayerMapRow(int(i), j, None, None) for j, i in enumerate(rev)],
                   {"created": _now(), "versions": versions()})

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "method": self.method,
                "num_source_layers": self.num_source_layers, "num_target_layers": self.num_target_layers,
                "forward": {str(k): v for k, v in self.forward.items()},
                "reverse": {str(k): v for k, v in self.reverse.items()},
                "rows": [asdict(r) for r in self.rows], "reverse_rows": [asdict(r) for r in self.reverse_rows],
                "provenance": self.provenance, "verdict": self.verdict}

    @classmethod
    def from_dict(cls, d: dict[str, Any], origin: str = "<dict>") -> LayerMap:
        if d.get("format") != FORMAT:
            raise ArtifactError(f"{origin} is not a trace-transfer layer map (format={d.get('format')!r}); "
                                "create one with `trace-transfer map-layers --cka DIR --out layer_map.json`")
        if d.get("format_version", 0) > FORMAT_VERSION:
            raise ArtifactError(f"{origin} has layer-map format version {d['format_version']}; this trace-transfer "
                                f"reads up to {FORMAT_VERSION}, upgrade it")
        try:
            return cls(d["method"], int(d["num_source_layers"]), int(d["num_target_layers"]),
                       [LayerMapRow(**r) for r in d["rows"]], [LayerMapRow(**r) for r in d["reverse_rows"]],
                       d.get("provenance", {}), d.get("verdict", {}))
        except (KeyError, TypeError) as exc:
            raise ArtifactError(f"{origin}: malformed layer map ({exc!r})") from exc

    def save(self, path: str | Path) -> Path:
        """Write JSON atomically."""
        write_json_atomic(path, self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> LayerMap:
        path = Path(path)
        if not path.exists():
            raise ArtifactNotFoundError(f"layer map {str(path)!r} not found; create it with "
                                        "`trace-transfer map-layers --cka DIR --out layer_map.json`")
        d = read_json_object(path, "re-create it with `trace-transfer map-layers`")
        return cls.from_dict(d, origin=str(path))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _finite(sim: np.ndarray) -> np.ndarray:
    """Replace NaN (degenerate layers) by a value below any CKA so no method prefers them."""
    bad = np.isnan(sim)
    if bad.any():
        rows = sorted({int(i) for i in np.nonzero(bad.all(axis=1))[0]})
        cols = sorted({int(j) for j in np.nonzero(bad.all(axis=0))[0]})
        warnings.warn(f"CKA matrix has NaN entries (degenerate source layers {rows}, target layers {cols}); "
                      "they are treated as least similar", RuntimeWarning, stacklevel=3)
        sim = np.where(bad, -2.0, sim)
    return sim


def _rows(sim: np.ndarray, choice: np.ndarray, stability: np.ndarray | None, reverse: bool) -> list[LayerMapRow]:
    out = []
    for i, j in enumerate(choice):
        row = sim[i]
        others = np.delete(row, j)
        others = others[~np.isnan(others)]
        value = float(row[j])
        cka = None if math.isnan(value) else value
        margin = None if cka is None or others.size == 0 else value - float(others.max())
        stab = None if stability is None else float(stability[i])
        out.append(LayerMapRow(int(j), i, cka, margin, stab) if reverse else LayerMapRow(i, int(j), cka, margin, stab))
    return out


def map_layers(cka: Any, method: str = "monotone", *, bootstrap: int = 0, seed: int = 0,
               fraction: float = 0.8) -> LayerMap:
    """Map source layers to target layers (and back) from a CKA matrix.

    Args:
        cka: a :class:`~trace_transfer.cka.kernels.CKAResult`, a directory written by ``trace-transfer cka``,
            or a bare ``(L_s, L_t)`` array (no bootstrap then).
        method: a registered mapper (see :func:`available_layer_mappers`).
        bootstrap: number of probe resamples for the stability column (0 = skip). Needs the per-layer
            kernels saved with the CKA result.
        seed: resampling seed.
        fraction: share of probes drawn (without replacement) per resample.

    Returns:
        The :class:`LayerMap`.

    Raises:
        ConfigError: unknown method or bad bootstrap settings.
        ArtifactNotFoundError: bootstrap requested but the CKA result kept no kernels.

    Example:
        >>> map_layers(np.eye(4), method="argmax").forward
        {0: 0, 1: 1, 2: 2, 3: 3}
    """
    from trace_transfer.cka.kernels import CKAResult

    mapper = get_layer_mapper(method)
    if isinstance(cka, (str, Path)):
        cka = CKAResult.load(cka)
    result = cka if isinstance(cka, CKAResult) else None
    sim = np.asarray(result.matrix if result is not None else cka, dtype=np.float64)
    if sim.ndim != 2 or 0 in sim.shape:
        raise ConfigError(f"CKA matrix must be 2-D and non-empty, got shape {sim.shape}")
    clean = _finite(sim)
    forward, reverse = _checked(mapper(clean), sim.shape, method), _checked(mapper(clean.T), sim.T.shape, method)

    stab_f = stab_r = None
    if bootstrap:
        if bootstrap < 0 or not 0.0 < fraction <= 1.0:
            raise ConfigError(f"need bootstrap >= 0 and 0 < fraction <= 1, got {bootstrap} and {fraction}")
        if result is None:
            raise ConfigError("bootstrap stability needs a CKAResult with kernels, not a bare matrix")
        rng = np.random.default_rng(seed)
        m = max(4, int(round(fraction * result.n)))
        hits_f, hits_r = np.zeros(len(forward)), np.zeros(len(reverse))
        samples = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # degenerate layers were reported above
            for _ in range(bootstrap):
                idx = np.sort(rng.choice(result.n, size=min(m, result.n), replace=False))
                sample = np.where(np.isnan(s := result.recompute(idx)), -2.0, s)
                samples.append(sample)
                hits_f += mapper(sample) == forward
                hits_r += mapper(sample.T) == reverse
        stab_f, stab_r = hits_f / bootstrap, hits_r / bootstrap
        entry_sd = float(np.median(np.std(np.stack(samples), axis=0))) if bootstrap > 1 else None
    else:
        entry_sd = None

    provenance: dict[str, Any] = {"method": method, "bootstrap": bootstrap, "seed": seed if bootstrap else None,
                                  "fraction": fraction if bootstrap else None, "created": _now(),
                                  "versions": versions()}
    if result is not None:
        provenance["cka"] = {"directory": str(result.directory) if result.directory else None,
                             "variant": result.variant, "n": result.n,
                             **{k: result.provenance.get(k) for k in ("source", "target", "probes", "pooling")}}
    rows_f, rows_r = _rows(sim, forward, stab_f, False), _rows(sim.T, reverse, stab_r, True)
    verdict = cka_verdict(clean, forward, reverse, rows_f + rows_r, entry_sd)
    return LayerMap(method, sim.shape[0], sim.shape[1], rows_f, rows_r, provenance, verdict)


# The least path gain that counts as layer structure. Independently trained tiny models (the demo pair,
# Llama 3x96 -> Qwen3 4x128) have CKA 0.17-0.34 with argmax margins <= 0.04: a map chosen on such a
# matrix gains at most ~0.04 over a random layer, so 0.05 sits just above what flat CKA produces, while
# a real correspondence (same model, or planted depth structure) gains 0.2-0.6. With a bootstrap the
# bar rises to 3 standard deviations of the entries' resampling noise when that is larger: a gain the
# probe sample could produce by chance says nothing.
MIN_PATH_GAIN = 0.05
NOISE_SDS = 3.0


def cka_verdict(sim: np.ndarray, forward: np.ndarray, reverse: np.ndarray, rows: list[LayerMapRow],
                entry_sd: float | None) -> dict[str, Any]:
    """Is the CKA matrix informative about which layers correspond?

    The statistic is the *path gain*: the mean, over source and target layers, of the CKA of the
    mapped layer minus the mean CKA of that layer's row — how much better the map is than picking a
    layer at random. Margins (best minus runner-up) are reported too but do not decide: in a deep
    model neighbouring layers are alike, so a real correspondence can have small margins.

    Returns ``{"informative", "path_gain", "threshold", "entry_sd", "median_margin",
    "mean_stability", "reason"}``.
    """
    gain_f = sim[np.arange(sim.shape[0]), forward] - sim.mean(axis=1)
    gain_r = sim.T[np.arange(sim.shape[1]), reverse] - sim.T.mean(axis=1)
    gain = float(np.concatenate([gain_f, gain_r]).mean())
    threshold = max(MIN_PATH_GAIN, NOISE_SDS * entry_sd) if entry_sd is not None else MIN_PATH_GAIN
    margins = [r.margin for r in rows if r.margin is not None]
    stabs = [r.stability for r in rows if r.stability is not None]
    informative = bool(gain >= threshold)
    why = (f"path gain {gain:.3f} {'>=' if informative else '<'} threshold {threshold:.3f} "
           f"(max of {MIN_PATH_GAIN} and {NOISE_SDS:g} x bootstrap SD {entry_sd:.3f})" if entry_sd is not None else
           f"path gain {gain:.3f} {'>=' if informative else '<'} threshold {threshold:.3f} (no bootstrap)")
    return {"informative": informative, "path_gain": gain, "threshold": threshold, "entry_sd": entry_sd,
            "median_margin": float(np.median(margins)) if margins else None,
            "mean_stability": float(np.mean(stabs)) if stabs else None,
            "cka_range": [float(sim.min()), float(sim.max())], "reason": why}


def _checked(choice: Any, shape: tuple[int, int], method: str) -> np.ndarray:
    choice = np.asarray(choice)
    if choice.shape != (shape[0],) or not np.issubdtype(choice.dtype, np.integer) or \
            (choice.size and (choice.min() < 0 or choice.max() >= shape[1])):
        raise ConfigError(f"layer mapper {method!r} must return {shape[0]} integer indices in [0, {shape[1]}), "
                          f"got {choice!r}")
    return choice.astype(np.int64)
