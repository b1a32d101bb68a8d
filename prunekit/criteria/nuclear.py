"""Numerical core of the CHIP criterion: channel independence (change of nuclear norm).

CHIP (Sui et al., "CHIP: CHannel Independence-based Pruning for Compact Neural Networks",
NeurIPS 2021, Eq. 3 and Algorithm 1) reshapes one image's feature map of a layer to
``A in R^{C x N}`` (rows = channels, ``N = H*W``) and scores channel ``i`` by

    CI(i) = ||A||_*  -  ||A_{-i}||_*                                        (Eq. 3)

where ``||.||_*`` is the nuclear norm (sum of singular values) and ``A_{-i}`` is ``A`` with row
``i`` zeroed (the same non-zero singular values as deleting the row). The caller averages the
scores over images. Every function here takes ``features`` of shape ``[B, C, N]`` (trailing
dimensions beyond the third, e.g. ``[B, C, H, W]``, are flattened) and returns ``[B, C]``.

Functions
---------
``channel_independence_reference``  one SVD per (image, channel), as the CHIP reference code
                                    does (``calculate_ci.py``); loops, for tests/benchmarks.
``channel_independence_direct``     the definition batched over images: one batched nuclear
                                    norm per channel.
``channel_independence``            fast exact methods (``method=``, below); ``"auto"`` picks
                                    ``"quadrature"``, the fastest one measured on CPU for
                                    ResNet-56's shapes (benchmarks/chip_speed.py).
``round_features``                  the reference code's ``np.round(x, 4)``.

The mathematics of the fast methods
-----------------------------------
Let ``G = A A^T`` (C x C) with eigen-decomposition ``G = Q diag(lam) Q^T``; the singular values
of ``A`` are ``sqrt(lam)``, so ``||A||_* = sum_k sqrt(lam_k)``. Deleting row ``i`` of ``A``
deletes row and column ``i`` of ``G``: ``||A_{-i}||_* = sum_j sqrt(mu_j)`` with ``mu`` the
eigenvalues of the principal submatrix ``G_{-i,-i}``. With ``z_k = Q_{ik}^2`` (the squared
``i``-th components of the eigenvectors, ``sum_k z_k = 1``):

(M1) Cauchy interlacing / secular equation. ``[(G - x I)^{-1}]_{ii} = det(G_{-i,-i} - x I) /
     det(G - x I)``, so the ``mu_j`` are the roots of ``f(x) = sum_k z_k / (lam_k - x)``. ``f``
     increases between consecutive poles, so there is one root in each interval
     ``[lam_j, lam_{j+1}]`` (``lam`` ascending). A pole with ``z_k = 0`` or a repeated ``lam``
     is itself an eigenvalue of the submatrix (deflation); bisection on the closed interval
     converges to that end point automatically. Since ``lam_j <= mu_j <= lam_{j+1}``,
     ``CI(i) = sqrt(lam_1) + sum_j (lam_{j+1} - mu_j) / (sqrt(lam_{j+1}) + sqrt(mu_j)) >= 0``,
     a sum of non-negative terms.

(M2) Rank-one downdate (useful when N < C). ``A_{-i}^T A_{-i} = A^T A - a_i a_i^T``: the
     ``min(C, N)`` non-zero singular values of ``A_{-i}`` come from the eigenvalues of an N x N
     matrix. With ``A^T A = V diag(lam) V^T`` they are the roots of
     ``1 - sum_k (v_k^T a_i)^2 / (lam_k - x)``; since ``(v_k^T a_i)^2 = lam_k U_{ik}^2`` this is
     the secular equation of (M1) with the ``C - N`` zero eigenvalues of ``G`` merged into one
     pole at 0 of weight ``w0 = 1 - sum_k U_{ik}^2``. The fast methods therefore factorise the
     smaller Gram matrix (``A A^T`` if ``C <= N`` else ``A^T A``) and work with ``min(C,N)``
     (+1) poles.

(M3) Stieltjes integral (the ``"quadrature"`` method, used by ``"auto"``). From
     ``sqrt(x) = (2/pi) int_0^inf x / (x + t^2) dt`` and the Schur complement
     ``tr (H_{-i,-i})^{-1} = tr H^{-1} - (H^{-2})_{ii} / (H^{-1})_{ii}`` for ``H = G + t^2 I``:

         CI(i) = (2/pi) int_0^inf h_i(t) dt,
         h_i(t) = sum_k z_k lam_k / (lam_k + t^2)^2  /  sum_k z_k / (lam_k + t^2)
                = sum_k lam_k / (lam_k + t^2) - sum_j mu_j / (mu_j + t^2)  >= 0.

     This is an exact identity; only the one-dimensional integral is evaluated numerically.
     With ``t = e^u`` every eigenvalue contributes a bump ``(sigma/2) sech(u - log sigma)`` to
     the integrand, which is analytic in the strip ``|Im u| < pi/2``; the trapezoidal rule with
     step ``delta`` therefore has relative error ``<= 4 exp(-pi^2/delta)`` per bump (2.3e-12
     for the default ``delta = 0.35``), so ``|error| <= 5e-12 (||A||_* + ||A_{-i}||_*)``. The
     grid spans ``t in [e^-32, e^6] * sigma_max``; the part above is added in closed form from
     ``h_i(t) = G_ii/t^2 - (2 (G^2)_ii - G_ii^2)/t^4 + O(t^-6)`` (relative error ~e^-30) and
     the part below (where ``h`` is constant) as a geometric series (absolute error
     ``<~ C e^-32 sigma_max``). Cost per image: one eigen-decomposition of a ``min(C,N)``-sized
     Gram matrix plus two small matrix products ``[C, r] @ [r, M]`` (``M ~ 110`` nodes), instead
     of ``C`` SVDs. All sums are of non-negative terms, so ``CI >= 0`` holds numerically too.

(M4) ``"gram_eig"``: ``eigvalsh`` of all ``C`` principal submatrices ``G_{-i,-i}`` at once
     (shape ``[B, C, C-1, C-1]``, built with index gathers); ``"downdate"``: ``eigvalsh`` of the
     ``C`` downdated ``N x N`` matrices ``A^T A - a_i a_i^T``. Plain and exact, but ``C`` times the
     eigenvalue work of (M1)/(M3).

Accuracy. Everything is computed in float64 by default (``dtype=``). The Gram route squares
the singular values: an eigenvalue computed with absolute error ``~eps * lam_max`` gives
``sqrt`` errors of order ``sqrt(eps) sigma_max ~ 1.5e-8 sigma_max`` for (near-)zero singular
values. Methods (M1)/(M3) use one decomposition for the full matrix and all submatrices, so by
interlacing such errors do not accumulate over a zero cluster; (M4) computes them independently
and zeroes eigenvalues below ``dim * eps * lam_max``. ``factorization="svd"`` takes ``lam`` and
``Q`` from an SVD of ``A`` instead (absolute error ``eps * sigma_max``; slower on CPU). A zero
row (e.g. a channel that ReLU silenced for the whole image) gets ``CI = 0`` exactly, and
``0 <= CI(i) <= ||a_i||_2`` holds (interlacing; triangle inequality), up to rounding.
"""
from __future__ import annotations

