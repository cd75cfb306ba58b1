"""Soft MD-LSM: the differentiable surrogate of the MD-LSM degree (DESIGN §2).

For two classes A, B of a batch of features H (n × d)::

    S_τ(A, B) = (1 / |A||B|) · Σ_{a∈A, b∈B} σ( ŵ·(a − b) / τ ),     σ = logistic function,

    ŵ ∝ Σ_s⁻¹ (μ_A − μ_B),    scaled so that ŵᵀ Σ_s ŵ = 1,
    Σ_s = (1 − λ) Σ + (λ·tr Σ / d + ε·v̄) I.

* Σ is the pooled within-class covariance of *all* classes present in the batch,
  Σ = Σ_k Σ_{i∈k} (h_i − μ_k)(h_i − μ_k)ᵀ / max(n − K, 1), for both schemes (one shared matrix,
  hence one factorization for every class pair). A class with a single sample adds nothing.
* λ = ``shrinkage`` ∈ [0, 1]; λ = 1 gives the mean-difference direction.
* ε·v̄ is a tiny ridge (ε = 1e-6, v̄ = total variance per coordinate of the batch) that keeps
  Σ_s invertible when λ = 0 or the within-class scatter vanishes; it scales with H, so the
  value stays invariant to positive scaling of H.
* ŵᵀΣ_sŵ = 1 puts the projections in units of within-class standard deviation, so S_τ does
  not depend on the scale of H, and S_τ → the exact degree (Mann–Whitney AUC, ties 1/2) of
  direction ŵ as τ → 0. S_τ ∈ (0, 1); it is *not* clipped at 1/2.
* ``scheme="pairwise"`` averages S_τ over the K(K−1)/2 class pairs (k < l, A = class k);
  ``scheme="ovr"`` averages S_τ(class k, rest) over the K classes (μ_B = mean of the rest).
* A batch with fewer than two classes returns exactly 1.0, computed as ``(H * 0).sum() + 1`` so
  that it is connected to the graph with a zero gradient (never NaN).
* ``crossfit=True``: 2-fold cross-fitted value (fit ŵ on one half of each class, score the
  pairs of the other half, swap, average), which does not saturate when d >= n.
* Each pair term is σ(clip(x, −c, c)) − σ(−c), c = 2·ln(1/eps): within eps² of σ(x), flat
  beyond ±c, which keeps subnormal numbers (10-40x slower on CPU) out of the backward.

Cost. The direction solve uses one Cholesky factorization with the K class means as
right-hand sides (ŵ for a pair is a difference of the K solutions): the d × d primal when
d <= n, the n × n dual (Woodbury, from one Gram matrix of the within-class rows and the class
means) when d > n, so no d × d matrix is ever formed then — O(n·d·min(n, d) + min(n, d)³);
the backward reuses the factorization. With Q = Hc Σ_s⁻¹ Mu (n × K projections on the K
per-class solutions) and g_a = Q[a, y_a], a cross-class pair's projection is
ŵ·(a − b) = r_{y_a y_b}·(g_a + g_b − Q[a, y_b] − Q[b, y_a]), so every pair term comes from
n × K numbers. Two paths, picked by size:

* n² <= ``_DENSE_ELEMS`` (n <= 512, training batches): the whole soft count is a handful of
  dense n × n ops (per-task sums = off-diagonal blocks of Yᵀ F Y, Y one-hot), and the
  in-sample value is one fused autograd node (:class:`_FastSoft`) with a hand-written adjoint
  backward — at these sizes per-op overhead, not arithmetic, is the cost. Memory O(n² + n·d).
* larger n: blocks of bounded memory (``_BLOCK_ELEMS`` pair terms), recomputing σ in the
  backward (autograd memory O(n) per direction).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from typing import Any

import torch

from lsm_train._validation import (
    _as_float,
    check_labels,
    check_pair,
    check_points,
    check_positive,
    to_tensor,
)
from lsm_train.features import reduce_features

__all__ = ["soft_md_lsm", "soft_pair_score", "fisher_directions", "SCHEMES"]

SCHEMES = ("pairwise", "ovr")
_RIDGE = 1e-6  # ε: ridge relative to the total variance per coordinate
_BLOCK_ELEMS = 1 << 22  # max entries of one block of pairwise differences
_DENSE_ELEMS = 1 << 18  # n² up to this: the dense n × n soft count (n <= 512)


# --------------------------------------------------------------------------- validation


def _check_shrinkage(shrinkage: Any) -> float:
    try:
        v = float(shrinkage)
    except (TypeError, ValueError) as err:
        raise ValueError(f"shrinkage: expected a number in [0, 1], got {shrinkage!r}") from err
    if not (0.0 <= v <= 1.0):
        raise ValueError(f"shrinkage: expected a number in [0, 1], got {shrinkage!r}")
    return v


def _check_tau(tau: Any) -> float:
    # a plain positive float (the usual call) needs no conversion: skip the generic check
    if type(tau) is float and 0.0 < tau < math.inf:
        return tau
    return check_positive(tau, "tau")


def _check_scheme(scheme: Any) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: expected one of {SCHEMES}, got {scheme!r}")
    return scheme


def _full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Disable autocast: the solves and the soft counts need float32/float64 arithmetic.
    Nothing to do (and no autocast context to build, which costs more than a small solve)
    when autocast is already off for the device."""
    try:
        if not torch.is_autocast_enabled(device.type):
            return contextlib.nullcontext()
    except (TypeError, RuntimeError):  # torch < 2.4 (no device argument), unknown device type
        pass
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):  # a device type without autocast
        return contextlib.nullcontext()


def _features(H: Any, reduce: str) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """(n, d) float features of a valid shape and their (min, max) as 0-dim tensors, not read
    yet: the caller reads it with its other values in one host sync and passes the numbers
    to :func:`_scale`, which checks finiteness (NaN and inf propagate to min and max)."""
    t = to_tensor(H, "H")
    if not t.is_floating_point():
        t = _as_float(t)
    t = reduce_features(t, reduce)
    if t.ndim != 2 or 0 in t.shape:
        t = check_points(t, "H")  # raises the shape error
    t = _as_float(t)
    return t, tuple(torch.aminmax(t.detach()))


