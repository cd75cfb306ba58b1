"""Independent references shared by the measure tests (no lsm_train code)."""

import numpy as np


def brute_degree_2d(A, B):
    """Exact degree in 2-D: the count is constant between consecutive critical angles
    (normals of the difference vectors), so evaluating every gap's midpoint by brute force
    finds the maximum."""
    Z = (np.asarray(A, float)[:, None, :] - np.asarray(B, float)[None, :, :]).reshape(-1, 2)
    nz = Z[np.abs(Z).sum(1) > 0]
    if len(nz) == 0:
        return 0.5
    th = np.arctan2(nz[:, 1], nz[:, 0])
    crit = np.sort(np.mod(np.r_[th + np.pi / 2, th - np.pi / 2], 2 * np.pi))
    nxt = np.r_[crit[1:], crit[0] + 2 * np.pi]
    # mathematically equal critical angles (parallel differences) can differ by rounding:
    # the sliver between them is not a real gap (both signs would read "positive" there)
    gap = nxt - crit > 1e-9
    mids = (crit[gap] + nxt[gap]) / 2
    P = Z @ np.stack([np.cos(mids), np.sin(mids)])
    return float((((P > 0).sum(0) + 0.5 * (P == 0).sum(0)) / len(Z)).max())
