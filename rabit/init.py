"""Function-preserving initialisation of RaBiT layers (RaBiT §3, rabit-method.md).

1. I/O preconditioning: W' = s_out^α_out ⊙ W ⊙ s_in^α_in, with s_in the RMS of each input channel and
   s_out the RMS of ∂L/∂y of each output channel on calibration data, so the fit favours the
   channels that matter for the layer's function.
2. Iterative residual SVID: T Gauss–Seidel rounds that refit each path (sign + rank-1 fit of the
   magnitude) to what the other paths leave, keeping the best round.
3. Unscaling: g_k /= s_out^α_out, h_k /= s_in^α_in (signs do not change: s > 0).

``mode="coupled"`` (the default, for RaBiT) keeps every sign on the coupled chain
B_k = sign(W − Σ_{j<k} Ŵ_j), so the coupled forward of the initialised layer reproduces the
init's reconstruction exactly when the latent stays the pretrained W. ``mode="independent"``
refits signs freely (the paper's plain Gauss–Seidel; used for independent-latent baselines).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import is_int
from .reference import STE_VARIANTS, sign0

INIT_MODES = ("coupled", "independent")
LATENT_INITS = ("pretrained", "reconstruction")  # what the latent weight starts as


def check_init_options(who: str, init_iters: int, latent_init: str, ste: str) -> None:
    """The init settings that RabitConfig and rabit train's config both take; torch-only, so that a command line can
    check them before the compiled extension loads."""
    if not (is_int(init_iters) and init_iters >= 0):
        raise ValueError(f"{who}: init_iters must be an integer >= 0, got {init_iters!r}")
    if latent_init not in LATENT_INITS:
        raise ValueError(f"{who}: latent_init {latent_init!r} is unknown; use one of {LATENT_INITS}")
    if ste not in STE_VARIANTS:
        raise ValueError(f"{who}: ste {ste!r} is unknown; use one of {STE_VARIANTS}")


def rank1_fit(a: Tensor, iters: int = 12) -> tuple[Tensor, Tensor]:
    """g, h minimising ‖a − g hᵀ‖_F by alternating least squares (converges to the top singular pair)."""
    h = a.abs().mean(0)
    if not torch.any(h > 0):
        return torch.zeros(a.shape[0], dtype=a.dtype, device=a.device), torch.zeros_like(h)
    tiny = torch.finfo(a.dtype).tiny
    g = a @ h / (h @ h).clamp_min(tiny)
    for _ in range(iters):
        h = a.T @ g / (g @ g).clamp_min(tiny)
        g = a @ h / (h @ h).clamp_min(tiny)
    # balance the two factors so neither over- nor underflows in float16 export
    s = (g.norm() / h.norm().clamp_min(tiny)).clamp_min(tiny).sqrt() * (h.numel() / g.numel()) ** 0.25
    return g / s, h * s


def residual_svid(w: Tensor, k: int, iters: int, mode: str = "coupled") -> tuple[Tensor, Tensor, Tensor]:
    """Fit K paths to w (float32) in place of the latent's role. Returns (signs [K,out,in], g [K,out], h [K,in])."""
    if mode not in INIT_MODES:
        raise ValueError(f"rabit init: unknown mode {mode!r}; use one of {INIT_MODES}")
    signs, gs, hs = [], [], []
    r = w
    for _ in range(k):  # greedy chain: path k fits what paths < k leave
        b = sign0(r)
        g, h = rank1_fit(r.abs())
        signs.append(b), gs.append(g), hs.append(h)
        r = r - (g[:, None] * b) * h[None, :]
    best = (torch.stack(signs), torch.stack(gs), torch.stack(hs))
    best_err = r.square().sum()
    for _ in range(iters):
        for i in range(k):
            others = sum(((gs[j][:, None] * signs[j]) * hs[j][None, :] for j in range(k) if j != i),
                         torch.zeros_like(w))
            target = w - others
            if mode == "coupled":
                before = sum(((gs[j][:, None] * signs[j]) * hs[j][None, :] for j in range(i)), torch.zeros_like(w))
                signs[i] = sign0(w - before)
                gs[i], hs[i] = rank1_fit(signs[i] * target)  # B ⊙ target: the magnitude path i must supply
            else:
                signs[i] = sign0(target)
                gs[i], hs[i] = rank1_fit(target.abs())
        what = sum((gs[j][:, None] * signs[j]) * hs[j][None, :] for j in range(k))
        err = (w - what).square().sum()
        if err < best_err:
            best_err = err
            best = (torch.stack(signs), torch.stack(gs), torch.stack(hs))
    return best


