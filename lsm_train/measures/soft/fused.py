"""The fused in-sample soft MD-LSM of a small batch: one autograd node with a hand-written
adjoint backward, the CPU default (docs/loss.md). Tested against :mod:`.reference`.

At training batch sizes the per-op overhead, not the arithmetic, is the cost, so the forward
runs the arithmetic of :func:`.reference.directions` + :func:`.reference.dense_task_scores`
without recording a graph (about 80 ops instead of ~200 recorded ones) and the backward
reuses the factorization and the forward's n × n intermediates.
"""

from __future__ import annotations

import math

import torch

from lsm_train.measures.soft.counts import cut
from lsm_train.measures.soft.linalg import apply_factor, fast_factor
from lsm_train.measures.soft.options import RIDGE
from lsm_train.measures.soft.reference import soft_md_lsm_graph


class FusedSoft(torch.autograd.Function):
    """In-sample S_τ (mean over tasks) of a small batch (n² <= DENSE_ELEMS) as one autograd
    node: the arithmetic of :func:`directions` + :func:`dense_task_scores`, run without
    recording a graph, and a hand-written adjoint backward that reuses the factorization and
    the forward's n × n intermediates. About 80 tensor ops in all instead of ~200 recorded
    ones: at training batch sizes the per-op overhead, not the arithmetic, is what costs.
    α and ᾱ stay 0-dim tensors on the device and nothing is read to the host: with a list
    ``status``, the Cholesky ``info`` is appended to it unread (the caller checks it with
    its own reads, in one sync); without, :func:`factor` checks it at once.

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
        a1, a2 = shrinkage / (m * d), RIDGE / (n * d)
        if dual:
            Gm = torch.mm(V, V.mT)
            Gu, MM = Gm[:n], Gm[n:, n:]  # Gu = U Vᵀ = [Ku B]
            Ku, B = Gu[:, :n], Gu[:, n:]
            alpha = torch.dot(Gm.diagonal(), k_.alpha_weights(a1, a2))
        else:
            MM = torch.mm(Mc, Mc.mT)
            ssu = torch.dot(U.reshape(-1), U.reshape(-1))
            alpha = torch.dot(MM.diagonal(), k_.alpha_weights(a1, a2)[n:]).add_(ssu, alpha=a1 + a2)
        alpha.add_(RIDGE * eps**2)
        kind, F, Z = "scalar", (), None
        if dual:
            if c == 0.0:
                Sol = B / alpha
            else:
                Gd = Ku * c
                Gd.diagonal().add_(alpha)
                kind, F = fast_factor(Gd, status)
                Sol = apply_factor(kind, F, B)
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
                kind, F = fast_factor(Sg, status)
                Z = apply_factor(kind, F, Mc.mT.contiguous())
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
        # dense soft count (as dense_task_scores)
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
        lim = cut(dtype)
        x.clamp_(-lim, lim)  # in place: hardtanh_backward below masks |x| >= c all the same
        z = torch.sigmoid(x)
        ip, w, _ = k_.score_weights(scheme)
        raw = torch.mm(YT, torch.mm(z, Y)).mul_(ip)  # per-task sums / pairs
        if not pairwise:
            raw = raw.sum(1)
        raw.sub_(1.0 / (1.0 + math.exp(lim)))  # − σ(−c): f = σ(clip(x)) − σ(−c)
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
                v = soft_md_lsm_graph(H, lay, scheme, ctx.shrinkage, ctx.tau, ctx.dual).mean()
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
        lim = cut(H.dtype)
        gx = torch.ops.aten.sigmoid_backward(torch.mm(torch.mm(Y, gM), YT), z)
        gx = torch.ops.aten.hardtanh_backward(gx, x, -lim, lim)
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
                Wg[:n].sub_(apply_factor(kind, tuple(F), torch.mm(Gu, Wg)), alpha=c)
            Wg.div_(alpha)
            A = torch.mm(Wg.mT, V).mT
        else:
            gZ = torch.mm(Wg.mT, V).mT
            A = gZ / alpha if c == 0.0 else apply_factor(kind, tuple(F), gZ)
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

