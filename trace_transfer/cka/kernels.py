"""Centered kernel alignment (CKA) between every decoder layer of two models, on probe texts.

Pipeline: probe texts -> pooled hidden state per text and layer (one vector per text, so two models
with different tokenizers stay aligned) -> one n x n kernel per layer -> the whole L_s x L_t matrix.

Why it is built this way:
- Biased CKA drifts toward 1 when n < d, so the U-centered (debiased) estimator is the default.
- Everything is float64 with feature columns centered first; no epsilon is ever added to a
  denominator, a degenerate (zero-norm) layer gives a NaN row/column and a warning instead.
- All pairs at once: each layer's kernel is centered once, flattened (upper triangle, off-diagonal
  entries weighted by sqrt(2) so inner products are preserved) and normalised; the matrix is then one
  matrix product instead of L_s * L_t HSIC evaluations.
- Probe activations are pooled batch by batch and spilled to a disk-backed store per layer, so a large
  probe set never sits in memory for all layers of both models; kernels are built one layer at a time.

Public API::

    load_probe_texts(ref, max_probes=None) -> list[str]
    iter_pooled_activations(model, tokenizer, texts, ...) -> yields (indices, (L, b, d) float64 tensor)
    capture_pooled_activations(model, tokenizer, texts, ...) -> np.ndarray (L, n, d)
    cka(X, Y, variant=...) / linear_cka_features(X, Y, debiased=...) -> float
    cka_matrix(source_kernels, target_kernels, debiased=...) -> CKAMatrix
    cka_matrix_from_features(source_layers, target_layers, variant=...) -> np.ndarray
    compute_cka(source_model, target_model, probes, out_dir, ...) -> CKAResult

Probe loading lives in ``_cka_probes.py`` and activation capture in ``_cka_capture.py``; both are
re-exported here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import struct
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from trace_transfer.cka.capture import (
    POOLINGS,
    _FeatureStore,
    capture_pooled_activations,
    iter_pooled_activations,
)
from trace_transfer.cka.probe_sets import load_probe_texts, shipped_probe_sets
from trace_transfer.cka.variants import VARIANTS
from trace_transfer._version import versions
from trace_transfer.checkpoint import METADATA_KEY, atomic_path, open_safetensors, save_safetensors_atomic, write_json_atomic
from trace_transfer.errors import ArtifactError, ArtifactNotFoundError, ConfigError

_VARIANT_ALIASES = {"debiased": "linear-debiased", "biased": "linear", "linear-biased": "linear", "rbf-biased": "rbf"}
FORMAT = "trace-transfer/cka"
FORMAT_VERSION = 1

__all__ = [
    "VARIANTS", "POOLINGS", "BestTarget", "CKAMatrix", "CKAResult", "load_probe_texts", "shipped_probe_sets",
    "iter_pooled_activations", "capture_pooled_activations", "cka", "linear_cka_features", "cka_matrix",
    "cka_matrix_from_features", "kernel_matrix", "center_gram", "ucenter_gram", "compute_cka",
    "plot_cka_heatmap", "resolve_variant",
]


# --------------------------------------------------------------------------------------------------
# Kernels and CKA
# --------------------------------------------------------------------------------------------------


def resolve_variant(variant: str) -> tuple[str, bool, bool]:
    """``variant`` -> (canonical name, uses the RBF kernel, debiased)."""
    name = _VARIANT_ALIASES.get(variant, variant)
    if name not in VARIANTS:
        raise ConfigError(f"unknown CKA variant {variant!r}; choose one of {list(VARIANTS)} "
                          f"(aliases: {sorted(_VARIANT_ALIASES)})")
    return name, name.startswith("rbf"), name.endswith("debiased")


def _centered_features(X: Any) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ConfigError(f"features must be a 2-D (samples x features) array, got shape {X.shape}")
    return X - X.mean(axis=0, keepdims=True)


def kernel_matrix(X: Any, variant: str = "linear-debiased", rbf_sigma: float = 0.5) -> np.ndarray:
    """The ``n x n`` kernel of features ``X`` (rows = samples) in float64, before (U-)centering.

    Linear: Gram of the column-centered features. RBF: ``exp(-D² / (2 t² median(D²)))`` with the
    median over all entries of the squared-distance matrix (diagonal included) and ``t = rbf_sigma``.
    """
    _, rbf, _ = resolve_variant(variant)
    Xc = _centered_features(X)
    G = Xc @ Xc.T
    if not rbf:
        return G
    sq = np.diag(G)
    D2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * G, 0.0)  # clip round-off below zero
    med = float(np.median(D2))
    if med == 0.0:
        warnings.warn("RBF bandwidth undefined: the median squared distance is 0 (most samples identical); "
                      "this layer's CKA is NaN", RuntimeWarning, stacklevel=2)
        return np.full_like(G, np.nan)
    return np.exp(-D2 / (2.0 * rbf_sigma**2 * med))


def center_gram(K: np.ndarray) -> np.ndarray:
    """H K H with H = I - 11ᵀ/n, done with row/column means (O(n²), no n³ product)."""
    K = np.asarray(K, dtype=np.float64)
    col = K.mean(axis=0)
    return K - col[None, :] - K.mean(axis=1)[:, None] + col.mean()


def ucenter_gram(K: np.ndarray) -> np.ndarray:
    """U-centered kernel (Székely & Rizzo; Song et al. 2012): its inner products give the unbiased HSIC.

    Requires n >= 4.
    """
    K = np.array(K, dtype=np.float64)  # copy: modified in place
    n = K.shape[0]
    if n < 4:
        raise ConfigError(f"debiased CKA needs at least 4 samples, got {n}")
    np.fill_diagonal(K, 0.0)
    col = K.sum(axis=0) / (n - 2)
    total = K.sum() / ((n - 1) * (n - 2))
    K -= col[None, :]
    K -= col[:, None]
    K += total
    np.fill_diagonal(K, 0.0)
    return K


def cka(X: Any, Y: Any, variant: str = "linear-debiased", rbf_sigma: float = 0.5) -> float:
    """CKA between two representations of the same n samples (rows), via their kernels.

    Example:
        >>> cka(np.random.randn(100, 10), np.random.randn(100, 20), variant="linear")
    """
    _, _, debiased = resolve_variant(variant)
    if len(X) != len(Y):
        raise ConfigError(f"X and Y must have the same number of samples (rows): {len(X)} != {len(Y)}")
    m = cka_matrix([kernel_matrix(X, variant, rbf_sigma)], [kernel_matrix(Y, variant, rbf_sigma)], debiased=debiased)
    return float(m.matrix[0, 0])


def linear_cka_features(X: Any, Y: Any, debiased: bool = True) -> float:
    """Linear CKA in feature space (d x d products, no n x n Gram): ‖XᵀY‖² / (‖XᵀX‖ ‖YᵀY‖).

    The debiased form follows Kornblith et al.'s feature-space estimator. Same value as :func:`cka`;
    cheaper when n is much larger than the widths.
    """
    Xc, Yc = _centered_features(X), _centered_features(Y)
    n = Xc.shape[0]

    def hsic(A: np.ndarray, B: np.ndarray) -> float:
        dot = float(np.sum((A.T @ B) ** 2))
        if not debiased:
            return dot
        ra, rb = np.einsum("ij,ij->i", A, A), np.einsum("ij,ij->i", B, B)
        return dot - n / (n - 2) * float(ra @ rb) + float(ra.sum() * rb.sum()) / ((n - 1) * (n - 2))

    denom = math.sqrt(hsic(Xc, Xc) * hsic(Yc, Yc))
    if denom == 0.0:
        warnings.warn("a representation has zero variance: CKA is NaN", RuntimeWarning, stacklevel=2)
        return float("nan")
    return hsic(Xc, Yc) / denom


class CKAMatrix(NamedTuple):
    matrix: np.ndarray  # (L_s, L_t) float64
    source_norms: np.ndarray  # Frobenius norm of each source layer's (U-)centered kernel
    target_norms: np.ndarray


def _triangle_vector(K: np.ndarray, debiased: bool) -> tuple[np.ndarray, float]:
    """The (U-)centered kernel's upper triangle as a vector, and the kernel's Frobenius norm.

    Dot products of these vectors are (up to one common factor 2, which normalisation removes) the
    Frobenius inner products of the centered kernels, at half the memory and half the product cost.
    Centering is fused into the row-by-row copy, so no centered n x n matrix is materialised.
    """
    n = K.shape[0]
    out = np.empty(n * (n - 1) // 2 if debiased else n * (n + 1) // 2)
    if debiased:
        if n < 4:
            raise ConfigError(f"debiased CKA needs at least 4 samples, got {n}")
        diag = np.diagonal(K)
        col = (K.sum(axis=0) - diag) / (n - 2)
        total = (K.sum() - diag.sum()) / ((n - 1) * (n - 2))
        # Ũ_ij = K_ij - col_i - col_j + total for i < j; the diagonal of Ũ is zero and is left out.
        offset = 0
        for i in range(n - 1):
            seg = out[offset:offset + n - 1 - i]
            np.subtract(K[i, i + 1:], col[i + 1:], out=seg)
            seg -= col[i] - total
            offset += n - 1 - i
        return out, math.sqrt(2.0) * float(np.linalg.norm(out))
    mean = K.mean(axis=0)
    grand = mean.mean()
    # K̃_ij = K_ij - mean_i - mean_j + grand; off-diagonal entries count twice in ‖K̃‖², hence √2.
    offset, root2 = 0, math.sqrt(2.0)
    for i in range(n):
        out[offset] = K[i, i] - 2.0 * mean[i] + grand
        seg = out[offset + 1:offset + n - i]
        np.subtract(K[i, i + 1:], mean[i + 1:], out=seg)
        seg -= mean[i] - grand
        seg *= root2
        offset += n - i
    return out, float(np.linalg.norm(out))


def _unit_vectors(kernels: Iterable[np.ndarray], debiased: bool, indices: np.ndarray | None,
                  side: str) -> Iterator[tuple[np.ndarray, float]]:
    for l, K in enumerate(kernels):
        K = np.asarray(K, dtype=np.float64)
        if indices is not None:
            K = K[np.ix_(indices, indices)]
        v, norm = _triangle_vector(K, debiased)
        if not math.isfinite(norm) or norm == 0.0:
            warnings.warn(f"{side} layer {l} has a zero-norm (or undefined) centered kernel: its activations do "
                          "not vary across probes; its CKA entries are NaN", RuntimeWarning, stacklevel=3)
            v.fill(np.nan)
        else:
            v /= float(np.linalg.norm(v))
        yield v, norm


def _product(A: np.ndarray, B: np.ndarray, block: int = 1 << 16) -> np.ndarray:
    """A @ B.T for short, very wide A and B, blocked along the shared axis.

    BLAS kernels handle (L x n²/2) @ (n²/2 x k) poorly (seconds instead of ~0.2 s at n = 2048);
    cache-sized blocks along the long axis restore full speed, and float64 accumulation keeps it exact.
    """
    C = np.zeros((A.shape[0], B.shape[0]))
    for s in range(0, A.shape[1], block):
        C += A[:, s:s + block] @ B[:, s:s + block].T
    return C


def cka_matrix(source_kernels: Iterable[np.ndarray], target_kernels: Iterable[np.ndarray], *, debiased: bool = True,
               indices: np.ndarray | None = None, chunk: int = 8) -> CKAMatrix:
    """CKA for every (source layer, target layer) pair from per-layer ``n x n`` kernels.

    Each kernel is (U-)centered and normalised once; the matrix is ``V_s @ V_tᵀ``. Source vectors are
    held (``L_s * n² / 2`` floats); target kernels are consumed ``chunk`` at a time, so they can come
    from a generator that builds them lazily.

    Args:
        source_kernels, target_kernels: iterables of ``n x n`` kernels (e.g. from :func:`kernel_matrix`).
        debiased: U-center (unbiased HSIC) instead of plain centering.
        indices: optional probe indices to restrict every kernel to (bootstrap resamples). Use
            distinct indices with ``debiased``: duplicates reintroduce self-similarity terms.
        chunk: target layers per matrix product.

    Returns:
        ``CKAMatrix(matrix, source_norms, target_norms)``.
    """
    src = list(_unit_vectors(source_kernels, debiased, indices, "source"))
    if not src:
        raise ConfigError("no source kernels given")
    # Copy row by row, dropping each list entry, so peak memory stays ~1x the source vectors.
    V_s = np.empty((len(src), src[0][0].shape[0]))
    norms_s = np.array([norm for _, norm in src])
    for i in range(len(src)):
        V_s[i] = src[i][0]
        src[i] = None  # type: ignore[call-overload]
    blocks, norms_t, pending = [], [], []

    def flush() -> None:
        if pending:
            blocks.append(_product(V_s, np.stack(pending)))
            pending.clear()

    for v, norm in _unit_vectors(target_kernels, debiased, indices, "target"):
        if v.shape != V_s.shape[1:]:
            raise ConfigError("source and target kernels cover different numbers of samples")
        pending.append(v)
        norms_t.append(norm)
        if len(pending) >= chunk:
            flush()
    flush()
    if not blocks:
        raise ConfigError("no target kernels given")
    return CKAMatrix(np.concatenate(blocks, axis=1), norms_s, np.array(norms_t))


def cka_matrix_from_features(source_layers: Sequence[Any], target_layers: Sequence[Any],
                             variant: str = "linear-debiased", rbf_sigma: float = 0.5) -> np.ndarray:
    """The ``L_s x L_t`` CKA matrix from per-layer feature arrays (rows = the same n samples).

    Kernels are built lazily, one layer at a time.

    Example:
        >>> M = cka_matrix_from_features(capture_pooled_activations(m1, t1, texts),
        ...                              capture_pooled_activations(m2, t2, texts))
    """
    _, _, debiased = resolve_variant(variant)
    kernels = (lambda layers: (kernel_matrix(X, variant, rbf_sigma) for X in layers))
    return cka_matrix(kernels(source_layers), kernels(target_layers), debiased=debiased).matrix


# --------------------------------------------------------------------------------------------------
# End to end: models + probes -> CKAResult on disk
# --------------------------------------------------------------------------------------------------


class BestTarget(NamedTuple):
    """One source layer's best-matching target layer and the runner-up (``None`` where all are NaN)."""

    source: int
    best: int | None
    cka: float | None
    runner_up: int | None
    runner_up_cka: float | None