def _scale(t: torch.Tensor, lo: float, hi: float) -> float:
    """A power of two ``m`` from the (min, max) of :func:`_features`: 1.0 unless max|H| is
    outside [2^-24, 2^24]; the caller works on H / m, which keeps every sum of squares finite
    even for huge finite features. S_τ is scale invariant and m is exact, so this changes
    nothing else. A NaN or inf runs the full :func:`check_points`, which raises the error."""
    top = max(-lo, hi)
    if not math.isfinite(top):
        check_points(t, "H")  # raises: NaN or inf in H
    if 0.0 < top and not (2.0**-24 <= top <= 2.0**24):
        return math.ldexp(1.0, math.frexp(top)[1])
    return 1.0


def _scaled_features(H: Any, reduce: str) -> tuple[torch.Tensor, float]:
    """Validated features and their scale m (:func:`_scale`), read at once (one host sync)."""
    t, lohi = _features(H, reduce)
    return t, _scale(t, *torch.stack(lohi).tolist())


# --------------------------------------------------------------------------- linear algebra


def _factor(S: torch.Tensor) -> tuple[str, tuple[torch.Tensor, ...]]:
    """Cholesky factor of a symmetric positive definite S; LU if Cholesky fails (round-off).

    When the order is a multiple of 128 (batch sizes often are) S is bordered by one unit
    row/column, [[S, 0], [0, 1]] = [[L, 0], [0, 1]][[L, 0], [0, 1]]ᵀ: the CPU LAPACK Cholesky
    is 2-4x slower at such orders (cache aliasing, measured 120 µs at 128 against 31 µs at
    129); the factor is the same."""
    L, info = _cholesky(S)
    if int(info) != 0:
        return "lu", torch.linalg.lu_factor(S)
    return "cholesky", (L,)


def _cholesky(S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, info) of :func:`_factor`'s Cholesky; ``info`` (0 = success) stays on the device."""
    m = S.shape[-1]
    if m % 128 == 0:
        L, info = torch.linalg.cholesky_ex(torch.block_diag(S, S.new_ones(1, 1)))
        return L[:m, :m], info
    return torch.linalg.cholesky_ex(S)


def _apply_factor(kind: str, F: tuple[torch.Tensor, ...], R: torch.Tensor) -> torch.Tensor:
    return torch.cholesky_solve(R, F[0]) if kind == "cholesky" else torch.linalg.lu_solve(*F, R)


def _fast_factor(S: torch.Tensor, status: list | None) -> tuple[str, tuple[torch.Tensor, ...]]:
    """:func:`_factor`, or with a ``status`` list the Cholesky factor alone, its ``info``
    appended to ``status`` for the caller to read with its other values in one host sync
    (and to redo with :func:`_factor`'s LU fallback in the rare case it is not 0)."""
    if status is None:
        return _factor(S)
    L, info = _cholesky(S)
    status.append(info)
    return "cholesky", (L,)