import math

import torch

from .base import ScoreError

__all__ = [
    "METHODS",
    "FACTORIZATIONS",
    "channel_independence",
    "channel_independence_direct",
    "channel_independence_reference",
    "nuclear_norm_drop",
    "nuclear_norms",
    "round_features",
]

#: Values accepted by ``channel_independence(method=...)``.
METHODS = ("auto", "quadrature", "secular", "gram_eig", "downdate", "direct", "reference")
#: Values accepted by ``factorization=`` (how quadrature/secular get eigen-pairs).
FACTORIZATIONS = ("auto", "gram", "svd")

# Quadrature grid (method "quadrature"), in u = log(t / sigma_max).
QUAD_STEP = 0.35
QUAD_U_LOW = -32.0
QUAD_U_HIGH = 6.0

_DEFAULT_CHUNK_ELEMENTS = 1 << 20  # bound for the largest temporary of a chunk (elements)


# --------------------------------------------------------------------------- helpers
def _as_bcn(features: torch.Tensor) -> torch.Tensor:
    if not isinstance(features, torch.Tensor):
        features = torch.as_tensor(features)
    if features.dim() < 3:
        raise ValueError(f"features must have shape [B, C, N] (or [B, C, H, W]), got "
                         f"{tuple(features.shape)}")
    if features.dim() > 3:
        features = features.flatten(2)
    if features.is_complex():
        raise TypeError("features must be real")
    if not features.is_floating_point():
        features = features.to(torch.get_default_dtype())
    bad = int((~torch.isfinite(features)).sum())
    if bad:  # the SVD/eigh below would fail to converge, or return NaN, on them
        raise ScoreError(f"features hold {bad} NaN/inf value(s); channel independence needs "
                         "finite feature maps")
    return features