def precondition_scales(s_in: Tensor | None, s_out: Tensor | None, alpha_in: float, alpha_out: float,
                        out: int, in_features: int, device) -> tuple[Tensor, Tensor]:
    """Row and column weights s_out^α_out, s_in^α_in, normalised to mean 1 (ones when stats are absent)."""

    def weight(s, alpha, n):
        if s is None or alpha == 0:
            return torch.ones(n, device=device)
        s = s.to(device=device, dtype=torch.float32)
        s = s.clamp_min(s.max() * 1e-6 + torch.finfo(torch.float32).tiny) ** alpha
        return s / s.mean()

    return weight(s_out, alpha_out, out), weight(s_in, alpha_in, in_features)


def _fit(weight: Tensor, s_in, s_out, alpha_in, alpha_out, k, iters, mode):
    """Preconditioned fit, unscaled: (signs, g, h, relative weighted error)."""
    w = weight.detach().to(torch.float32)
    if not torch.isfinite(w).all():
        raise ValueError("rabit init: the pretrained weight contains NaN or Inf")
    r_out, r_in = precondition_scales(s_in, s_out, alpha_in, alpha_out, w.shape[0], w.shape[1], w.device)
    wp = r_out[:, None] * w * r_in[None, :]
    signs, g, h = residual_svid(wp, k, iters, mode)
    what_p = sum((g[j][:, None] * signs[j]) * h[j][None, :] for j in range(k))
    rel_err = float((wp - what_p).norm() / wp.norm().clamp_min(1e-30))
    return signs, g / r_out[None, :], h / r_in[None, :], rel_err


@torch.no_grad()
def init_independent_linear(m, weight: Tensor, s_in: Tensor | None = None, s_out: Tensor | None = None,
                            alpha_in: float = 0.5, alpha_out: float = 0.5, iters: int = 5) -> float:
    """Initialise an IndependentRaBiTLinear: free Gauss–Seidel SVID, then latent_k = Ŵ_k so that
    sign(latent_k) reproduces path k's signs."""
    signs, g, h, rel_err = _fit(weight, s_in, s_out, alpha_in, alpha_out, m.k, iters, "independent")
    m.g.copy_(g)
    m.h.copy_(h)
    for k, latent in enumerate(m.latents):
        latent.copy_(((g[k][:, None] * signs[k]) * h[k][None, :]).to(latent.dtype))
    return rel_err


@torch.no_grad()
def init_rabit_linear(m, s_in: Tensor | None = None, s_out: Tensor | None = None, alpha_in: float = 0.5,
                      alpha_out: float = 0.5, iters: int = 5, mode: str = "coupled",
                      latent_init: str = "pretrained") -> float:
    """Initialise a RaBiTLinear's scales (and optionally its latent) from its current weight.

    Returns the relative weighted reconstruction error ‖W' − Ŵ'‖ / ‖W'‖ of the fit.
    """
    if latent_init not in LATENT_INITS:
        raise ValueError(f"rabit init: latent_init must be one of {LATENT_INITS}, got {latent_init!r}")
    signs, g, h, rel_err = _fit(m.weight, s_in, s_out, alpha_in, alpha_out, m.k, iters, mode)
    m.g.copy_(g)
    m.h.copy_(h)
    if latent_init == "reconstruction":
        what = sum((g[j][:, None] * signs[j]) * h[j][None, :] for j in range(m.k))
        m.weight.copy_(what.to(m.weight.dtype))
    return rel_err