@dataclass
class CKAResult:
    """A CKA matrix between every decoder layer of a source (rows) and a target (columns) model.

    Layer indices are 0-based decoder-layer indices (``model.layers.{i}``). ``kernels(side)`` gives the
    per-layer ``n x n`` kernels (stored float32) that :meth:`recompute` uses for bootstrap resamples.
    """

    matrix: np.ndarray
    variant: str
    n: int
    source_norms: np.ndarray
    target_norms: np.ndarray
    source_dim: int
    target_dim: int
    provenance: dict[str, Any] = field(default_factory=dict)
    directory: Path | None = None
    _kernels: dict[str, list[np.ndarray]] | None = field(default=None, repr=False)

    @classmethod
    def from_features(cls, source_layers: Sequence[Any], target_layers: Sequence[Any],
                      variant: str = "linear-debiased", rbf_sigma: float = 0.5, keep_kernels: bool = True,
                      provenance: dict[str, Any] | None = None) -> CKAResult:
        """A result from activations you captured yourself: one ``(n, d)`` array per layer and side.

        Example:
            >>> res = CKAResult.from_features(list(feats_small), list(feats_large))
            >>> res.save("out/cka")
        """
        name, _, debiased = resolve_variant(variant)
        kept: dict[str, list[np.ndarray]] = {"source": [], "target": []}
        dims: dict[str, int] = {}

        def kernels(side: str, layers: Sequence[Any]) -> Iterator[np.ndarray]:
            for X in layers:
                K = kernel_matrix(X, name, rbf_sigma)
                dims[side] = np.shape(X)[1]
                if keep_kernels:
                    kept[side].append(K.astype(np.float32))
                yield K

        m = cka_matrix(kernels("source", source_layers), kernels("target", target_layers), debiased=debiased)
        return cls(matrix=m.matrix, variant=name, n=len(source_layers[0]), source_norms=m.source_norms,
                   target_norms=m.target_norms, source_dim=dims["source"], target_dim=dims["target"],
                   provenance={"rbf_sigma": rbf_sigma if name.startswith("rbf") else None, **(provenance or {})},
                   _kernels=kept if keep_kernels else None)

    @property
    def num_source_layers(self) -> int:
        return self.matrix.shape[0]

    @property
    def num_target_layers(self) -> int:
        return self.matrix.shape[1]

    @property
    def has_kernels(self) -> bool:
        return self._kernels is not None or (self.directory is not None and (self.directory / KERNELS_FILE).exists())

    def kernels(self, side: str) -> Sequence[np.ndarray]:
        """Per-layer kernels of ``side`` (``"source"`` or ``"target"``), lazily read from disk."""
        if side not in ("source", "target"):
            raise ConfigError(f"side must be 'source' or 'target', got {side!r}")
        if self._kernels is not None:
            return self._kernels[side]
        if self.directory is None or not (self.directory / KERNELS_FILE).exists():
            raise ArtifactNotFoundError("this CKA result kept no per-layer kernels (computed with keep_kernels="
                                        "False); rerun `trace-transfer cka` without --no-kernels to bootstrap")
        count = self.num_source_layers if side == "source" else self.num_target_layers
        return _LazyKernels(self.directory / KERNELS_FILE, side, count)

    def recompute(self, indices: np.ndarray) -> np.ndarray:
        """The CKA matrix on the probe subset ``indices`` (kernel bandwidths kept from the full set)."""
        _, _, debiased = resolve_variant(self.variant)
        return cka_matrix(self.kernels("source"), self.kernels("target"), debiased=debiased,
                          indices=np.asarray(indices)).matrix

    def best_targets(self) -> list[BestTarget]:
        """Per source layer, the target layer with the highest CKA and the runner-up (NaN cells skipped).

        The gap between the two is what a layer map can trust: on tiny models it is often < 0.05.

        Example:
            >>> for row in CKAResult.load("runs/cka").best_targets():
            ...     print(row.source, row.best, row.cka, row.runner_up, row.runner_up_cka)
        """
        rows = []
        for i, row in enumerate(self.matrix):
            order = [int(j) for j in np.argsort(row, kind="stable")[::-1] if not np.isnan(row[j])]
            first, second = (order + [None, None])[:2]
            rows.append(BestTarget(i, first, None if first is None else float(row[first]),
                                   second, None if second is None else float(row[second])))
        return rows

    def save(self, out_dir: str | Path, plot: bool = True) -> Path:
        """Write ``cka.safetensors`` (matrix + per-layer info), ``cka.json`` and ``cka.png``."""
        import torch

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self._kernels is not None:
            with _kernel_writer(out / KERNELS_FILE, len(self._kernels["source"]), len(self._kernels["target"]),
                                self.n) as add:
                for side in ("source", "target"):
                    for l, K in enumerate(self._kernels[side]):
                        add(f"{side}.{l}", K)
        elif self.directory is not None and (self.directory / KERNELS_FILE).exists() and \
                self.directory.resolve() != out.resolve():
            with atomic_path(out / KERNELS_FILE) as tmp:
                shutil.copyfile(self.directory / KERNELS_FILE, tmp)
        tensors = {"matrix": torch.from_numpy(self.matrix), "source_norms": torch.from_numpy(self.source_norms),
                   "target_norms": torch.from_numpy(self.target_norms)}
        save_safetensors_atomic(tensors, out / MATRIX_FILE, metadata=self._header())
        if plot:
            plot_cka_heatmap(self.matrix, out / PLOT_FILE, title=f"CKA ({self.variant}, n={self.n})",
                             source_label=str(self.provenance.get("source", {}).get("model", "source")),
                             target_label=str(self.provenance.get("target", {}).get("model", "target")))
        # cka.json last: its presence marks a complete result.
        write_json_atomic(out / JSON_FILE, {**self._header(), "matrix": _json_matrix(self.matrix),
                                            "best_target_per_source": _nan_argmax(self.matrix, 1),
                                            "best_source_per_target": _nan_argmax(self.matrix, 0)})
        self.directory = out
        return out

    def _header(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "variant": self.variant, "n": self.n,
                "num_source_layers": self.num_source_layers, "num_target_layers": self.num_target_layers,
                "source_dim": self.source_dim, "target_dim": self.target_dim, **self.provenance}

    @classmethod
    def load(cls, path: str | Path) -> CKAResult:
        """Load from a directory written by :meth:`save` (or its ``cka.safetensors``)."""
        path = Path(path)
        directory = path.parent if path.suffix == ".safetensors" else path
        file = directory / MATRIX_FILE
        if not file.exists():
            raise ArtifactNotFoundError(f"no {MATRIX_FILE} in {directory}; create it with "
                                        f"`trace-transfer cka --source S --target T --probes general --out {directory}`")
        with open_safetensors(file, framework="np") as fh:
            try:
                meta = json.loads((fh.metadata() or {}).get(METADATA_KEY, "{}"))
            except json.JSONDecodeError as exc:
                raise ArtifactError(f"{file}: its header is not valid JSON ({exc}); recompute it with `trace-transfer cka`") from exc
            if meta.get("format") != FORMAT:
                raise ArtifactError(f"{file} is not a trace-transfer CKA file (format={meta.get('format')!r})")
            if meta.get("format_version", 0) > FORMAT_VERSION:
                raise ArtifactError(f"{file} has format version {meta['format_version']}, newer than this "
                                    f"trace-transfer understands ({FORMAT_VERSION}); upgrade trace-transfer")
            arrays = {k: fh.get_tensor(k) for k in ("matrix", "source_norms", "target_norms")}
        known = {"format", "format_version", "variant", "n", "num_source_layers", "num_target_layers",
                 "source_dim", "target_dim"}
        return cls(matrix=arrays["matrix"], variant=meta["variant"], n=meta["n"], source_norms=arrays["source_norms"],
                   target_norms=arrays["target_norms"], source_dim=meta["source_dim"], target_dim=meta["target_dim"],
                   provenance={k: v for k, v in meta.items() if k not in known}, directory=directory)