def _zero_rows(a: torch.Tensor) -> torch.Tensor:
    """[B, C] bool: rows that are exactly zero (their CI is exactly 0)."""
    if a.shape[-1] == 0:
        return torch.ones(a.shape[:2], dtype=torch.bool, device=a.device)
    # exact; amax/amin are vectorised reductions (vector_norm(inf) and aminmax are 4x slower)
    return (a.amax(dim=-1) == 0) & (a.amin(dim=-1) == 0)


def _chunks(total: int, per_item: int, chunk_elements: int | None):
    limit = _DEFAULT_CHUNK_ELEMENTS if chunk_elements is None else int(chunk_elements)
    step = max(1, limit // max(per_item, 1))
    for start in range(0, total, step):
        yield slice(start, min(total, start + step))


def round_features(features: torch.Tensor, decimals: int = 4, *,
                   bit_faithful: bool = False) -> torch.Tensor:
    """``np.round(features, decimals)`` as the CHIP reference code applies it before scoring.

    ``torch.round(x, decimals=d)`` computes ``nearbyint(x * 10^d) / 10^d`` (round half to even)
    in the tensor's own precision, which is what ``np.round`` does for float32/float64 arrays;
    the test suite checks bit equality. ``bit_faithful=True`` calls ``numpy.round`` itself on a
    CPU copy (for paranoia or exotic dtypes) and returns a tensor on the original device.
    """
    if bit_faithful:
        import numpy as np

        arr = features.detach().cpu().numpy()
        return torch.from_numpy(np.round(arr, decimals)).to(features.device)
    return torch.round(features, decimals=decimals)


def nuclear_norms(features: torch.Tensor, *, dtype: torch.dtype | None = torch.float64
                  ) -> torch.Tensor:
    """``[B]`` nuclear norms ``||A_b||_*`` (batched ``svdvals``)."""
    a = _as_bcn(features)
    if dtype is not None:
        a = a.to(dtype)
    if a.shape[1] == 0 or a.shape[2] == 0:
        return a.new_zeros(a.shape[0])
    return torch.linalg.svdvals(a).sum(-1)


# --------------------------------------------------------------------------- baselines
@torch.no_grad()
def channel_independence_reference(features: torch.Tensor, *,
                                   dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
    """CI by the reference code's recipe: per image and channel, ``svdvals`` of ``A`` with row
    ``i`` zeroed (``C + 1`` SVDs per image, Python loops). ``dtype=None`` keeps the input
    dtype (the CHIP code runs in float32); the default float64 serves as ground truth.

    Unlike ``calculate_ci.py`` it does not clone the whole batch for every (image, channel)
    pair, only the one matrix, so it is a lower bound on the reference code's cost.
    Returns ``[B, C]`` in the compute dtype.
    """
    a = _as_bcn(features)
    if dtype is not None:
        a = a.to(dtype)
    n_img, n_ch, _ = a.shape
    out = a.new_zeros(n_img, n_ch)
    if a.shape[2] == 0:
        return out
    for b in range(n_img):
        full = torch.linalg.svdvals(a[b]).sum()
        for i in range(n_ch):
            masked = a[b].clone()
            masked[i] = 0
            out[b, i] = full - torch.linalg.svdvals(masked).sum()
    return out


@torch.no_grad()
def channel_independence_direct(features: torch.Tensor, *,
                                dtype: torch.dtype | None = torch.float64,
                                chunk_elements: int | None = None) -> torch.Tensor:
    """CI by the definition, batched over images: for each channel ``i``,
    ``torch.linalg.matrix_norm(A with row i zeroed, ord="nuc")`` for all images at once.

    Loops over channels only (``C + 1`` batched nuclear norms); images are processed in chunks
    of at most ``chunk_elements`` elements per temporary. Returns ``[B, C]`` in the compute
    dtype (``dtype=None`` keeps the input dtype).
    """
    a = _as_bcn(features)
    if dtype is not None:
        a = a.to(dtype)
    n_img, n_ch, n_pix = a.shape
    out = a.new_zeros(n_img, n_ch)
    if n_pix == 0 or n_img == 0:
        return out
    for sl in _chunks(n_img, n_ch * n_pix, chunk_elements):
        block = a[sl]
        full = torch.linalg.matrix_norm(block, ord="nuc")
        masked = block.clone()
        for i in range(n_ch):
            saved = masked[:, i].clone()
            masked[:, i] = 0
            out[sl, i] = full - torch.linalg.matrix_norm(masked, ord="nuc")
            masked[:, i] = saved
    return out


# --------------------------------------------------------------------------- spectral factor
def _spectrum(a: torch.Tensor, factorization: str):
    """Poles and weights of the secular equation (M1)/(M2) for each image.

    Returns ``d`` ``[B, P]`` (ascending, >= 0) and ``z`` ``[B, C, P]`` (>= 0, rows sum to 1
    up to rounding) with ``P = C`` if ``C <= N`` and ``P = N + 1`` otherwise (a leading pole 0
    carrying the weight of the null space of ``A^T``). Then ``||A||_* = sum sqrt(d)`` and the
    eigenvalues of ``G_{-i,-i}`` (up to extra zeros) are the roots of
    ``sum_k z_ik / (d_k - x)``.
    """
    n_img, n_ch, n_pix = a.shape
    if factorization == "svd":
        u, s, _ = torch.linalg.svd(a, full_matrices=False)        # s descending
        lam = (s * s).flip(-1)
        z = (u * u).flip(-1)
    elif n_ch <= n_pix:
        g = a @ a.mT
        lam, q = torch.linalg.eigh(g)
        lam = lam.clamp_min(0)
        z = q * q
    else:
        m = a.mT @ a
        lam, v = torch.linalg.eigh(m)                                 # [B, N], ascending
        lam = lam.clamp_min(0)
        y = a @ v                                                      # y_ik = sigma_k U_ik
        tol = lam[:, -1:] * (n_pix * torch.finfo(a.dtype).eps)
        keep = lam > tol
        safe = torch.where(keep, lam, torch.ones_like(lam))
        z = torch.where(keep[:, None, :], (y * y) / safe[:, None, :], torch.zeros_like(y))
        lam = torch.where(keep, lam, torch.zeros_like(lam))
    if n_ch > n_pix:
        w0 = (1 - z.sum(-1, keepdim=True)).clamp_min(0)
        lam = torch.cat([lam.new_zeros(n_img, 1), lam], dim=1)
        z = torch.cat([w0, z], dim=2)
    return lam, z


# --------------------------------------------------------------------------- (M3) quadrature
def _quadrature_ci(lam: torch.Tensor, z: torch.Tensor, step: float) -> torch.Tensor:
    dtype, device = lam.dtype, lam.device
    scale = lam[:, -1].sqrt()                                          # sigma_max per image
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    n_nodes = int(math.ceil((QUAD_U_HIGH - QUAD_U_LOW) / step)) + 1
    u = QUAD_U_LOW + step * torch.arange(n_nodes, dtype=dtype, device=device)
    t = scale[:, None] * torch.exp(u)[None, :]                         # [B, M]
    s = t * t
    w = 1.0 / (lam[:, :, None] + s[:, None, :])                        # [B, P, M]
    g1 = torch.bmm(z, w)                                               # sum_k z/(lam+s)
    num = torch.bmm(z * lam[:, None, :], w * w)                        # sum_k z lam/(lam+s)^2
    f = t[:, None, :] * (num / g1)                                     # t h(t), [B, C, M]
    total = f.sum(-1)
    # below the grid: h is constant there, sum_{m<0} t_m = t_0 e^-step / (1 - e^-step)
    ratio = math.exp(-step) / (1 - math.exp(-step))
    total = total + f[..., 0] * ratio
    # above the grid: h = c1/t^2 - c2/t^4 + ..., summed over the nodes t_M e^{m step}, m >= 0
    c1 = (z * lam[:, None, :]).sum(-1)                                 # G_ii
    c2 = 2 * (z * (lam * lam)[:, None, :]).sum(-1) - c1 * c1           # 2 (G^2)_ii - G_ii^2
    t_top = (t[:, -1] * math.exp(step))[:, None]
    tail = c1 / t_top / (1 - math.exp(-step)) - c2 / t_top ** 3 / (1 - math.exp(-3 * step))
    total = total + tail.clamp_min(0)
    return total * (2.0 * step / math.pi)


# --------------------------------------------------------------------------- (M1) secular roots
def _secular_ci(lam: torch.Tensor, z: torch.Tensor, max_iter: int) -> torch.Tensor:
    """Solve all secular equations with a bracketed "middle way" iteration (rational model of
    the two neighbouring poles, quadratic step, bisection fallback), vectorised over images,
    channels and intervals; converged roots drop out of the active set."""
    n_img, n_ch, n_pole = z.shape
    dtype, device = lam.dtype, lam.device
    eps = torch.finfo(dtype).eps
    root_sqrt = lam.sqrt()
    ci = root_sqrt[:, :1].expand(n_img, n_ch).clone()                  # sqrt(lam_1)
    if n_pole == 1:
        return ci
    n_root = n_pole - 1
    # flat root index r -> (b, i, j)
    b_idx = torch.arange(n_img, device=device).repeat_interleave(n_ch * n_root)
    i_idx = torch.arange(n_ch, device=device).repeat_interleave(n_root).repeat(n_img)
    j_idx = torch.arange(n_root, device=device).repeat(n_img * n_ch)
    bi_idx = b_idx * n_ch + i_idx
    z_flat = z.reshape(n_img * n_ch, n_pole)
    lo_pole = lam[b_idx, j_idx]
    hi_pole = lam[b_idx, j_idx + 1]
    gap = hi_pole - lo_pole
    gap_right = torch.zeros_like(gap)                                  # lam_{j+1} - mu_j
    cols = torch.arange(n_pole, device=device)

    def evaluate(act, origin, tau):
        """f and the left/right partial sums at origin + tau for the active roots ``act``."""
        delta = lam[b_idx[act]] - (origin + tau)[:, None]               # lam_k - x
        left = (cols[None, :] <= j_idx[act][:, None]).to(dtype)
        term = z_flat[bi_idx[act]] / delta
        # a zero-weight pole exactly at x (deflation) gives 0/0: its term is 0
        term = torch.nan_to_num(term, nan=0.0)
        term2 = term / delta
        f = term.sum(-1)
        psi = (term * left).sum(-1)
        dsum = term2.sum(-1)
        dpsi = (term2 * left).sum(-1)
        return psi, f - psi, dpsi, (dsum - dpsi).clamp_min(0)

    act = torch.nonzero(gap > 0).squeeze(1)
    if act.numel():
        mid = lo_pole[act] + gap[act] / 2
        psi, phi, _, _ = evaluate(act, mid, torch.zeros_like(mid))
        from_left = (psi + phi) >= 0                                   # root in [lo, mid]
        origin = torch.where(from_left, lo_pole[act], hi_pole[act])
        half = gap[act] / 2
        lo = torch.where(from_left, torch.zeros_like(half), -half)    # bracket in tau
        hi = torch.where(from_left, half, torch.zeros_like(half))
        tau = (lo + hi) / 2
        left_pole = lo_pole[act] - origin                              # delta_j, delta_{j+1}
        right_pole = hi_pole[act] - origin
        g_act = gap[act]
        for _ in range(max_iter):
            psi, phi, dpsi, dphi = evaluate(act, origin, tau)
            f = psi + phi
            lo = torch.where(f <= 0, tau, lo)
            hi = torch.where(f >= 0, tau, hi)
            d_l = left_pole - tau                                      # < 0
            d_r = right_pole - tau                                     # > 0
            s_l = dpsi * d_l * d_l
            s_r = dphi * d_r * d_r
            c = f - s_l / d_l - s_r / d_r
            bb = c * (d_l + d_r) + s_l + s_r
            cc = d_l * d_r * f
            disc = (bb * bb - 4 * c * cc).clamp_min(0).sqrt()
            qq = 0.5 * (bb + torch.where(bb >= 0, disc, -disc))
            eta1 = qq / c
            eta2 = cc / qq
            ok1 = (eta1 > d_l) & (eta1 < d_r)
            eta = torch.where(ok1, eta1, eta2)
            new = tau + eta
            inside = (new > lo) & (new < hi) & torch.isfinite(new)
            new = torch.where(inside, new, (lo + hi) / 2)
            width = hi - lo
            done = (f == 0) | ((new - tau).abs() <= 2 * eps * new.abs()) \
                | (width <= 2 * eps * torch.maximum(lo.abs(), hi.abs())) \
                | (width <= eps * g_act)
            tau = torch.where(f == 0, tau, new)
            if bool(done.any()):
                fin = done
                gr = right_pole[fin] - tau[fin]
                gap_right[act[fin]] = gr.clamp(min=0).minimum(g_act[fin])
                keep = ~fin
                act, origin, tau, lo, hi = act[keep], origin[keep], tau[keep], lo[keep], hi[keep]
                left_pole, right_pole, g_act = left_pole[keep], right_pole[keep], g_act[keep]
            if act.numel() == 0:
                break
        if act.numel():                                                # max_iter reached
            gap_right[act] = (right_pole - tau).clamp(min=0).minimum(g_act)
    mu = (hi_pole - gap_right).clamp_min(0)
    denom = hi_pole.sqrt() + mu.sqrt()
    term = torch.where(denom > 0, gap_right / torch.where(denom > 0, denom, 1), 0)
    return ci + term.view(n_img, n_ch, n_root).sum(-1)


# --------------------------------------------------------------------------- (M4) eigvalsh
def _sqrt_sum(eig: torch.Tensor, tol: torch.Tensor) -> torch.Tensor:
    eig = torch.where(eig > tol, eig, torch.zeros_like(eig))
    return eig.sqrt().sum(-1)


def _gram_eig_ci(a: torch.Tensor, chunk_elements: int | None) -> torch.Tensor:
    n_img, n_ch, _ = a.shape
    g = a @ a.mT
    lam = torch.linalg.eigvalsh(g)
    tol = lam[:, -1:].clamp_min(0) * (n_ch * torch.finfo(a.dtype).eps)   # [B, 1]
    full = _sqrt_sum(lam, tol)
    out = full[:, None].expand(n_img, n_ch).clone()
    if n_ch == 1:
        return out
    off_diag = ~torch.eye(n_ch, dtype=torch.bool, device=a.device)
    idx = torch.arange(n_ch, device=a.device).expand(n_ch, n_ch)[off_diag].view(n_ch, n_ch - 1)
    for sl in _chunks(n_img, n_ch * (n_ch - 1) ** 2, chunk_elements):
        sub = g[sl][:, idx[:, :, None], idx[:, None, :]]                # [b, C, C-1, C-1]
        mu = torch.linalg.eigvalsh(sub)
        out[sl] -= _sqrt_sum(mu, tol[sl, :, None])
    return out


def _downdate_ci(a: torch.Tensor, chunk_elements: int | None) -> torch.Tensor:
    n_img, n_ch, n_pix = a.shape
    m = a.mT @ a                                                        # [B, N, N]
    lam = torch.linalg.eigvalsh(m)
    tol = lam[:, -1:].clamp_min(0) * (n_pix * torch.finfo(a.dtype).eps)
    full = _sqrt_sum(lam, tol)
    out = full[:, None].expand(n_img, n_ch).clone()
    for sl in _chunks(n_img, n_ch * n_pix * n_pix, chunk_elements):
        rows = a[sl]
        sub = m[sl][:, None] - rows[..., :, None] * rows[..., None, :]  # [b, C, N, N]
        mu = torch.linalg.eigvalsh(sub)
        out[sl] -= _sqrt_sum(mu, tol[sl, :, None])
    return out


# --------------------------------------------------------------------------- public entry point
@torch.no_grad()
def channel_independence(features: torch.Tensor, *, method: str = "auto",
                         factorization: str = "auto", dtype: torch.dtype | None = torch.float64,
                         chunk_elements: int | None = None, quad_step: float = QUAD_STEP,
                         max_iter: int = 100) -> torch.Tensor:
    """Channel independence ``CI[b, i] = ||A_b||_* - ||A_b without row i||_*`` (CHIP Eq. 3).

    Args:
        features: ``[B, C, N]`` (or ``[B, C, H, W]``) activations, one matrix per image.
        method: ``"auto"`` (= ``"quadrature"``), ``"quadrature"`` (M3), ``"secular"`` (M1/M2,
            roots of the secular equations), ``"gram_eig"`` (eigvalsh of the ``C`` principal
            submatrices of ``A A^T``), ``"downdate"`` (eigvalsh of the ``C`` matrices
            ``A^T A - a_i a_i^T``), ``"direct"`` (:func:`channel_independence_direct`) or
            ``"reference"`` (:func:`channel_independence_reference`). See the module docstring.
        factorization: how ``"quadrature"``/``"secular"`` obtain the eigen-pairs: ``"gram"``
            (``eigh`` of the smaller Gram matrix; fast) or ``"svd"`` (``svd`` of ``A``; more
            accurate for tiny singular values, slower on CPU). ``"auto"`` = ``"gram"``.
        dtype: compute dtype (default float64; ``None`` keeps the input dtype).
        chunk_elements: bound on the elements of the largest temporary per image chunk.
        quad_step: trapezoidal step in ``log t`` for ``"quadrature"`` (error ``~4e^{-pi^2/step}``).
        max_iter: iteration cap of ``"secular"``.

    Returns:
        ``[B, C]`` tensor in the compute dtype on the input's device; rows that are exactly
        zero score exactly 0.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if factorization not in FACTORIZATIONS:
        raise ValueError(f"unknown factorization {factorization!r}; choose from "
                         f"{', '.join(FACTORIZATIONS)}")
    if method == "reference":
        return channel_independence_reference(features, dtype=dtype)
    if method == "direct":
        return channel_independence_direct(features, dtype=dtype, chunk_elements=chunk_elements)
    raw = _as_bcn(features)
    dtype = raw.dtype if dtype is None else dtype
    n_img, n_ch, n_pix = raw.shape
    if n_img == 0 or n_ch == 0 or n_pix == 0:
        return raw.new_zeros(n_img, n_ch, dtype=dtype)
    if method == "auto":
        method = "quadrature"
    if factorization == "auto":
        factorization = "gram"
    if method == "gram_eig":
        out = _gram_eig_ci(raw.to(dtype), chunk_elements)
    elif method == "downdate":
        out = _downdate_ci(raw.to(dtype), chunk_elements)
    else:
        n_pole = min(n_ch, n_pix) + (1 if n_ch > n_pix else 0)
        if method == "quadrature":
            n_nodes = int(math.ceil((QUAD_U_HIGH - QUAD_U_LOW) / quad_step)) + 1
            per_image = n_pole * n_nodes + 2 * n_ch * n_nodes + n_ch * max(n_ch, n_pix)
        else:
            per_image = 2 * n_ch * (n_pole - 1) * n_pole + n_ch * max(n_ch, n_pix)
        parts = []
        for sl in _chunks(n_img, per_image, chunk_elements):
            a = raw[sl].to(dtype)                                      # convert chunk by chunk
            lam, z = _spectrum(a, factorization)
            if method == "quadrature":
                ci = _quadrature_ci(lam, z, quad_step)
            else:
                ci = _secular_ci(lam, z, max_iter)
            parts.append(ci.clamp_min(0).masked_fill(_zero_rows(a), 0))
        return torch.cat(parts)
    out = out.clamp_min(0)
    return out.masked_fill(_zero_rows(raw), 0)


#: Alias: the drop of the nuclear norm when a row is removed.
nuclear_norm_drop = channel_independence