class _Gram(torch.autograd.Function):
    """V Vᵀ with the symmetric adjoint ḡV = (ḡ + ḡᵀ) V: one matrix product in the backward
    instead of two. The backward is made of differentiable ops (double backward works)."""

    @staticmethod
    def forward(ctx, V: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(V)
        return V @ V.mT

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        (V,) = ctx.saved_tensors
        return (g + g.mT) @ V


class _SPDSolve(torch.autograd.Function):
    """X = S⁻¹R for symmetric S, with the adjoint backward ḡR = S⁻¹ḡX, ḡS = −ḡR Xᵀ that
    reuses the factorization: O(m²·r) instead of differentiating through the factorization
    (O(m³)). Under create_graph the backward re-enters this function, so it stays
    differentiable (double backward)."""

    @staticmethod
    def forward(ctx, S: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        kind, F = _factor(S)
        X = _apply_factor(kind, F, R)
        ctx.kind = kind
        ctx.save_for_backward(S, X, *F)
        return X

    @staticmethod
    def backward(ctx, gX: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        S, X, *F = ctx.saved_tensors
        if torch.is_grad_enabled():
            gR = _SPDSolve.apply(S, gX)
        else:
            gR = _apply_factor(ctx.kind, tuple(F), gX)  # S symmetric: S⁻ᵀ = S⁻¹
        return -gR @ X.mT, gR


def _spd_solve(S: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """S⁻¹ R for a symmetric positive definite S (one factorization, many right-hand sides)."""
    return _SPDSolve.apply(S, R)


def _shrunk_solve(
    U: torch.Tensor, R: torch.Tensor, alpha: torch.Tensor, c: float, dual: bool | None = None
) -> torch.Tensor:
    """Σ_s⁻¹ R with Σ_s = αI + c·UᵀU (U: n × d, R: d × r).

    Primal: a d × d Cholesky solve. Dual (Woodbury), never forming a d × d matrix:
    Σ_s⁻¹R = (R − c·Uᵀ(αI_n + c·UUᵀ)⁻¹ U R) / α. ``dual=None`` picks the dual when d > n.
    """
    n, d = U.shape
    if dual is None:
        dual = d > n
    if c == 0.0:
        return R / alpha
    if dual:
        G = c * (U @ U.mT)
        G = G + alpha * torch.eye(n, dtype=U.dtype, device=U.device)
        return (R - c * (U.mT @ _spd_solve(G, U @ R))) / alpha
    S = c * _Gram.apply(U.mT)
    S = S + alpha * torch.eye(d, dtype=U.dtype, device=U.device)
    return _spd_solve(S, R)


# --------------------------------------------------------------------------- directions


class _Consts:
    """Per-dtype label tensors of a :class:`_Layout` for the fused path (lazy, each built once):
    one-hot Y and its contiguous transpose, Y / n_k, the centring matrices, the task weights.
    Caching them keeps every label-only op out of the per-batch work."""

    def __init__(self, lay: _Layout, dtype: torch.dtype):
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


class _Layout:
    """Classes of a batch: sorted labels, index of each sample's class, class sizes; the
    Python lists (counts, starts) and the by-class order only when the blocked path asks."""

    def __init__(self, labels: torch.Tensor):
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

    def consts(self, dtype: torch.dtype) -> _Consts:
        """Label-only tensors of the fused path, each built on first use, once per dtype."""
        cache = self.__dict__.setdefault("_consts", {})
        if dtype not in cache:
            cache[dtype] = _Consts(self, dtype)
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


_LAYOUTS: list[tuple[torch.Tensor, _Layout]] = []  # recent label vectors and their layouts
# (label tensor, its layout) while LSMLoss scores the layers of one batch; see pinned_labels
_PINNED: list[Any] = [None, None]


@contextlib.contextmanager
def pinned_labels(labels: torch.Tensor, lay: _Layout) -> Any:
    """Inside the block, this very ``labels`` object has layout ``lay``: LSMLoss scores every
    layer of a batch with one validated label tensor that nothing can modify in between, so
    the layers find its layout without comparing contents (a host sync on a GPU). Only
    inside: across calls a tensor can be refilled in place without a version bump (through
    a numpy view or ``.data``), so there the contents are compared."""
    old = _PINNED[:]
    _PINNED[:] = labels, lay
    try:
        yield
    finally:
        _PINNED[:] = old


def _seen_layout(labels: torch.Tensor) -> _Layout | None:
    tensor, lay = _PINNED
    return lay if tensor is labels else None


def _match(labels: torch.Tensor) -> tuple[int, _Layout | None]:
    """(min label, cached layout of a label vector with equal contents, or None) from one
    host read for the minimum and all the comparisons (instead of one sync each)."""
    same = [(lab, lay) for lab, lay in _LAYOUTS
            if lab.shape == labels.shape and lab.device == labels.device]
    probe = labels.min()[None]
    if same:
        equal = (torch.stack([lab for lab, _ in same]) == labels).all(1)
        probe = torch.cat([probe, equal.to(probe.dtype)])
    lowest, *flags = probe.tolist()
    return lowest, next((lay for (_, lay), f in zip(same, flags, strict=True) if f), None)


def _new_layout(labels: torch.Tensor) -> _Layout:
    lay = _Layout(labels)  # torch.unique: a host sync (the number of classes is a shape)
    _LAYOUTS.insert(0, (labels.clone(), lay))
    del _LAYOUTS[4:]
    return lay


def _layout(labels: torch.Tensor) -> _Layout:
    """:class:`_Layout` of validated ``labels``, reused while the same label vector comes back
    (LSMLoss scores several layers of one batch; a training loop often repeats its label
    order). A hit is the tensor pinned by :func:`pinned_labels` or equal contents (compared
    with a private copy), so it is always exact. Only small batches (n² <= _DENSE_ELEMS) are kept,
    so the cache never holds large tensors."""
    if labels.numel() ** 2 > _DENSE_ELEMS or labels.numel() == 0:
        return _Layout(labels)
    return _seen_layout(labels) or _match(labels)[1] or _new_layout(labels)


def _labels_and_layout(
    y: Any, n: int, device: torch.device, *, name: str = "y", per: str = "row of H"
) -> tuple[torch.Tensor, _Layout]:
    """Validated int64 labels (n,) on ``device`` and their layout (``name``, ``per`` word the
    errors, as in check_labels). An int64 label tensor of the right shape and device costs no
    host read when it is the pinned one (validated before pinning), else one read (its
    minimum and the comparisons with the cached vectors) plus torch.unique's when it is
    new. Anything else, and bad labels, go through :func:`check_labels`, which raises the
    detailed error."""
    if (
        isinstance(y, torch.Tensor)
        and y.dtype == torch.int64
        and y.shape == (n,)
        and y.device == device
        and 0 < n * n <= _DENSE_ELEMS
    ):
        lay = _seen_layout(y)
        if lay is None:
            lowest, lay = _match(y)
            if lowest >= 0 and lay is None:
                lay = _new_layout(y)
        if lay is not None:
            return y, lay
    labels = check_labels(y, n, device=device, name=name, per=per)
    return labels, _layout(labels)


def _directions(
    H: torch.Tensor,
    lay: _Layout,
    scheme: str,
    shrinkage: float,
    dual: bool | None = None,
    need_w: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Returns (P, W, R): W = Σ_s⁻¹ Mu (d × K per-class solutions, in H units); P = Hc @ W
    (n × K), Hc = H − batch mean; rates R so that ŵ_t = lay.combine(W)[:, t] · r_t has
    ŵ_tᵀ Σ_s ŵ_t = 1: pairwise, R is K × K with r_(k,l) = R[k, l] (symmetric, diagonal
    unused); ovr, R is (K,). W is None in the dual unless ``need_w`` (the in-sample value only
    needs P).

    Works in H units: Σ_s = (1 − λ)Σ + (λ tr Σ / d + ε s²) I with s² the mean square of Hc
    (+ eps²) equals s² times the Σ_s of X = Hc / s, which leaves P, ŵ and R unchanged, so s
    itself is never formed. Hc is not formed either: with U = H − Y·(class means) (Yᵀ U = 0)
    and Mc the class means about the batch mean, Hc = U + Y Mc, ‖Hc‖² = ‖U‖² + Σ_k n_k ‖Mc_k‖².

    Dual (d > n), from one Gram matrix of [U; Mc] ((n + K)²) and an n × n Cholesky solve:
    with Sol = (α I + c U Uᵀ)⁻¹ U Mcᵀ (Woodbury), Σ_s⁻¹ Mcᵀ = (Mcᵀ − c Uᵀ Sol) / α, so
    G = Mc Σ_s⁻¹ Mcᵀ = (Mc Mcᵀ − c (U Mcᵀ)ᵀ Sol) / α and P = Hc Σ_s⁻¹ Mcᵀ = Sol + Y G.
    Primal (d <= n): a d × d solve, P = U W + Y (Mc W).
    """
    n, d = H.shape
    dtype, K = H.dtype, lay.K
    cnt = lay.count_t.to(dtype)
    Y = lay.onehot(dtype)
    Mr = (Y / cnt).mT @ H  # K × d class means
    U = torch.addmm(H, Y, Mr, alpha=-1.0)  # within-class centered rows
    Mc = Mr - (cnt / n) @ Mr  # class means about the batch mean
    m = max(n - K, 1)
    c = (1.0 - shrinkage) / m
    eps = torch.finfo(dtype).eps
    if dual is None:
        dual = d > n
    if dual:
        Gm = _Gram.apply(torch.cat([U, Mc]))
        Ku, B, MM = Gm[:n, :n], Gm[:n, n:], Gm[n:, n:]
        ssu = Ku.trace()
        ss = Gm.diagonal() @ torch.cat([cnt.new_ones(n), cnt])  # ‖Hc‖²
    else:
        ssu = U.square().sum()
        MM = Mc @ Mc.mT
        ss = ssu + MM.diagonal() @ cnt
    alpha = ssu * (shrinkage / (m * d)) + ss * (_RIDGE / (n * d)) + _RIDGE * eps**2
    W = None
    if dual:
        if c == 0.0:
            Sol = B / alpha
        else:
            eye = torch.eye(n, dtype=dtype, device=H.device)
            Sol = _spd_solve(torch.add(alpha * eye, Ku, alpha=c), B)
        G = torch.addmm(MM, B.mT, Sol, alpha=-c) / alpha
        P = torch.addmm(Sol, Y, G)
        if need_w:
            W = torch.addmm(Mc.mT, U.mT, Sol, alpha=-c) / alpha
    else:
        W = _shrunk_solve(U, Mc.mT, alpha, c, dual=False)
        G = Mc @ W
        P = torch.addmm(U @ W, Y, G)
    if scheme == "pairwise":  # δ_klᵀ Σ_s⁻¹ δ_kl = G_kk + G_ll − G_kl − G_lk
        dg = G.diagonal()
        quad = (dg[:, None] + dg) - (G + G.mT)
    else:
        C = lay.ovr_coefficients(dtype)
        quad = (C * (G @ C)).sum(0)
    R = torch.rsqrt(quad.clamp_min(0.0) + eps)  # Mahalanobis: scale free
    return P, W, R


def _task_rates(R: torch.Tensor, lay: _Layout, scheme: str) -> torch.Tensor:
    """r_t per task (T,) in task order from the R of :func:`_directions`."""
    if scheme == "pairwise":
        k, l = lay.pair_index()
        return R[k, l]
    return R


def fisher_directions(
    H: Any, y: Any, *, scheme: str = "pairwise", shrinkage: float = 0.1, reduce: str = "auto"
) -> tuple[torch.Tensor, list[tuple[int, int | None]], torch.Tensor]:
    """The normalized shrunk Fisher directions used by :func:`soft_md_lsm`.

    Returns ``(W, tasks, classes)``: W is d × T, column t the direction ŵ_t (ŵᵀΣ_sŵ = 1) of
    task t; ``tasks[t] = (k, l)`` (class indices into ``classes``) for pairwise, ``(k, None)``
    for ovr (class k vs the rest); ``classes`` are the sorted labels present. Differentiable.
    """
    scheme = _check_scheme(scheme)
    shrinkage = _check_shrinkage(shrinkage)
    X, m = _scaled_features(H, reduce)
    lay = _Layout(check_labels(y, X.shape[0], device=X.device))
    if lay.K < 2:
        raise ValueError(
            f"y: expected at least 2 distinct classes, got {lay.K} "
            f"(labels present: {lay.classes.tolist()})"
        )
    with _full_precision(X.device):
        _, W, R = _directions(X / m if m != 1.0 else X, lay, scheme, shrinkage, need_w=True)
    tasks = [(k, None if l < 0 else l) for k, l in lay.tasks(scheme)]
    return lay.combine(W, scheme) * (_task_rates(R, lay, scheme) / m), tasks, lay.classes


# --------------------------------------------------------------------------- soft counts


def _cut(dtype: torch.dtype) -> float:
    """Saturation cut c = 2·log(1/eps): σ'(x) < eps² beyond it (32 in float32, 72 in float64)."""
    return 2.0 * math.log(1.0 / torch.finfo(dtype).eps)


class _SoftCount(torch.autograd.Function):
    """Row sums Σ_{i,j} f(a_i − b_j) of a block (a: T × La, b: T × Lb), where
    f(x) = σ(clip(x, −c, c)) − σ(−c) (c = :func:`_cut`): f differs from σ by less than eps²,
    is exactly 0 for x <= −c and flat beyond ±c. The cut keeps every intermediate far from
    subnormal numbers, which otherwise slow CPU arithmetic by 10-40x on batches separated with a
    wide margin. Padding: a = −inf, b = +inf gives exactly 0 with zero gradient.

    Saves only a and b and recomputes σ in backward, so autograd memory is O(T·(La + Lb)), not
    O(T·La·Lb). The backward is made of differentiable ops, so double backward works.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        c = _cut(a.dtype)
        z = torch.sigmoid((a[:, :, None] - b[:, None, :]).clamp_(-c, c))
        floor = 1.0 / (1.0 + math.exp(c))  # σ(−c), below eps²: pads add ~0 either way
        return z.sum((1, 2)) - a.shape[1] * b.shape[1] * floor

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = ctx.saved_tensors
        c = _cut(a.dtype)
        x = a[:, :, None] - b[:, None, :]
        xc = x.clamp(-c, c)
        dx = torch.where(x.abs() < c, torch.sigmoid(xc) * torch.sigmoid(-xc), 0.0)
        dx = dx * g[:, None, None]
        return dx.sum(2), -dx.sum(1)


def _pieces(sizes: list[tuple[int, int]]) -> list[list[tuple[int, int, int]]]:
    """Blocks of (task, a-offset, a-length) pieces, each padded block with at most
    _BLOCK_ELEMS entries (a task over budget is split along its A side), grouped by size."""
    items = []
    for t, (na, nb) in enumerate(sizes):
        rows = max(1, _BLOCK_ELEMS // nb)
        items += [(t, o, min(rows, na - o)) for o in range(0, na, rows)]
    items.sort(key=lambda p: p[2] * sizes[p[0]][1])
    groups: list[list[tuple[int, int, int]]] = []
    la = lb = 0
    for p in items:
        na, nb = p[2], sizes[p[0]][1]
        nla, nlb = max(la, na), max(lb, nb)
        if groups and (len(groups[-1]) + 1) * nla * nlb <= _BLOCK_ELEMS:
            groups[-1].append(p)
            la, lb = nla, nlb
        else:
            groups.append([p])
            la, lb = na, nb
    return groups


def _task_scores(P: torch.Tensor, lay: _Layout, scheme: str, scale: torch.Tensor) -> torch.Tensor:
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

    for group in _pieces(sizes):
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
        sums = sums.index_add(0, t[:, 0], _SoftCount.apply(pa, pb))
    pairs = torch.tensor([a * b for a, b in sizes], dtype=P.dtype, device=device)
    return (sums / pairs).clamp(0.0, 1.0)  # round-off of the σ(−c) offset only


def _dense_task_scores(
    P: torch.Tensor, lay: _Layout, scheme: str, R: torch.Tensor, tau: float
) -> torch.Tensor:
    """:func:`_task_scores` for small batches, as a handful of dense n × n ops (plain
    autograd, O(n²) memory; no blocks, no gathers of padded pieces, no Python loop).

    With g_a = P[a, y_a] and E[a, b] = P[a, y_b] (E = P Yᵀ, Y one-hot): pairwise, for a, b in
    different classes, ŵ_{y_a y_b}·(a − b) = r·(g_a + g_b − E[a, b] − E[b, a]) (symmetric in
    a, b); ovr, ŵ_{y_a}·(a − b) = r·(g_a − P[b, y_a]). Per-task sums are the off-diagonal
    entries of Yᵀ F Y (F the n × n soft counts): same-class entries of F land on the diagonal
    and are never used, so they need no mask."""
    inv, K = lay.inverse, lay.K
    Y = lay.onehot(P.dtype)
    cnt = lay.count_t.to(P.dtype)
    g, E = P.gather(1, inv[:, None]), P @ Y.mT
    if scheme == "pairwise":
        D = g - E
        x = (D + D.mT) * (Y @ (R * (1.0 / tau)) @ Y.mT)
    else:
        x = (g - E.mT) * (Y @ (R * (1.0 / tau)))[:, None]
    c = _cut(P.dtype)
    M = Y.mT @ (torch.sigmoid(x.clamp(-c, c)) @ Y)  # K × K block sums
    floor = 1.0 / (1.0 + math.exp(c))  # σ(−c): f = σ(clip(x)) − σ(−c) as in _SoftCount
    if scheme == "pairwise":
        k, l = lay.pair_index()
        pairs = cnt[k] * cnt[l]
        sums = M[k, l]
    else:
        pairs = cnt * (lay.n - cnt)
        sums = (M * (1.0 - torch.eye(K, dtype=P.dtype, device=P.device))).sum(1)
    return (sums / pairs - floor).clamp(0.0, 1.0)


class _FastSoft(torch.autograd.Function):
    """In-sample S_τ (mean over tasks) of a small batch (n² <= _DENSE_ELEMS) as one autograd
    node: the arithmetic of :func:`_directions` + :func:`_dense_task_scores`, run without
    recording a graph, and a hand-written adjoint backward that reuses the factorization and
    the forward's n × n intermediates. About 80 tensor ops in all instead of ~200 recorded
    ones: at training batch sizes the per-op overhead, not the arithmetic, is what costs.
    α and ᾱ stay 0-dim tensors on the device and nothing is read to the host: with a list
    ``status``, the Cholesky ``info`` is appended to it unread (the caller checks it with
    its own reads, in one sync); without, :func:`_factor` checks it at once.

    Backward (ḡ: upstream scalar), in reverse order of the forward: M̄ = ∂value/∂M on the
    used entries of M = Yᵀ F Y; x̄ = (Y M̄ Yᵀ) ∘ σ'(x) on |x| < c; the projections P̄ and
    rates R̄ (R̄ → Ḡ through the quadratic forms); then with P = U Z + Y G, G = Mc Z:
    Ḡ' = Ḡ + Yᵀ P̄, Z̄ = Uᵀ P̄ + Mcᵀ Ḡ', A = Σ_s⁻¹ Z̄ (dual: Woodbury with the n × n factor),
    ᾱ = tr(−A Zᵀ), Ū = P̄ Zᵀ − c U (A Zᵀ + Z Aᵀ) + 2 (∂α/∂‖U‖²) ᾱ U,
    M̄c = Ḡ' Zᵀ + Aᵀ + 2 (∂α/∂‖Hc‖²) ᾱ n_k Mc, and H̄ = (I − Yn Yᵀ) Ū + (Yn − 1/n) M̄c through
    U = H − Y Mr, Mc = Mr − mean(H), Mr = Ynᵀ H (Yn = Y / n_k). U, U A and U Z have zero class
    sums (Yᵀ U = 0), so the projection I − Yn Yᵀ only acts on P̄ (n × K work) and H̄ is a single
    product of an n × 3K and a 3K × d matrix. The dual takes U Z̄ and U A from the forward's
    Gram U [U; Mc]ᵀ, so A and H̄ are its only d-sized products. Under create_graph (double
    backward) it recomputes the value with the recorded ops and differentiates that, so higher
    derivatives stay exact."""

    @staticmethod
    def forward(ctx, H, lay, scheme, shrinkage, tau, dual, grad=True, status=None):
        n, d = H.shape
        dtype, K = H.dtype, lay.K
        k_ = lay.consts(dtype)
        Y, YT = k_.Y, k_.YT
        pairwise = scheme == "pairwise"
        # V = [U; Mc] (U = H − Y Mr within-class centred rows, Mc the class means about the
        # batch mean), written in place: the dual Gram and the backward's Z̄ take V in one op
        Mr = torch.mm(k_.YnT, H)  # K × d class means
        V = H.new_empty(n + K, d)
        U, Mc = V[:n], V[n:]
        torch.addmm(H, Y, Mr, alpha=-1.0, out=U)
        torch.sub(Mr, H.mean(0), out=Mc)  # exactly 0 for constant features
        m = max(n - K, 1)
        c = (1.0 - shrinkage) / m
        eps = torch.finfo(dtype).eps
        if dual is None:
            dual = d > n
        Gu = None
        # α = a1 ‖U‖² + a2 ‖Hc‖² + const, ‖Hc‖² = ‖U‖² + Σ_k n_k ‖Mc_k‖², stays a 0-dim tensor
        # on the device (a Python float would cost a host sync on a GPU)
        a1, a2 = shrinkage / (m * d), _RIDGE / (n * d)
        if dual:
            Gm = torch.mm(V, V.mT)
            Gu, MM = Gm[:n], Gm[n:, n:]  # Gu = U Vᵀ = [Ku B]
            Ku, B = Gu[:, :n], Gu[:, n:]
            alpha = torch.dot(Gm.diagonal(), k_.alpha_weights(a1, a2))
        else:
            MM = torch.mm(Mc, Mc.mT)
            ssu = torch.dot(U.reshape(-1), U.reshape(-1))
            alpha = torch.dot(MM.diagonal(), k_.alpha_weights(a1, a2)[n:]).add_(ssu, alpha=a1 + a2)
        alpha.add_(_RIDGE * eps**2)
        kind, F, Z = "scalar", (), None
        if dual:
            if c == 0.0:
                Sol = B / alpha
            else:
                Gd = Ku * c
                Gd.diagonal().add_(alpha)
                kind, F = _fast_factor(Gd, status)
                Sol = _apply_factor(kind, F, B)
            G = torch.addmm(MM, B.mT, Sol, alpha=-c).div_(alpha)
            UZ = Sol  # U Z = (B − c Ku Sol) / α = Sol
            if grad:  # Z itself only enters the backward; kept as Zᵀ (K × d, the faster product)
                Z = torch.addmm(Mc, Sol.mT, U, alpha=-c).div_(alpha).mT
        else:
            if c == 0.0:
                Z = Mc.mT / alpha
            else:
                Sg = torch.mm(U.mT, U)
                Sg.mul_(c).diagonal().add_(alpha)
                kind, F = _fast_factor(Sg, status)
                Z = _apply_factor(kind, F, Mc.mT.contiguous())
            G = torch.mm(Mc, Z)
            UZ = torch.mm(U, Z)
        P = torch.addmm(UZ, Y, G)  # = U Z + Y G
        if pairwise:
            dg = G.diagonal()
            quad = (dg[:, None] + dg).sub_(G + G.mT)
        else:
            C = k_.C
            quad = (C * (G @ C)).sum(0)
            P = P @ C
        R = quad.clamp_min(0.0).add_(eps).rsqrt_()
        Rt = R * (1.0 / tau)
        # dense soft count (as _dense_task_scores)
        g = P.gather(1, k_.col)
        if pairwise:
            # x_ab = Rt_{y_a y_b} (g_a + g_b − P[a, y_b] − P[b, y_a]) = T_ab + T_ba with
            # T = Fa Yᵀ, Fa[a, l] = Rt_{y_a l} (g_a − P[a, l]) (Rt symmetric): one product
            S, Rn = g - P, torch.mm(Y, Rt)  # n × K
            T = torch.mm(Rn * S, YT)
            x = T + T.mT
        else:
            S = g - torch.mm(P, YT).mT  # g_a − P[b, y_a]
            Rn = torch.mv(Y, Rt)[:, None]
            x = S * Rn
        cut = _cut(dtype)
        x.clamp_(-cut, cut)  # in place: hardtanh_backward below masks |x| >= c all the same
        z = torch.sigmoid(x)
        ip, w, _ = k_.score_weights(scheme)
        raw = torch.mm(YT, torch.mm(z, Y)).mul_(ip)  # per-task sums / pairs
        if not pairwise:
            raw = raw.sum(1)
        raw.sub_(1.0 / (1.0 + math.exp(cut)))  # − σ(−c): f = σ(clip(x)) − σ(−c)
        clipped = raw.clamp(0.0, 1.0)
        value = torch.dot(clipped.view(-1), w)
        if not grad:  # no backward will come (e.g. a probe under no_grad): skip its inputs
            return value
        dRq = R.pow(3).masked_fill_(quad < 0, 0.0)  # ∂Rt/∂quad times −2τ
        inside = raw == clipped  # where the clamp passes the gradient
        ctx.lay, ctx.scheme, ctx.shrinkage, ctx.tau, ctx.dual = lay, scheme, shrinkage, tau, dual
        ctx.consts = (c, alpha, a1, a2, kind)
        ctx.save_for_backward(H, V, Gu, Z, UZ, S, Rn, x, z, dRq, inside, *F)
        return value

    @staticmethod
    def backward(ctx, gv):
        H, V, Gu, Z, UZ, S, Rn, x, z, dRq, inside, *F = ctx.saved_tensors
        lay, scheme = ctx.lay, ctx.scheme
        if torch.is_grad_enabled():  # create_graph: differentiate the recorded ops instead
            with torch.enable_grad():
                v = _soft_md_lsm_graph(H, lay, scheme, ctx.shrinkage, ctx.tau, ctx.dual).mean()
            (gH,) = torch.autograd.grad(v, H, gv, create_graph=True)
            return gH, None, None, None, None, None, None, None
        c, alpha, a1, a2, kind = ctx.consts
        n = H.shape[0]
        k_ = lay.consts(H.dtype)
        Y, YT = k_.Y, k_.YT
        U, Mc = V[:n], V[n:]
        gw = k_.score_weights(scheme)[2]
        gM = torch.mul(gw, inside if scheme == "pairwise" else inside[:, None]).mul_(gv)
        # x̄ = z̄ σ'(x) on |x| < c, 0 beyond the cut (hardtanh_backward: one fused masking op)
        cut = _cut(H.dtype)
        gx = torch.ops.aten.sigmoid_backward(torch.mm(torch.mm(Y, gM), YT), z)
        gx = torch.ops.aten.hardtanh_backward(gx, x, -cut, cut)
        kq = -0.5 / ctx.tau  # dRq · kq = ∂Rt/∂quad
        if scheme == "pairwise":  # x = T + Tᵀ: T̄ = gx (gM symmetrized); T = (Rn ∘ S) Yᵀ
            gF = torch.mm(gx, Y)
            gS = gF * Rn  # S = g 1ᵀ − P
            gq = torch.addmm(dRq, YT, gF.mul_(S), beta=0.0, alpha=kq).mul_(dRq)  # Rn = Y Rt
            gq = gq + gq.mT  # quad = dg_k + dg_l − G − Gᵀ
            gG = torch.diag(gq.sum(1)).sub_(gq)
            gP = torch.sub(Y * gS.sum(1, keepdim=True), gS)
        else:  # S = g 1ᵀ − (P Yᵀ)ᵀ, Rn = Y Rt
            gS = gx * Rn
            gRt = torch.mv(YT, gx.mul_(S).sum(1))
            gP = torch.addmm(Y * gS.sum(1, keepdim=True), gS.mT, Y, alpha=-1.0)
            C = k_.C
            gG = (C * gRt.mul_(dRq).mul_(kq)) @ C.mT
            gP = gP @ C.mT
        gG.addmm_(YT, gP)  # P = U Z + Y G
        Wg = torch.cat([gP, gG])  # Z̄ = Uᵀ P̄ + Mcᵀ Ḡ' = Vᵀ Wg
        # A = Σ_s⁻¹ Z̄ (Z = Σ_s⁻¹ Mcᵀ, Σ_s = α I + c UᵀU) and U A, needed below; d × K
        # matrices are formed as their K × d transposes (the faster product)
        if ctx.dual:
            # Woodbury: A = Vᵀ [P̄ − c t; Ḡ'] / α, t = (α I + c Ku)⁻¹ U Z̄; with the forward's
            # Gu = U Vᵀ, U Z̄ = Gu Wg and U A = Gu [P̄ − c t; Ḡ'] / α cost no d-sized product
            if c != 0.0:
                Wg[:n].sub_(_apply_factor(kind, tuple(F), torch.mm(Gu, Wg)), alpha=c)
            Wg.div_(alpha)
            A = torch.mm(Wg.mT, V).mT
        else:
            gZ = torch.mm(Wg.mT, V).mT
            A = gZ / alpha if c == 0.0 else _apply_factor(kind, tuple(F), gZ)
        galpha = (A * Z).sum()  # −ᾱ, a 0-dim tensor (no host read)
        # α = a1‖U‖² + a2 (‖U‖² + Σ_k n_k ‖Mc_k‖²) + const; H̄ = β U + [E1 E2 E3][Z A Mcᵀ]ᵀ
        # with E1 = (I − Yn Yᵀ) P̄ − c U A + Ync Ḡ', E2 = Ync − c U Z, E3 = β₂ Ync n_k
        beta, beta2 = galpha * (-2.0 * (a1 + a2)), galpha * (-2.0 * a2)
        E1 = torch.addmm(gP, k_.Ync, gG)
        E1.addmm_(k_.Yn, torch.mm(YT, gP), alpha=-1.0)
        if c != 0.0:
            E1.addmm_(*((Gu, Wg) if ctx.dual else (U, A)), alpha=-c)  # − c U A
        E = torch.cat([E1, torch.add(k_.Ync, UZ, alpha=-c), k_.Ycnt * beta2], 1)
        gH = torch.mm(E, torch.cat([Z.mT, A.mT, Mc])).addcmul_(U, beta)
        return gH, None, None, None, None, None, None, None


def _scores(
    P: torch.Tensor, lay: _Layout, scheme: str, R: torch.Tensor, tau: float
) -> torch.Tensor:
    """Per-task S_τ: dense n × n ops when n² <= _DENSE_ELEMS (fast, O(n²) autograd memory),
    else the memory-bounded blocks of :func:`_task_scores` (autograd memory O(n) per task)."""
    if lay.n * lay.n <= _DENSE_ELEMS:
        return _dense_task_scores(P, lay, scheme, R, tau)
    return _task_scores(P, lay, scheme, _task_rates(R, lay, scheme) / tau)


# --------------------------------------------------------------------------- public API


def soft_md_lsm(
    H: Any,
    y: Any,
    tau: float = 0.5,
    *,
    scheme: str = "pairwise",
    shrinkage: float = 0.1,
    detach_directions: bool = False,
    reduce: str = "auto",
    crossfit: bool = False,
) -> torch.Tensor:
    """Soft MD-LSM of a batch: a 0-dim tensor in (0, 1), differentiable with respect to H.

    Args:
        H: features (n, d), or a map reduced by ``reduce`` (see :mod:`lsm_train.features`);
            tensor on any device or numpy array.
        y: integer class labels (n,).
        tau: temperature > 0, in units of within-class standard deviation; S_τ tends to the
            exact degree of the Fisher direction as tau -> 0.
        scheme: ``"pairwise"`` (mean over class pairs) or ``"ovr"`` (mean over class vs rest).
        shrinkage: λ in [0, 1], shrinkage of the pooled within-class covariance to
            (tr Σ / d)·I.
        detach_directions: stop the gradient through the directions ŵ; H still gets the
            gradient through the projections ŵ·h.
        reduce: how to reduce maps (N, C, H, W) / sequences (N, T, D) to (N, d).
        crossfit: 2-fold cross-fitted value (does not saturate when d >= n, see below).

    In-sample (default), S_τ saturates at 1 whenever the batch is separable, which is always
    the case when d + 1 >= n (Cover) and nearly so for d ~ n/2, even with random labels: the
    gradient then vanishes. ``crossfit=True`` alternates the samples of each class between two
    halves (in batch order), fits ŵ (means, Σ_s) on one half, scores the pairs of the other
    half, swaps and averages the two values; random labels then give about 1/2. Classes with a
    single sample are left out; with fewer than two classes of >= 2 samples the value is 1.0.

    Returns exactly 1.0 (as ``(H * 0).sum() + 1``, zero gradient) when the batch has fewer than
    two classes. See the module docstring for the math and the cost.
    """
    tau = _check_tau(tau)
    scheme = _check_scheme(scheme)
    shrinkage = _check_shrinkage(shrinkage)
    X, lohi = _features(H, reduce)
    labels, lay = _labels_and_layout(y, X.shape[0], X.device)
    fast = not crossfit and lay.K >= 2 and not detach_directions and lay.n**2 <= _DENSE_ELEMS
    if not fast:
        m = _scale(X, *torch.stack(lohi).tolist())
        X = X / m if m != 1.0 else X
        with _full_precision(X.device):
            if crossfit:
                return _soft_md_lsm_crossfit(X, lay, tau, scheme, shrinkage, detach_directions)
            return _soft_md_lsm(X, labels, tau, scheme, shrinkage, detach_directions).mean()
    grad = torch.is_grad_enabled() and X.requires_grad
    with _full_precision(X.device):
        # compute first, check after: one host read of the call fetches min and max of X
        # (finiteness, scale) with the Cholesky info, instead of a sync for each
        status: list[torch.Tensor] = []
        value = _FastSoft.apply(X, lay, scheme, shrinkage, tau, None, grad, status)
        lo, hi, *info = torch.stack([*lohi, *status]).tolist()
        m = _scale(X, lo, hi)  # raises on NaN or inf
        if m != 1.0 or any(info):  # rare: features beyond [2^-24, 2^24] or Cholesky failed:
            # redo on X / m, with _factor's synchronous LU fallback
            value = _FastSoft.apply(X / m if m != 1.0 else X, lay, scheme, shrinkage, tau,
                                    None, grad)
        return value


def _soft_md_lsm(
    X: torch.Tensor,
    labels: torch.Tensor,
    tau: float,
    scheme: str,
    shrinkage: float,
    detach_directions: bool = False,
    dual: bool | None = None,
) -> torch.Tensor:
    """Per-task S_τ (T,) on validated input (for benchmarks and per-pair details); a single
    1.0 (``(X * 0).sum() + 1``) when there are fewer than two classes. ``dual`` forces the
    solver (None: dual iff d > n)."""
    lay = _layout(labels)
    if lay.K < 2:
        return ((X * 0).sum() + 1.0).reshape(1)
    if detach_directions:  # P = Hc @ W with W (and r) constants
        _, W, R = _directions(X.detach(), lay, scheme, shrinkage, dual, need_w=True)
        P = (X - X.mean(0, keepdim=True)) @ W
        if scheme == "ovr":
            P = lay.combine(P, scheme)
        return _scores(P, lay, scheme, R, tau)
    return _soft_md_lsm_graph(X, lay, scheme, shrinkage, tau, dual)


def _soft_md_lsm_graph(
    X: torch.Tensor, lay: _Layout, scheme: str, shrinkage: float, tau: float, dual: bool | None
) -> torch.Tensor:
    """Per-task S_τ (T,) with every op recorded by autograd (the reference for _FastSoft)."""
    P, _, R = _directions(X, lay, scheme, shrinkage, dual)
    if scheme == "ovr":
        P = lay.combine(P, scheme)
    return _scores(P, lay, scheme, R, tau)


def _soft_md_lsm_crossfit(
    X: torch.Tensor,
    lay: _Layout,
    tau: float,
    scheme: str,
    shrinkage: float,
    detach_directions: bool = False,
) -> torch.Tensor:
    """2-fold cross-fitted S_τ (0-dim): fit on one half of each class, score the other."""
    labels = lay.inverse  # class indices: the same halves and layouts as the labels
    big = [k for k in range(lay.K) if lay.counts[k] >= 2]
    if len(big) < 2:
        return (X * 0).sum() + 1.0
    rank = torch.empty_like(lay.order)  # position of each sample among its class, batch order
    rank[lay.order] = torch.cat([torch.arange(c, device=X.device) for c in lay.counts])
    keep = torch.isin(lay.inverse, torch.tensor(big, device=X.device))
    values = []
    for fold in (0, 1):
        fit = keep & (rank % 2 == fold)
        ev = keep & (rank % 2 != fold)
        lay_fit, lay_ev = _Layout(labels[fit]), _Layout(labels[ev])  # the same classes
        Xf = X[fit].detach() if detach_directions else X[fit]
        _, W, R = _directions(Xf, lay_fit, scheme, shrinkage, need_w=True)
        P = (X[ev] - X[fit].mean(0, keepdim=True)) @ W  # only differences matter
        if scheme == "ovr":  # the weights of the rest's mean come from the fit half
            P = lay_fit.combine(P, scheme)
        values.append(_scores(P, lay_ev, scheme, R, tau).mean())
    return (values[0] + values[1]) / 2


def soft_pair_score(a: Any, b: Any, w: Any, tau: float = 0.5) -> torch.Tensor:
    """Logistic soft AUC of a fixed direction: mean over a∈A, b∈B of σ(w·(a − b) / τ).

    ``w`` is used as given (its scale acts like 1/τ); differentiable in A, B and w. As tau ->
    0 it tends to the Mann–Whitney AUC of the scores w·x (ties count 1/2). Returns a 0-dim
    tensor in (0, 1).
    """
    tau = check_positive(tau, "tau")
    A, B = check_pair(a, b)
    wt = to_tensor(w, "w")
    if wt.ndim == 2 and 1 in wt.shape:
        wt = wt.reshape(-1)
    if wt.ndim != 1 or wt.shape[0] != A.shape[1]:
        raise ValueError(
            f"w: expected a direction of shape ({A.shape[1]},), got shape {tuple(wt.shape)}"
        )
    if not wt.is_floating_point():
        wt = _as_float(wt)
    if not bool(torch.isfinite(wt).all()):
        raise ValueError("w: expected finite values, found NaN or inf")
    if wt.device != A.device:
        raise ValueError(
            f"w must be on the same device as A and B: w on {wt.device}, A on {A.device}"
        )
    dtype = torch.promote_types(A.dtype, wt.dtype)
    wt = wt.to(dtype)
    with _full_precision(A.device):
        pa = (A.to(dtype) @ wt) / tau
        pb = (B.to(dtype) @ wt) / tau
        step = max(1, _BLOCK_ELEMS // pb.numel())  # blocks of rows of A
        total = sum(
            _SoftCount.apply(pa[None, i : i + step], pb[None])[0]
            for i in range(0, pa.numel(), step)
        )
    return (total / (pa.numel() * pb.numel())).clamp(0.0, 1.0)