MATRIX_FILE, JSON_FILE, PLOT_FILE, KERNELS_FILE = "cka.safetensors", "cka.json", "cka.png", "kernels.safetensors"


class _LazyKernels(Sequence):
    """Kernels of one side read one at a time from ``kernels.safetensors``."""

    def __init__(self, file: Path, side: str, count: int):
        self.file, self.side, self.count = file, side, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, l: int) -> np.ndarray:  # type: ignore[override]
        if not 0 <= l < self.count:
            raise IndexError(l)
        with open_safetensors(self.file, framework="np") as fh:
            return fh.get_tensor(f"{self.side}.{l}")


@contextlib.contextmanager
def _kernel_writer(path: Path, num_source: int, num_target: int, n: int) -> Iterator[Any]:
    """Write n x n float32 kernels into one safetensors file as they are produced.

    safetensors.save_file needs every tensor in memory at once; the format is a length-prefixed JSON
    header plus raw little-endian data, so with all shapes known up front we write it incrementally.
    """
    names = [f"source.{l}" for l in range(num_source)] + [f"target.{l}" for l in range(num_target)]
    nbytes = n * n * 4
    header: dict[str, Any] = {"__metadata__": {METADATA_KEY: json.dumps({"format": "trace-transfer/cka-kernels"})}}
    for i, name in enumerate(names):
        header[name] = {"dtype": "F32", "shape": [n, n], "data_offsets": [i * nbytes, (i + 1) * nbytes]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format allows space padding; keeps the data 8-byte aligned
    written: list[str] = []
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)

            def add(name: str, K: np.ndarray) -> None:
                if len(written) >= len(names) or name != names[len(written)]:
                    raise RuntimeError(f"kernel {name!r} written out of order")
                fh.write(np.ascontiguousarray(K, dtype="<f4").tobytes())
                written.append(name)

            yield add
        if len(written) != len(names):
            raise RuntimeError(f"only {len(written)} of {len(names)} kernels were written")


