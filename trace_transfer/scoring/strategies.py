"""The built-in scoring strategies: ``lf`` (TRACE-LF), ``cs`` (TRACE-CS), ``random`` (the control) and
``magnitude`` (CPI-FT's core regions: the largest fine-tuning updates).

Each is registered with :func:`trace_transfer.scoring.base.register_strategy`; ``scorer`` documents how units, budgets and
ties work. ``scorer`` imports this module, so the built-ins are always registered.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable
from typing import Any

import torch

from trace_transfer.scoring.granularity import Product, reduce_units, square
from trace_transfer.scoring.topk import SAMPLE_BLOCK, SAMPLE_STRIDE
from trace_transfer.errors import ArtifactError, ConfigError
from trace_transfer.scoring.base import ProbeInput, ScoringRun, register_strategy


def _minmax(values: list[torch.Tensor]) -> tuple[float, float]:
    cat = torch.cat([v.reshape(-1) for v in values]) if values else torch.zeros(1, dtype=torch.float64)
    if not bool(torch.isfinite(cat).all()):
        raise ArtifactError("Δ or Fisher holds NaN/inf values; re-run the probe (try --fisher batch and fp32)")
    return float(cat.min()), float(cat.max())


def _normalise(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    # A constant term carries no ranking information: it contributes 0 rather than a 0/0.
    return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)


@register_strategy("lf")
class LF:
    """TRACE-LF: α·minmax(RMS Δ per unit) + β·minmax(mean Fisher per unit)."""

    min_tasks = 1

    def check(self, run: ScoringRun) -> None:
        for p in run.probes:
            if p.fisher is None and not (run.granularity == "tensor" and self._stats_cover(p, run, "fisher_mean")):
                raise ConfigError(
                    f"{p.dir}: no per-element fisher.safetensors, which granularity {run.granularity!r} needs; "
                    f"re-run `trace-transfer probe` with --fisher-elements, or use --granularity tensor"
                )

    @staticmethod
    def _stats_cover(p: ProbeInput, run: ScoringRun, key: str) -> bool:
        return all(key in p.stats.get(n, {}) for n in run.names)

    def unit_scores(self, run: ScoringRun) -> list[dict[str, torch.Tensor]]:
        out = []
        for p in run.probes:
            l2, fis = {}, {}
            whole = run.granularity == "tensor" and run.use_tensor_stats
            d_stats = whole and self._stats_cover(p, run, "delta_rms")
            f_stats = (whole or p.fisher is None) and self._stats_cover(p, run, "fisher_mean")
            for i, name in enumerate(run.names):
                size = run.unit_size(name)
                if not d_stats:
                    (sq,) = reduce_units([p.delta], name, run.layouts[name], lambda c: [square(c[0])], run.chunk_elems)
                    l2[name] = torch.sqrt(sq / size)
                else:
                    l2[name] = torch.tensor([p.stats[name]["delta_rms"]], dtype=torch.float64)
                if not f_stats:
                    (fs,) = reduce_units([p.fisher], name, run.layouts[name], lambda c: [c[0]], run.chunk_elems)
                    fis[name] = fs / size
                else:
                    fis[name] = torch.tensor([p.stats[name]["fisher_mean"]], dtype=torch.float64)
                run.tick(f"scoring {p.task}", i + 1, len(run.names))
            (l2_lo, l2_hi), (f_lo, f_hi) = _minmax(list(l2.values())), _minmax(list(fis.values()))
            run.notes.append({"l2_range": [l2_lo, l2_hi], "fisher_range": [f_lo, f_hi],
                              "l2_term": "RMS of delta over the unit", "fisher_term": "mean Fisher over the unit"})
            out.append({
                n: run.alpha * _normalise(l2[n], l2_lo, l2_hi) + run.beta * _normalise(fis[n], f_lo, f_hi)
                for n in run.names
            })
        return out

    def element_scores(self, run: ScoringRun, t: int) -> Callable[[str, int, int], torch.Tensor]:
        p = run.probes[t]
        keys = ("delta_absmin", "delta_absmax", "fisher_min", "fisher_max")
        if all(self._stats_cover(p, run, k) for k in keys):
            d_lo = min(p.stats[n]["delta_absmin"] for n in run.names)
            d_hi = max(p.stats[n]["delta_absmax"] for n in run.names)
            f_lo = min(p.stats[n]["fisher_min"] for n in run.names)
            f_hi = max(p.stats[n]["fisher_max"] for n in run.names)
            source = "probe stats"
        else:
            d_lo, d_hi, f_lo, f_hi = self._ranges_pass(run, p)
            source = "range pass"
        run.notes.append({"l2_range": [d_lo, d_hi], "fisher_range": [f_lo, f_hi], "ranges_from": source,
                          "l2_term": "|delta| (RMS over one element)", "fisher_term": "Fisher of the element"})
        a = run.alpha / (d_hi - d_lo) if d_hi > d_lo else 0.0
        b = run.beta / (f_hi - f_lo) if f_hi > f_lo else 0.0
        buf = torch.empty(run.chunk_elems, dtype=torch.float32)  # reused: fresh 4 MB temporaries page-fault

        # a·|Δ| + b·F ranks exactly like the min-max-normalised α·norm(|Δ|) + β·norm(F) (the minima
        # shift every score by one constant), and so does F + (a/b)·|Δ|: two ops per chunk, none
        # writing into the mapped windows (that would copy their pages).
        def combine(d: torch.Tensor, f: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
            if b == 0:
                return torch.abs(d, out=out)
            if a == 0:
                return f.clone() if out is None else out.copy_(f)
            s = torch.abs(d, out=out)
            return torch.add(f, s, alpha=a / b, out=s)

        def fn(name: str, start: int, stop: int) -> torch.Tensor:
            return combine(p.delta.window(name, start, stop), p.fisher.window(name, start, stop), buf[: stop - start])

        def sample(name: str, start: int, stop: int) -> torch.Tensor:
            # Only the sampled blocks are read: the sample pass costs ~1/32 of a full pass.
            if stop - start < SAMPLE_BLOCK:
                return combine(p.delta.window(name, start, stop), p.fisher.window(name, start, stop), None)
            d = p.delta.strided_blocks(name, start, stop, SAMPLE_BLOCK, SAMPLE_STRIDE)
            f = p.fisher.strided_blocks(name, start, stop, SAMPLE_BLOCK, SAMPLE_STRIDE)
            return combine(d, f, None)

        fn.sample = sample
        return fn

    @staticmethod
    def _ranges_pass(run: ScoringRun, p: ProbeInput) -> tuple[float, float, float, float]:
        d_lo, d_hi, f_lo, f_hi = math.inf, -math.inf, math.inf, -math.inf
        total = sum(p.delta.numel(n) for n in run.names)
        done = 0
        buf = torch.empty(run.chunk_elems, dtype=torch.float32)
        for name in run.names:
            for (_, stop, d), (_, _, f) in zip(p.delta.chunks(name, run.chunk_elems), p.fisher.chunks(name, run.chunk_elems)):
                lo, hi = torch.aminmax(torch.abs(d, out=buf[: d.numel()]))
                d_lo, d_hi = min(d_lo, float(lo)), max(d_hi, float(hi))
                lo, hi = torch.aminmax(f)
                f_lo, f_hi = min(f_lo, float(lo)), max(f_hi, float(hi))
                done += d.numel()
                run.tick(f"ranges {p.task}", done, total)
        if not all(math.isfinite(v) for v in (d_lo, d_hi, f_lo, f_hi)):
            raise ArtifactError(f"{p.dir}: Δ or Fisher holds NaN/inf values; re-run the probe")
        return d_lo, d_hi, f_lo, f_hi


@register_strategy("cs")
class CS:
    """TRACE-CS: 1 − mean cosine similarity of the task's Δ with every other task's Δ, per unit."""

    min_tasks = 3

    def check(self, run: ScoringRun) -> None:
        if run.granularity == "element":
            raise ConfigError(
                "strategy 'cs' at element granularity is degenerate: the cosine of two scalars is just their "
                "sign agreement (±1), so nearly every element ties; use --granularity row, column, head or tensor"
            )

    def unit_scores(self, run: ScoringRun) -> list[dict[str, torch.Tensor]]:
        k = len(run.probes)
        pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]

        def products(c: list[torch.Tensor]) -> list[Product]:
            return [square(x) for x in c] + [Product(c[i], c[j]) for i, j in pairs]

        out: list[dict[str, torch.Tensor]] = [{} for _ in range(k)]
        for step, name in enumerate(run.names):
            sums = reduce_units([p.delta for p in run.probes], name, run.layouts[name], products, run.chunk_elems)
            norms = [torch.sqrt(s) for s in sums[:k]]
            cos = {}
            for (i, j), dot in zip(pairs, sums[k:]):
                denom = norms[i] * norms[j]
                c = torch.where(denom > 0, dot / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(dot))
                cos[(i, j)] = cos[(j, i)] = c.clamp(-1.0, 1.0)
            for i in range(k):
                mean_cos = sum(cos[(i, j)] for j in range(k) if j != i) / (k - 1)
                out[i][name] = torch.where(norms[i] > 0, 1.0 - mean_cos, torch.zeros_like(mean_cos))
            run.tick("scoring (cs)", step + 1, len(run.names))
        for _ in range(k):
            run.notes.append({"specificity": "1 - mean cosine with the other tasks' delta over the unit"})
        return out


@register_strategy("random")
class Random:
    """Seeded uniform scores: the equal-budget, equal-granularity control."""

    min_tasks = 1

    def check(self, run: ScoringRun) -> None:
        pass

    @staticmethod
    def _seed(run: ScoringRun, task: str, *parts: Any) -> int:
        return zlib.crc32(json.dumps([run.seed, task, *parts]).encode())

    def unit_scores(self, run: ScoringRun) -> list[dict[str, torch.Tensor]]:
        out = []
        for p in run.probes:
            g = torch.Generator().manual_seed(self._seed(run, p.task))
            out.append({n: torch.rand(run.layouts[n].num_units(run.shapes[n]), generator=g, dtype=torch.float64)
                        for n in run.names})
            run.notes.append({"random_seed": run.seed})
        return out

    def element_scores(self, run: ScoringRun, t: int) -> Callable[[str, int, int], torch.Tensor]:
        task = run.probes[t].task
        run.notes.append({"random_seed": run.seed})

        def fn(name: str, start: int, stop: int) -> torch.Tensor:
            g = torch.Generator().manual_seed(self._seed(run, task, name, start))
            return torch.rand(stop - start, generator=g)

        return fn


@register_strategy("magnitude")
class Magnitude:
    """CPI-FT core regions: score = |Δ| per element (RMS of Δ over a unit at coarser granularities)."""

    min_tasks = 1

    def check(self, run: ScoringRun) -> None:
        pass

    def unit_scores(self, run: ScoringRun) -> list[dict[str, torch.Tensor]]:
        out = []
        for p in run.probes:
            scores = {}
            for i, name in enumerate(run.names):
                (sq,) = reduce_units([p.delta], name, run.layouts[name], lambda c: [square(c[0])], run.chunk_elems)
                scores[name] = torch.sqrt(sq / run.unit_size(name))
                run.tick(f"scoring {p.task}", i + 1, len(run.names))
            run.notes.append({"score": "RMS of the fine-tuning update over the unit (CPI-FT)"})
            out.append(scores)
        return out

    def element_scores(self, run: ScoringRun, t: int) -> Callable[[str, int, int], torch.Tensor]:
        p = run.probes[t]
        run.notes.append({"score": "|fine-tuning update| per element (CPI-FT)"})

        def fn(name: str, start: int, stop: int) -> torch.Tensor:
            return torch.abs(p.delta.window(name, start, stop))  # a new tensor: the mapped window stays read-only

        return fn
