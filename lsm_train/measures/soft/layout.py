"""The label layout of a batch: an explicit object owned by the caller (docs/loss.md).

``LabelLayout(labels)`` finds the classes present (``torch.unique``: one host sync, the number
of classes is a shape) and keeps, lazily and per dtype, the label-only tensors of the fused
path. Build one per batch and pass it as ``soft_md_lsm(..., layout=lay)`` to score several
layers of that batch without reading the labels again (``LSMLoss`` does this each step).
A layout describes the labels as they were when it was built; nothing is cached globally.
The static ``num_classes`` path needs no layout.
"""

from __future__ import annotations

import functools
import itertools

import torch

__all__ = ["LabelLayout"]


class LabelConstants:
    """Per-dtype label tensors of a :class:`LabelLayout` for the fused path (lazy, each built once):
    one-hot Y and its contiguous transpose, Y / n_k, the centring matrices, the task weights.
    Caching them keeps every label-only op out of the per-batch work."""

    def __init__(self, lay: LabelLayout, dtype: torch.dtype):
        self.lay, self.dtype = lay, dtype

    @functools.cached_property
    def Y(self) -> torch.Tensor:
        return self.lay.onehot(self.dtype)

    @functools.cached_property
    def YT(self) -> torch.Tensor:
        return self.Y.mT.contiguous()

    @functools.cached_property
    def cnt(self) -> torch.Tensor:
        return self.lay.count_t.to(self.dtype)

    @functools.cached_property
    def Yn(self) -> torch.Tensor:
        return self.Y / self.cnt

    @functools.cached_property
    def YnT(self) -> torch.Tensor:
        """Ynᵀ (K × n): the class means are Ynᵀ H."""
        return self.Yn.mT.contiguous()

    @functools.cached_property
    def Ync(self) -> torch.Tensor:
        """Yn − 1/n (n × K): the class means about the batch mean are Yncᵀ H."""
        return self.Yn - 1.0 / self.lay.n

    @functools.cached_property
    def Ycnt(self) -> torch.Tensor:
        """Ync · n_k = Y − n_k / n (n × K)."""
        return self.Y - self.cnt / self.lay.n

    @functools.cached_property
    def col(self) -> torch.Tensor:
        return self.lay.inverse[:, None]

    @functools.cached_property
    def offdiag(self) -> torch.Tensor:
        K = self.lay.K
        return 1.0 - torch.eye(K, dtype=self.dtype, device=self.lay.inverse.device)

    @functools.cached_property
    def C(self) -> torch.Tensor:
        return self.lay.ovr_coefficients(self.dtype)

    def alpha_weights(self, a1: float, a2: float) -> torch.Tensor:
        """w (n + K) with α = w · diag([U; Mc][U; Mc]ᵀ) + const: a1 + a2 on the n rows of U,
        a2 n_k on the K class means (cached per (a1, a2))."""
        cache = self.__dict__.setdefault("_alpha", {})
        if (a1, a2) not in cache:
            cache[a1, a2] = torch.cat([self.cnt.new_full((self.lay.n,), a1 + a2), a2 * self.cnt])
        return cache[a1, a2]

    def score_weights(self, scheme: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ip, w, ḡw) for the value from the block sums M = Yᵀ F Y (K × K).

        pairwise: raw = M ∘ ip − σ(−c) (K × K, ip = 1/(n_k n_l) off the diagonal, 0 on it), the
        value Σ w ∘ clamp(raw, 0, 1) with w = 1/(2T) off the diagonal: the mean over the T pairs
        k < l, each counted as (k, l) and (l, k). ḡw = 2 w ∘ ip: ∂value/∂M symmetrized, which
        is what the symmetric x = T + Tᵀ needs. ovr: raw = (M ∘ ip).sum(1) − σ(−c) (K,), ip =
        1/(n_k (n − n_k)) off the diagonal, w = 1/K, ḡw = ip / K (row k scaled by ∂value/∂raw_k).
        w is flattened for one dot product."""
        cache = self.__dict__.setdefault("_weights", {})
        if scheme not in cache:
            K, off, cnt = self.lay.K, self.offdiag, self.cnt
            if scheme == "pairwise":
                T = K * (K - 1) // 2
                ip = off / (cnt[:, None] * cnt)
                w = off / (2 * T)
                cache[scheme] = (ip, w.reshape(-1), ip * (2 * w))
            else:
                ip = off / (cnt * (self.lay.n - cnt))[:, None]
                cache[scheme] = (ip, torch.full_like(cnt, 1.0 / K), ip / K)
        return cache[scheme]


class LabelLayout:
    """Classes of a batch of validated int64 labels (n,): sorted labels ``classes``, index of
    each sample's class ``inverse``, class sizes ``count_t``; the Python lists (counts, starts)
    and the by-class order only when the blocked path asks. ``labels`` is the tensor it was
    built from (``soft_md_lsm`` checks that a layout passed to it belongs to its labels)."""

    def __init__(self, labels: torch.Tensor):
        self.labels = labels
        self.classes, self.inverse, self.count_t = torch.unique(
            labels, return_inverse=True, return_counts=True
        )
        self.K = int(self.classes.numel())
        self.n = int(labels.numel())

    @functools.cached_property
    def counts(self) -> list[int]:
        return self.count_t.tolist()

    @functools.cached_property
    def starts(self) -> list[int]:
        return [0, *itertools.accumulate(self.counts[:-1])]

    @functools.cached_property
    def order(self) -> torch.Tensor:
        return torch.argsort(self.inverse, stable=True)

    def tasks(self, scheme: str) -> list[tuple[int, int]]:
        """(a-class, b-class) per task; b-class -1 means "every other class" (ovr)."""
        if scheme == "pairwise":
            return [(k, l) for k in range(self.K) for l in range(k + 1, self.K)]
        return [(k, -1) for k in range(self.K)]

    def pair_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Class indices (k, l) of the pairwise tasks, k < l."""
        return self._pair_index

    @functools.cached_property
    def _pair_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        k, l = torch.triu_indices(self.K, self.K, offset=1, device=self.inverse.device)
        return k, l

    def consts(self, dtype: torch.dtype) -> LabelConstants:
        """Label-only tensors of the fused path, each built on first use, once per dtype."""
        cache = self.__dict__.setdefault("_consts", {})
        if dtype not in cache:
            cache[dtype] = LabelConstants(self, dtype)
        return cache[dtype]

    def onehot(self, dtype: torch.dtype) -> torch.Tensor:
        """Y (n × K): Y[i, k] = 1 if sample i is in class k (cached per dtype)."""
        cache = self.__dict__.setdefault("_onehot", {})
        if dtype not in cache:
            cache[dtype] = torch.nn.functional.one_hot(self.inverse, self.K).to(dtype)
        return cache[dtype]

    def ovr_coefficients(self, dtype: torch.dtype) -> torch.Tensor:
        """C (K × K): δ_k = μ_k − μ_rest(k) = Mu @ C[:, k], μ_rest = Σ_{j≠k} n_j μ_j / (n − n_k)."""
        counts = self.count_t.to(dtype)
        return (-counts[:, None] / (self.n - counts)[None, :]).fill_diagonal_(1.0)

    def combine(self, M: torch.Tensor, scheme: str) -> torch.Tensor:
        """Per-task combinations of the K columns of M (· × K): M @ c_t for every task t."""
        if scheme == "pairwise":
            k, l = self.pair_index()
            return M[:, k] - M[:, l]
        return M @ self.ovr_coefficients(M.dtype)

    def quadratic(self, G: torch.Tensor, scheme: str) -> torch.Tensor:
        """c_tᵀ G c_t for every task t (G: K × K symmetric), without a T × T matrix."""
        if scheme == "pairwise":
            k, l = self.pair_index()
            return G[k, k] + G[l, l] - 2 * G[k, l]
        C = self.ovr_coefficients(G.dtype)
        return (C * (G @ C)).sum(0)

