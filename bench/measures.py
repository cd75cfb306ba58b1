"""Side-by-side timings of the MD-LSM measures against naive references, measured in one run.

    .venv/bin/python bench/measures.py            # the sizes of issue 2
    .venv/bin/python bench/measures.py --quick    # smaller sizes, a few seconds
    .venv/bin/python bench/measures.py --device cuda --threads 2

(a) md_lsm_margin vs the exact LP test (separability_test, scipy HiGHS) at 2,000 points per
    class, d = 512, on separable data that the mean-difference / Fisher shortcuts of the LP
    test do not separate (so the LP is solved); relative error against scikit-learn's
    hard-margin SVC (2 / ||w||). Also overlapping (non-separable) clouds.
(b) layer_separability(H, y, method="degree", scheme="pairwise"), 10 classes, n = 4,096,
    d = 512, vs scoring the candidate directions (shrinkage LDA α = 1e-6, 0.1, mean
    difference) of every class pair on the materialized Minkowski differences a − b.
(c) soft_md_lsm forward + backward at n = 256, d = 2,048, 10 classes: the library (n × n dual
    when d > n) vs an inline d × d primal implementation of the same formula.

Figures are wall-clock medians (3 runs each in (a), 3 library runs and 1 reference run in
(b), 5 each in (c)); no assertion on time. ``--threads`` sets torch's intra-op threads
(default 1: on a shared machine, multi-threaded small ops wait on each other); numpy/scipy
BLAS follow it through threadpoolctl.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch
from sklearn.svm import SVC
from threadpoolctl import threadpool_limits

import lsm_train as lt
from lsm_train.measures.exact import separability_test
from lsm_train.measures.margin import md_lsm_margin


def machine() -> str:
    model, cores = "unknown CPU", os.cpu_count()
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
        if names:
            model, cores = names[0], len(names)
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (
        f"{model}, {cores} logical cores{gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, numpy {np.__version__}, torch threads "
        f"{torch.get_num_threads()}"
    )


def timed(fn, repeats: int = 1):
    """(median seconds, last result)."""
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def svc_margin(A: np.ndarray, B: np.ndarray) -> float:
    X = np.vstack([A, B])
    y = np.r_[np.ones(len(A)), -np.ones(len(B))]
    svc = SVC(kernel="linear", C=1e10, tol=1e-6).fit(X, y)
    return 2.0 / float(np.linalg.norm(svc.coef_[0]))


def separable_sets(n: int, d: int, gap: float, seed: int = 0):
    """Gaussian points on either side of a random hyperplane, a slab of half-width gap
    removed: separable, with a margin far below the spread of the classes."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(d)
    w /= np.linalg.norm(w)
    X = rng.standard_normal((8 * n, d))
    s = X @ w
    return X[s > gap][:n], X[s < -gap][:n]


# --------------------------------------------------------------------------- (a) margin


def bench_margin(n: int, d: int, device: str, rows: list) -> None:
    print(f"\n(a) md_lsm_margin vs separability_test (LP), {n} points per class, d = {d}")
    cases = [("separable, gap 0.2", *separable_sets(n, d, 0.2))]
    rng = np.random.default_rng(1)
    cases.append(("overlapping clouds", rng.standard_normal((n, d)),
                  rng.standard_normal((n, d)) + 0.05))
    for name, A, B in cases:
        ta = torch.as_tensor(A, device=device)
        tb = torch.as_tensor(B, device=device)
        t_m, res = timed(lambda: md_lsm_margin(ta, tb, return_bounds=True), 3)  # noqa: B023
        t_lp, cert = timed(lambda: separability_test(A, B), 3)  # noqa: B023
        line = (f"  {name:20s} margin {t_m * 1e3:9.1f} ms   LP {t_lp * 1e3:9.1f} ms "
                f"({cert.method})   LP / margin = {t_lp / t_m:6.1f}x   value {res.value:.6g} "
                f"[{res.lower:.6g}, {res.upper:.6g}], {res.iterations} major steps")
        err = float("nan")
        if cert.separable:
            t_svc, ref = timed(lambda: svc_margin(A, B))  # noqa: B023
            err = abs(res.value - ref) / ref
            line += f"\n  {'':20s} SVC margin {ref:.6g} ({t_svc:.1f} s): rel. error {err:.1e}"
        else:
            line += "   (LP: not separable)"
        print(line, flush=True)
        rows.append((f"(a) margin, {name}, {n}/class, d={d}", f"{t_m * 1e3:.0f} ms",
                     f"LP {t_lp * 1e3:.0f} ms", f"{t_lp / t_m:.1f}x",
                     f"rel. err vs SVC {err:.1e}" if cert.separable else "0.0 (exact)"))


