"""CKAResult.best_targets: per source layer, the best target layer and the runner-up; NaN cells skipped."""

import numpy as np

from trace_transfer.cka import BestTarget, CKAResult


def _result(matrix):
    m = np.array(matrix, dtype=float)
    return CKAResult(matrix=m, variant="linear-debiased", n=8, source_norms=np.ones(m.shape[0]),
                     target_norms=np.ones(m.shape[1]), source_dim=4, target_dim=4)


def test_best_and_runner_up_per_source_layer():
    rows = _result([[0.1, 0.9, 0.5], [0.7, np.nan, 0.2], [np.nan, np.nan, 0.3], [np.nan] * 3]).best_targets()
    assert rows[0] == BestTarget(0, 1, 0.9, 2, 0.5)
    assert rows[1] == BestTarget(1, 0, 0.7, 2, 0.2)  # the NaN cell is neither best nor runner-up
    assert rows[2] == BestTarget(2, 2, 0.3, None, None)
    assert rows[3] == BestTarget(3, None, None, None, None)
    assert all(isinstance(r.best, int) or r.best is None for r in rows)