def _nan_argmax(M: np.ndarray, axis: int) -> list[int | None]:
    filled = np.where(np.isnan(M), -np.inf, M)
    best = filled.argmax(axis=axis)
    valid = np.isfinite(filled).any(axis=axis)
    return [int(b) if ok else None for b, ok in zip(best, valid)]


def _json_matrix(M: np.ndarray) -> list[list[float | None]]:
    return [[None if math.isnan(x) else round(float(x), 6) for x in row] for row in M]


def _model_info(model: Any, ref: Any, num_layers: int, dim: int) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    return {"model": str(ref) if ref is not None else getattr(model, "name_or_path", None) or type(model).__name__,
            "model_type": getattr(cfg, "model_type", None), "num_layers": num_layers, "hidden_size": dim,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}


def _load(ref: Any, tokenizer: Any, dtype: str | None, device: str | None) -> tuple[Any, Any, Any]:
    """(model, tokenizer, provenance ref) from a model object or a local dir / hub id."""
    if not isinstance(ref, (str, Path)):
        if tokenizer is None:
            raise ConfigError("a model object was passed without its tokenizer; pass source_tokenizer=/"
                              "target_tokenizer= too")
        return ref, tokenizer, None
    from trace_transfer.devices import DTYPES, resolve_device, resolve_dtype
    from trace_transfer.models import inference_device_map, load_model, load_tokenizer

    where = resolve_device(device or "cpu")
    if dtype in DTYPES:  # the CLI's spelling (auto/bf16/fp16/fp32); torch names pass through
        dtype = resolve_dtype(dtype, where)
    model = load_model(ref, dtype=dtype, device=where,
                       device_map=inference_device_map(ref, device or "cpu", dtype))  # spread if > 1 GPU
    tok = tokenizer if tokenizer is not None else load_tokenizer(ref)
    return model, tok, str(ref)