# --------------------------------------------------------------------------- (b) layer


def naive_pairwise_degrees(H: torch.Tensor, y: torch.Tensor, chunk_elems: int = 2**24):
    """The candidate-direction degrees of every class pair, each AUC computed on the
    materialized Minkowski differences a − b (chunks of rows of A at a time)."""
    H = H.double()
    classes = torch.unique(y).tolist()
    n, d = H.shape
    means = torch.stack([H[y == c].mean(0) for c in classes])
    U = H - means[torch.searchsorted(torch.tensor(classes, device=H.device), y)]
    cov = U.T @ U / max(n - len(classes), 1)
    eye = torch.eye(d, dtype=H.dtype, device=H.device)
    v = torch.trace(cov) / d
    solves = [torch.linalg.solve((1 - a) * cov + (a * v + 1e-12) * eye, means.T)
              for a in (1e-6, 0.1, 1.0)]
    values = []
    for i in range(len(classes)):
        for j in range(i + 1, len(classes)):
            A, B = H[y == classes[i]], H[y == classes[j]]
            W = torch.stack([s[:, i] - s[:, j] for s in solves], 1)  # d × 3 candidates
            pos = torch.zeros(3, dtype=H.dtype, device=H.device)
            step = max(1, chunk_elems // (B.shape[0] * d))
            for k in range(0, A.shape[0], step):
                D = A[k : k + step, None, :] - B[None, :, :]  # the Minkowski differences
                P = D.reshape(-1, d) @ W
                pos += (P > 0).sum(0) + 0.5 * (P == 0).sum(0)
            auc = pos / (A.shape[0] * B.shape[0])
            values.append(float(torch.maximum(auc, 1 - auc).max()))
    return float(np.mean(values))


def bench_layer(n: int, d: int, k: int, device: str, repeats: int, rows: list) -> None:
    print(f"\n(b) layer_separability(degree, pairwise), {k} classes, n = {n}, d = {d}")
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % k
    centres = torch.randn(k, d, generator=g, dtype=torch.float64) * 0.08
    H = (torch.randn(n, d, generator=g, dtype=torch.float64) + centres[y]).to(device)
    y = y.to(device)
    t_fast, score = timed(lambda: lt.layer_separability(H, y, method="degree",
                                                        scheme="pairwise"), repeats)
    t_cand, cand = timed(lambda: lt.layer_separability(H, y, method="degree",
                                                      scheme="pairwise", max_iter=0), repeats)
    t_naive, naive = timed(lambda: naive_pairwise_degrees(H, y))
    print(f"  layer_separability {t_fast * 1e3:10.1f} ms   score {score:.4f} "
          "(candidates + ascent, exact AUC by sorting)")
    print(f"    max_iter=0       {t_cand * 1e3:10.1f} ms   score {cand:.4f} "
          "(candidates only: the same computation as the reference)")
    print(f"  materialized a - b {t_naive * 1e3:10.1f} ms   score {naive:.4f} "
          "(candidates only, AUC over all differences)")
    print(f"  ratio {t_naive / t_fast:.0f}x (default), {t_naive / t_cand:.0f}x (same computation)",
          flush=True)
    rows.append((f"(b) layer degree, pairwise, {k} classes, n={n}, d={d}",
                 f"{t_fast * 1e3:.0f} ms", f"materialized {t_naive * 1e3:.0f} ms",
                 f"{t_naive / t_fast:.0f}x", f"score {score:.4f} vs {naive:.4f}"))
    rows.append((f"(b) same, candidates only (max_iter=0), n={n}, d={d}",
                 f"{t_cand * 1e3:.0f} ms", f"materialized {t_naive * 1e3:.0f} ms",
                 f"{t_naive / t_cand:.0f}x", f"score {cand:.4f} vs {naive:.4f}"))


# --------------------------------------------------------------------------- (c) soft


def soft_primal(H: torch.Tensor, y: torch.Tensor, tau: float = 0.5, shrinkage: float = 0.1):
    """S_τ of docs/math.md#soft-md-lsm written directly: d × d pooled within-class
    covariance, shrunk, a d × d Cholesky solve per batch, logistic over all cross-class
    pairs, mean over pairs."""
    classes = torch.unique(y)
    n, d = H.shape
    Xs = H / H.detach().abs().amax()
    Hc = Xs - Xs.mean(0)
    X = Hc / torch.sqrt(Hc.pow(2).sum() / (n * d))
    onehot = (y[:, None] == classes[None, :]).to(X.dtype)
    Mu = (X.T @ onehot) / onehot.sum(0)
    U = X - onehot @ Mu.T
    m = max(n - len(classes), 1)
    S = (1 - shrinkage) * (U.T @ U) / m
    alpha = shrinkage * U.pow(2).sum() / (m * d) + 1e-6
    S = S + alpha * torch.eye(d, dtype=X.dtype, device=X.device)
    L = torch.linalg.cholesky(S)
    Z = torch.cholesky_solve(Mu, L)  # Σ_s⁻¹ μ_k, d × K
    total, pairs = 0.0, 0
    for i in range(len(classes)):
        for j in range(i + 1, len(classes)):
            w = Z[:, i] - Z[:, j]
            w = w * torch.rsqrt((Mu[:, i] - Mu[:, j]) @ w)  # ŵᵀ Σ_s ŵ = 1
            pa, pb = X[y == classes[i]] @ w, X[y == classes[j]] @ w
            total = total + torch.sigmoid((pa[:, None] - pb[None, :]) / tau).mean()
            pairs += 1
    return total / pairs


def bench_soft(n: int, d: int, k: int, device: str, repeats: int, rows: list) -> None:
    print(f"\n(c) soft_md_lsm forward + backward, n = {n}, d = {d}, {k} classes, tau = 20")
    g = torch.Generator().manual_seed(0)
    y = (torch.arange(n) % k).to(device)
    centres = torch.randn(k, d, generator=g).to(device) * 0.05  # weak class structure
    base = torch.randn(n, d, generator=g).to(device) + centres[y]

    def run(fn):
        H = base.clone().requires_grad_(True)
        val = fn(H, y)
        val.backward()
        return float(val.detach()), H.grad

    tau = 20.0  # in-sample, d > n: every pair is separable, tau = 0.5 saturates at 1.0
    t_dual, (v_dual, g_dual) = timed(lambda: run(lambda H, y: lt.soft_md_lsm(H, y, tau)), repeats)
    t_primal, (v_primal, g_primal) = timed(lambda: run(lambda H, y: soft_primal(H, y, tau)),
                                           repeats)
    gerr = float((g_dual - g_primal).norm() / g_primal.norm().clamp_min(1e-30))
    print(f"  soft_md_lsm (dual) {t_dual * 1e3:9.1f} ms   value {v_dual:.6f}")
    print(f"  d x d primal       {t_primal * 1e3:9.1f} ms   value {v_primal:.6f} "
          f"(|diff| {abs(v_dual - v_primal):.1e}, gradient rel. diff {gerr:.1e})")
    print(f"  ratio {t_primal / t_dual:.1f}x", flush=True)
    rows.append((f"(c) soft_md_lsm fwd+bwd, n={n}, d={d}, {k} classes",
                 f"{t_dual * 1e3:.0f} ms", f"d×d primal {t_primal * 1e3:.0f} ms",
                 f"{t_primal / t_dual:.1f}x", f"value {v_dual:.4f} vs {v_primal:.4f}"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes (seconds)")
    p.add_argument("--threads", type=int, default=1, help="torch / BLAS threads (default 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--only", default="abc", help="which parts to run, e.g. 'bc'")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print("machine:", machine())
    print(f"device: {args.device}, sizes: {'quick' if args.quick else 'full'}")
    rows: list = []
    q = args.quick
    with threadpool_limits(limits=args.threads):
        if "a" in args.only:
            bench_margin(400 if q else 2000, 64 if q else 512, args.device, rows)
        if "b" in args.only:
            bench_layer(1024 if q else 4096, 128 if q else 512, 10, args.device, 3, rows)
        if "c" in args.only:
            bench_soft(128 if q else 256, 512 if q else 2048, 10, args.device, 5, rows)
    print("\n| benchmark | lsm_train | reference | speed-up | check |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
