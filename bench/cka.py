"""Benchmark: all-pairs CKA matrix vs per-pair HSIC, measured in the same run.

Setting (issue 4): a 32-layer source (width 1024) and a 48-layer target (width 1536), n = 2048 probe
samples, random features with a planted depth correspondence.

- fast: ``trace_transfer.cka.kernels.cka_matrix_from_features``: each layer's kernel built and (U-)centered
  once, flattened, normalised; the 32 x 48 matrix is one matrix product.
- baseline "per-pair HSIC": for every (source, target) pair recompute both Grams, center them (O(n²)
  with row/column means) and take the three HSIC values. Same numpy/BLAS, float64.
- baseline "torch-cka": the torch-cka package's per-pair method (Grams with zeroed diagonals,
  unbiased HSIC with ``trace(K @ L)``, an n³ product), in torch float64. Only for the debiased variant,
  which is what torch-cka computes.

Baselines are timed on a random subset of pairs and extrapolated to all L_s x L_t pairs (printed as
such); ``--baseline-pairs all`` times every pair (slow: tens of minutes on 2 cores).

Run:  python bench/cka.py            (about 1-2 minutes on 2 CPU cores, ~2 GB RAM)
      python bench/cka.py --n 512 --baseline-pairs 8   (quick)
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np


def planted_features(n: int, depths: np.ndarray, width: int, latents: np.ndarray, rng: np.random.Generator,
                     bandwidth: float = 0.06, noise: float = 0.5) -> list[np.ndarray]:
    """Layer features (float32) whose content drifts with relative depth; see tests/test_layermap.py."""
    bumps, _, rank = latents.shape
    centres = np.linspace(0, 1, bumps)
    out = []
    for u in depths:
        w = np.exp(-((u - centres) ** 2) / (2 * bandwidth**2))
        Z = (w[:, None, None] * latents).transpose(1, 0, 2).reshape(n, bumps * rank)
        Q, _ = np.linalg.qr(rng.standard_normal((width, bumps * rank)))
        scale = math.sqrt(float((Z**2).sum()) / (n * width))
        X = (Z @ Q.T).astype(np.float32)
        X += np.float32(noise * scale) * rng.standard_normal((n, width), dtype=np.float32)
        out.append(X)
    return out


def pair_hsic_numpy(X: np.ndarray, Y: np.ndarray, debiased: bool) -> float:
    """Plain per-pair CKA: both Grams recomputed and centered for this pair alone."""
    from trace_transfer.cka import center_gram, ucenter_gram

    Xc = X.astype(np.float64)
    Yc = Y.astype(np.float64)
    Xc -= Xc.mean(0)
    Yc -= Yc.mean(0)
    center = ucenter_gram if debiased else center_gram
    K, L = center(Xc @ Xc.T), center(Yc @ Yc.T)
    return float((K * L).sum() / math.sqrt((K * K).sum() * (L * L).sum()))


def pair_torch_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """torch-cka's per-pair computation (unbiased HSIC, Song et al.), float64."""
    import torch

    def hsic(K: torch.Tensor, L: torch.Tensor) -> float:
        N = K.shape[0]
        ones = torch.ones(N, 1, dtype=K.dtype)
        result = torch.trace(K @ L)
        result += ((ones.t() @ K @ ones @ ones.t() @ L @ ones) / ((N - 1) * (N - 2))).item()
        result -= ((ones.t() @ K @ L @ ones) * 2 / (N - 2)).item()
        return (1 / (N * (N - 3)) * result).item()

    x, y = torch.from_numpy(X).double(), torch.from_numpy(Y).double()
    K, L = x @ x.T, y @ y.T
    K.fill_diagonal_(0)
    L.fill_diagonal_(0)
    return hsic(K, L) / math.sqrt(hsic(K, K) * hsic(L, L))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source-layers", type=int, default=32)
    p.add_argument("--target-layers", type=int, default=48)
    p.add_argument("--source-width", type=int, default=1024)
    p.add_argument("--target-width", type=int, default=1536)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--variant", default="linear-debiased", choices=["linear-debiased", "linear"])
    p.add_argument("--baseline-pairs", default="16", help="pairs timed for the per-pair baseline, or 'all'")
    p.add_argument("--torch-cka-pairs", type=int, default=3, help="pairs timed for the torch-cka method (0 = skip)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import torch

    from trace_transfer.cka import cka_matrix_from_features, resolve_variant
    from trace_transfer.cka import map_layers

    _, _, debiased = resolve_variant(args.variant)
    Ls, Lt, n = args.source_layers, args.target_layers, args.n
    print(f"CKA benchmark: {Ls} x {Lt} layers, widths {args.source_width}/{args.target_width}, n = {n}, "
          f"variant {args.variant}, float64")
    print(f"cpu cores visible: {os.cpu_count()}, affinity: {len(os.sched_getaffinity(0))}, "
          f"torch threads: {torch.get_num_threads()}, numpy {np.__version__}")

    t = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    latents = rng.standard_normal((16, n, 2))
    src = planted_features(n, np.linspace(0, 1, Ls), args.source_width, latents, rng)
    tgt = planted_features(n, np.linspace(0, 1, Lt), args.target_width, latents, rng)
    print(f"generated features in {time.perf_counter() - t:.1f} s "
          f"({sum(x.nbytes for x in src + tgt) / 2**30:.2f} GiB float32)")

    t = time.perf_counter()
    M = cka_matrix_from_features(src, tgt, args.variant)
    t_fast = time.perf_counter() - t
    print(f"\nall-pairs matrix ({Ls * Lt} pairs): {t_fast:.2f} s")

    all_pairs = [(i, j) for i in range(Ls) for j in range(Lt)]
    if args.baseline_pairs == "all":
        subset = all_pairs
    else:
        k = min(int(args.baseline_pairs), len(all_pairs))
        subset = [all_pairs[i] for i in np.random.default_rng(1).choice(len(all_pairs), size=k, replace=False)]
    t = time.perf_counter()
    ref = [pair_hsic_numpy(src[i], tgt[j], debiased) for i, j in subset]
    t_pair = (time.perf_counter() - t) / len(subset)
    diff = max(abs(r - M[i, j]) for r, (i, j) in zip(ref, subset))
    t_pair_all = t_pair * len(all_pairs)
    extrapolated = len(subset) < len(all_pairs)
    print(f"per-pair HSIC baseline: {t_pair:.3f} s/pair, timed on {len(subset)} of {len(all_pairs)} pairs"
          + (f", extrapolated to all pairs: {t_pair_all:.0f} s" if extrapolated else f", total {t_pair_all:.0f} s"))
    print(f"  max |fast - baseline| over those pairs: {diff:.2e}  ({'OK' if diff <= 1e-5 else 'FAIL'}: tol 1e-5)")
    print(f"  speed-up: {t_pair_all / t_fast:.1f}x  (target >= 20x)")

    ok = diff <= 1e-5
    if debiased and args.torch_cka_pairs > 0:
        subset_t = subset[: args.torch_cka_pairs]
        t = time.perf_counter()
        ref_t = [pair_torch_cka(src[i], tgt[j]) for i, j in subset_t]
        t_tc = (time.perf_counter() - t) / len(subset_t)
        diff_t = max(abs(r - M[i, j]) for r, (i, j) in zip(ref_t, subset_t))
        print(f"torch-cka method (trace(K @ L), n^3 per pair): {t_tc:.3f} s/pair, timed on {len(subset_t)} pairs, "
              f"extrapolated to all pairs: {t_tc * len(all_pairs):.0f} s")
        print(f"  max |fast - torch-cka| over those pairs: {diff_t:.2e}  ({'OK' if diff_t <= 1e-5 else 'FAIL'})")
        print(f"  speed-up: {t_tc * len(all_pairs) / t_fast:.1f}x")
        ok &= diff_t <= 1e-5

    lm = map_layers(M, method="monotone")
    expected = np.floor(np.arange(Ls) * (Lt - 1) / max(Ls - 1, 1) + 0.5)
    off = int(np.abs(np.array([lm.forward[i] for i in range(Ls)]) - expected).max())
    print(f"\nplanted correspondence, monotone map: max deviation {off} layer(s) from i*(Lt-1)/(Ls-1)")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