def compute_cka(
    source_model: Any,
    target_model: Any,
    probes: str | Path | Sequence[str],
    out_dir: str | Path | None = None,
    *,
    variant: str = "linear-debiased",
    pooling: str = "mean",
    batch_size: int = 8,
    max_probes: int | None = None,
    exclude_special: bool = True,
    padding_side: str = "right",
    max_length: int = 512,
    rbf_sigma: float = 0.5,
    keep_kernels: bool = True,
    source_tokenizer: Any = None,
    target_tokenizer: Any = None,
    dtype: str | None = "auto",
    device: str | None = "auto",
    progress: bool = True,
) -> CKAResult:
    """CKA between every decoder layer of ``source_model`` and ``target_model`` on probe texts.

    Models are loaded (when given as paths/ids) and run one at a time; pooled activations go to a
    disk-backed per-layer store under ``out_dir`` (or the temp dir) that is removed at the end.
    Resources: disk ``8 * n * d * L`` bytes per model while running; memory about ``4 * L_s * n²``
    bytes for the source layers' centered kernels (n = 2048, L_s = 32: 0.5 GiB) plus one n x n kernel
    at a time; ``kernels.safetensors`` takes ``4 * n² * (L_s + L_t)`` bytes.

    Args:
        source_model, target_model: model directories / hub ids, or model objects (then pass their
            tokenizers). Tokenizers may differ: samples are aligned per probe text.
        probes: anything :func:`load_probe_texts` accepts.
        out_dir: if given, writes ``cka.safetensors``, ``cka.json``, ``cka.png`` and (with
            ``keep_kernels``) ``kernels.safetensors`` (n x n float32 per layer, for bootstrap).
        variant: ``linear-debiased`` (default), ``linear``, ``rbf`` or ``rbf-debiased``.
        pooling, exclude_special, padding_side, max_length, batch_size: see
            :func:`iter_pooled_activations`.
        rbf_sigma: RBF bandwidth as a multiple of the median distance.
        dtype, device: for models loaded here: ``auto``/``bf16``/``fp16``/``fp32`` (or a torch name such as
            ``"float32"``; None keeps the checkpoint's) and ``auto``/``cpu``/``cuda[:i]`` (None: cpu), via
            :mod:`trace_transfer.devices`. Kernels accumulate in float64 whatever the dtype.

    Returns:
        The :class:`CKAResult` (rows = source layers, columns = target layers).

    Raises:
        ConfigError: bad option or too few probes. ArtifactNotFoundError: a model or probe file is missing.

    Example:
        >>> res = compute_cka("tiny-llama", "tiny-qwen3", "general", "out/cka")
        >>> res.matrix.shape
        (2, 4)
    """
    name, _, debiased = resolve_variant(variant)
    texts = load_probe_texts(probes, max_probes=max_probes)
    n = len(texts)
    if n < (4 if debiased else 2):
        raise ConfigError(f"{name} CKA needs at least {4 if debiased else 2} probe texts, got {n}")
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    capture_opts = dict(batch_size=batch_size, pooling=pooling, exclude_special=exclude_special,
                        padding_side=padding_side, max_length=max_length, progress=progress)
    infos, kernels_mem = {}, {"source": [], "target": []}
    with tempfile.TemporaryDirectory(prefix=".cka-features-", dir=out_dir) as spill:
        stores = {}
        for side, ref, tok in (("source", source_model, source_tokenizer), ("target", target_model, target_tokenizer)):
            model, tok, label = _load(ref, tok, dtype, device)
            store = _FeatureStore(Path(spill) / side, n)
            store.directory.mkdir()
            for idx, pooled in iter_pooled_activations(model, tok, texts, description=f"{side} activations",
                                                       **capture_opts):
                store.write(idx, pooled)
            infos[side] = _model_info(model, label, len(store), store[0].shape[1])
            stores[side] = store
            del model  # release before loading the next model

        def kernels(side: str, sink: Any) -> Iterator[np.ndarray]:
            for l in range(len(stores[side])):
                K = kernel_matrix(stores[side][l], name, rbf_sigma)
                sink(f"{side}.{l}", K)
                yield K

        def to_memory(key: str, K: np.ndarray) -> None:
            if keep_kernels:
                kernels_mem[key.split(".")[0]].append(K.astype(np.float32))

        with contextlib.ExitStack() as stack:
            sink = to_memory
            if out_dir is not None and keep_kernels:
                sink = stack.enter_context(_kernel_writer(Path(out_dir) / KERNELS_FILE, len(stores["source"]),
                                                          len(stores["target"]), n))
            result = cka_matrix(kernels("source", sink), kernels("target", sink), debiased=debiased)
    probe_ref = "<list>" if isinstance(probes, (list, tuple)) else str(probes)
    provenance = {
        "source": infos["source"], "target": infos["target"],
        "probes": {"ref": probe_ref, "n": n, "sha256": hashlib.sha256("\n".join(texts).encode()).hexdigest()},
        "pooling": pooling, "exclude_special": exclude_special, "padding_side": padding_side,
        "max_length": max_length, "rbf_sigma": rbf_sigma if name.startswith("rbf") else None,
        "kernels_kept": keep_kernels,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": versions(),
    }
    res = CKAResult(matrix=result.matrix, variant=name, n=n, source_norms=result.source_norms,
                    target_norms=result.target_norms, source_dim=infos["source"]["hidden_size"],
                    target_dim=infos["target"]["hidden_size"], provenance=provenance,
                    _kernels=kernels_mem if keep_kernels and out_dir is None else None)
    if out_dir is not None:
        res.save(out_dir)
    return res


def plot_cka_heatmap(matrix: np.ndarray, path: str | Path, *, title: str = "CKA", source_label: str = "source",
                     target_label: str = "target") -> Path:
    """Heatmap PNG (rows = source layers, columns = target layers), row maxima marked. Written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    Ls, Lt = matrix.shape
    fig = Figure(figsize=(min(14.0, 3.0 + 0.22 * Lt), min(11.0, 2.5 + 0.22 * Ls)))
    FigureCanvasAgg(fig)  # no pyplot: no global backend state, safe in headless runs and threads
    ax = fig.add_subplot()
    im = ax.imshow(matrix, origin="lower", aspect="auto", cmap="viridis", interpolation="nearest")
    best = _nan_argmax(matrix, 1)
    rows = [i for i, b in enumerate(best) if b is not None]
    ax.scatter([best[i] for i in rows], rows, s=10, c="red", marker="o")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"{target_label} layer")
    ax.set_ylabel(f"{source_label} layer")
    ax.set_title(f"{title}\nred dots: best target layer per source layer", fontsize="medium")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return Path(path)
