"""A parameter budget over whole tensors is filled: a tensor that does not fit is skipped for smaller
ones, instead of ending the selection (random tensor cores used to hold 0-256 parameters)."""

from __future__ import annotations

import math

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from trace_transfer.scoring import ScoringRun, budget_count, fill_in_order, select_units
from trace_transfer.scoring.granularity import in_scope, parse_scope, unit_layouts


def test_fill_in_order_skips_what_does_not_fit():
    assert fill_in_order(np.array([5, 8, 3, 2]), 10).tolist() == [True, False, True, True]
    assert fill_in_order(np.array([20, 30]), 10).tolist() == [False, False]
    assert fill_in_order(np.array([], dtype=np.int64), 10).tolist() == []


def test_random_tensor_cores_fill_the_params_budget():
    # The demo target's shapes (Qwen3, 4 layers, d = 128): tensors of 128 to 44k parameters.
    cfg = AutoConfig.for_model("qwen3", hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=32, intermediate_size=344, vocab_size=384)
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in AutoModelForCausalLM.from_config(cfg).named_parameters()}
    names = in_scope(list(shapes), parse_scope(None))
    layouts = unit_layouts(names, shapes, "tensor")
    sizes = [math.prod(shapes[n]) for n in names]
    for ratio in (0.05, 0.1, 0.2):
        best = _best_fill(sizes, budget_count(ratio, sum(sizes)))
        for seed in range(10):
            g = torch.Generator().manual_seed(seed)
            scores = {n: torch.rand(1, generator=g, dtype=torch.float64) for n in names}
            run = ScoringRun([], shapes, names, layouts, "tensor", "params", ratio, 0.5, 0.5, seed)
            masks, counts = select_units(scores, run)
            budget = budget_count(ratio, counts["scope_params"])
            held = sum(math.prod(shapes[n]) for n in names if bool(masks[n].any()))
            assert held == counts["selected_params"] <= budget
            # >= 95 % of what whole tensors can fill at all (at 5 % of this model that is 34,048 of 36,313).
            assert held >= 0.95 * best, (ratio, seed, held, best, budget)
            assert held >= 0.9 * budget, (ratio, seed, held, budget)


def _best_fill(sizes: list[int], budget: int) -> int:
    """The largest sum of a subset of ``sizes`` not above ``budget`` (subset-sum DP over gcd steps)."""
    g = math.gcd(*sizes)
    reach = np.zeros(budget // g + 1, dtype=bool)
    reach[0] = True
    for k in (s // g for s in sizes):
        if k < len(reach):
            reach[k:] |= reach[: len(reach) - k].copy()
    return int(np.flatnonzero(reach)[-1]) * g
