"""Soft counts of the recorded (reference) path: Σ f(a_i − b_j) over the pairs of each task,
in blocks of bounded memory for large batches (docs/loss.md).

f(x) = σ(clip(x, −c, c)) − σ(−c) with the saturation cut c = :func:`cut`: within eps² of σ,
exactly flat beyond ±c, which keeps subnormal numbers (10-40x slower on CPU) out of the
backward.
"""

from __future__ import annotations

import math

import torch

from lsm_train.measures.soft.layout import LabelLayout
from lsm_train.measures.soft.options import BLOCK_ELEMS


def cut(dtype: torch.dtype) -> float:
    """Saturation cut c = 2·log(1/eps): σ'(x) < eps² beyond it (32 in float32, 72 in float64)."""
    return 2.0 * math.log(1.0 / torch.finfo(dtype).eps)


class SoftCount(torch.autograd.Function):
    """Row sums Σ_{i,j} f(a_i − b_j) of a block (a: T × La, b: T × Lb), where
    f(x) = σ(clip(x, −c, c)) − σ(−c) (c = :func:`cut`): f differs from σ by less than eps²,
    is exactly 0 for x <= −c and flat beyond ±c. The cut keeps every intermediate far from
    subnormal numbers, which otherwise slow CPU arithmetic by 10-40x on batches separated with a
    wide margin. Padding: a = −inf, b = +inf gives exactly 0 with zero gradient.

    Saves only a and b and recomputes σ in backward, so autograd memory is O(T·(La + Lb)), not
    O(T·La·Lb). The backward is made of differentiable ops, so double backward works.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        c = cut(a.dtype)
        z = torch.sigmoid((a[:, :, None] - b[:, None, :]).clamp_(-c, c))
        floor = 1.0 / (1.0 + math.exp(c))  # σ(−c), below eps²: pads add ~0 either way
        return z.sum((1, 2)) - a.shape[1] * b.shape[1] * floor

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = ctx.saved_tensors
        c = cut(a.dtype)
        x = a[:, :, None] - b[:, None, :]
        xc = x.clamp(-c, c)
        dx = torch.where(x.abs() < c, torch.sigmoid(xc) * torch.sigmoid(-xc), 0.0)
        dx = dx * g[:, None, None]
        return dx.sum(2), -dx.sum(1)


def pieces(sizes: list[tuple[int, int]]) -> list[list[tuple[int, int, int]]]:
    """Blocks of (task, a-offset, a-length) pieces, each padded block with at most
    BLOCK_ELEMS entries (a task over budget is split along its A side), grouped by size."""
    items = []
    for t, (na, nb) in enumerate(sizes):
        rows = max(1, BLOCK_ELEMS // nb)
        items += [(t, o, min(rows, na - o)) for o in range(0, na, rows)]
    items.sort(key=lambda p: p[2] * sizes[p[0]][1])
    groups: list[list[tuple[int, int, int]]] = []
    la = lb = 0
    for p in items:
        na, nb = p[2], sizes[p[0]][1]
        nla, nlb = max(la, na), max(lb, nb)
        if groups and (len(groups[-1]) + 1) * nla * nlb <= BLOCK_ELEMS:
            groups[-1].append(p)
            la, lb = nla, nlb
        else:
            groups.append([p])
            la, lb = na, nb
    return groups


def task_scores(
    P: torch.Tensor, lay: LabelLayout, scheme: str, scale: torch.Tensor
) -> torch.Tensor:
    """S_τ of every task (T,), in task order (``scale`` = r / τ per task), from projections P:
    pairwise, n × K per-class projections (task (k, l) uses column k − column l); ovr, n × T
    already combined per task. Works in blocks of bounded memory, samples sorted by class."""
    device = P.device
    P = P[lay.order]
    tasks = lay.tasks(scheme)
    cnt, st, n = lay.counts, lay.starts, lay.n
    sizes = [(cnt[k], cnt[l] if l >= 0 else n - cnt[k]) for k, l in tasks]
    sums = P.new_zeros(len(tasks))

    def col(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, device=device)[:, None]

    for group in pieces(sizes):
        t = col([p[0] for p in group])
        k = col([tasks[p[0]][0] for p in group])
        na, nb = col([p[2] for p in group]), col([sizes[p[0]][1] for p in group])
        ja = torch.arange(max(p[2] for p in group), device=device)[None, :]
        jb = torch.arange(max(sizes[p[0]][1] for p in group), device=device)[None, :]
        mask_a, mask_b = ja < na, jb < nb
        ia = torch.where(mask_a, col([st[tasks[p[0]][0]] + p[1] for p in group]) + ja, 0)
        if scheme == "pairwise":
            l = col([tasks[p[0]][1] for p in group])
            ib = torch.where(mask_b, col([st[tasks[p[0]][1]] for p in group]) + jb, 0)
            pa = P[ia, k] - P[ia, l]
            pb = P[ib, k] - P[ib, l]
        else:  # the rest of class k: sorted positions [0, start_k) and [start_k + n_k, n)
            sk = col([st[tasks[p[0]][0]] for p in group])
            ib = torch.where(mask_b, jb + (jb >= sk) * col([cnt[tasks[p[0]][0]] for p in group]), 0)
            pa, pb = P[ia, t], P[ib, t]
        sc = scale[t]
        pa = torch.where(mask_a, pa * sc, -torch.inf)
        pb = torch.where(mask_b, pb * sc, torch.inf)
        sums = sums.index_add(0, t[:, 0], SoftCount.apply(pa, pb))
    pairs = torch.tensor([a * b for a, b in sizes], dtype=P.dtype, device=device)
    return (sums / pairs).clamp(0.0, 1.0)  # round-off of the σ(−c) offset only

