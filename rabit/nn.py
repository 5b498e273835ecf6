"""RaBiT layers: the QAT form (one latent weight, trainable scales) and the packed inference form."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import is_int
from ._ops import packed_linear, qat_linear, residual_binarize
from .reference import STE_VARIANTS, words_per_row
from .runtime.format import MAX_K


def _check_dims(who: str, in_features, out_features, k) -> None:
    for name, v in (("in_features", in_features), ("out_features", out_features)):
        if not is_int(v) or v < 1:
            raise ValueError(f"{who}: {name} must be an integer >= 1, got {v!r}")
    if not is_int(k) or not 1 <= k <= MAX_K:
        raise ValueError(f"{who}: k={k!r} paths is not supported; use an integer in 1..{MAX_K}")


def _check_linear(op: str, linear) -> None:
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"{op}: expected a torch.nn.Linear, got {type(linear).__name__}; rabit only converts "
                        "nn.Linear modules (exclude this one or convert it to nn.Linear first)")


def _gemm_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the layer's GEMM for input x: autocast's where it is on for x's device, else x's own. A device
    autocast does not know (meta: shape inference) has no autocast state; torch raises when asked for it."""
    try:
        on = torch.is_autocast_enabled(x.device.type)
    except RuntimeError:
        return x.dtype
    return torch.get_autocast_dtype(x.device.type) if on else x.dtype


class RaBiTLinear(nn.Module):
    """QAT form of a RaBiT layer: ``y = x Ŵᵀ + b`` with Ŵ from the coupled residual chain.

    Parameters: ``weight`` (the one shared latent, ``[out, in]``), ``g`` ``[K, out]``, ``h`` ``[K, in]``,
    optional ``bias``. Every forward re-derives B_1 = sign(W), B_{k+1} = sign(W − Σ_{j≤k} Ŵ_j) in the
    fused ``rabit.residual_binarize`` op; its backward passes ∂L/∂Ŵ to W by a straight-through
    estimator and gives g, h their exact gradients. The forward runs as one op (``rabit.qat_linear``) that
    keeps no Ŵ for the backward: the layer's activation memory is that of an ``nn.Linear``.
    """

    is_rabit_latent = True  # lets trainers route `weight` to the latent-weight optimizer
    # NaN/Inf in the latent or the scales raise in forward (one device sync per call on CUDA); the trainer
    # sets this False while it trains, since it checks the loss and gradient norm every step anyway.
    check_finite = True

    def __init__(self, in_features: int, out_features: int, k: int = 2, bias: bool = True,
                 ste: str = "identity", ste_param: float = 1.0, device=None, dtype=None):
        super().__init__()
        _check_dims("RaBiTLinear", in_features, out_features, k)
        if ste not in STE_VARIANTS:
            raise ValueError(f"RaBiTLinear: unknown ste {ste!r}; use one of {STE_VARIANTS}")
        self.in_features, self.out_features, self.k = in_features, out_features, k
        self.ste, self.ste_param = ste, float(ste_param)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        # scales stay float32 even for a bf16 latent: they are few and precision-sensitive
        self.g = nn.Parameter(torch.ones(k, out_features, device=device, dtype=torch.float32))
        self.h = nn.Parameter(torch.ones(k, in_features, device=device, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    @classmethod
    def from_linear(cls, linear: nn.Linear, k: int = 2, ste: str = "identity", ste_param: float = 1.0) -> "RaBiTLinear":
        """A RaBiTLinear whose latent is the linear's weight, with scales of ones (call an init next)."""
        _check_linear("RaBiTLinear.from_linear", linear)
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, k=k, bias=linear.bias is not None, ste=ste,
                ste_param=ste_param, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            m.weight.copy_(w)
            if linear.bias is not None:
                m.bias.copy_(linear.bias)
        return m

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """Ŵ as a dense matrix (differentiable)."""
        what, _ = residual_binarize(self.weight, self.g, self.h, dtype, self.ste, self.ste_param,
                                    self.check_finite)
        return what

    def forward(self, x: Tensor) -> Tensor:
        dtype = _gemm_dtype(x)  # under autocast, Ŵ is built directly in the GEMM's dtype
        bias = self.bias.to(dtype) if self.bias is not None else None
        # one op: Ŵ is built in the GEMM's dtype and not kept for the backward (rabit.qat_linear)
        return qat_linear(x.to(dtype), self.weight.contiguous(), self.g, self.h, bias, self.ste, self.ste_param,
                          self.check_finite)

    @torch.no_grad()
    def packed_signs(self) -> Tensor:
        """The K sign planes the forward uses right now, ``[K, out, words]`` int32."""
        _, packed = residual_binarize(self.weight.contiguous(), self.g, self.h)
        return packed

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, "
                f"bias={self.bias is not None}, ste={self.ste!r}")


class IndependentRaBiTLinear(nn.Module):
    """Baseline: "standard" residual-binary QAT with one latent weight PER PATH (DB-LLM style).

    Path k is ``g_k ⊙ sign(W_k) ⊙ h_k`` with its own latent W_k; the paths are not coupled, so nothing
    makes path 2 correct path 1 — the inter-path adaptation RaBiT removes. Same packed format and
    inference kernels as RaBiTLinear; K latents, so K times the latent optimizer state.
    """

    is_rabit_latent = True
    check_finite = True  # as RaBiTLinear.check_finite

    def __init__(self, in_features: int, out_features: int, k: int = 2, bias: bool = True,
                 ste: str = "identity", ste_param: float = 1.0, device=None, dtype=None):
        super().__init__()
        _check_dims("IndependentRaBiTLinear", in_features, out_features, k)
        self.in_features, self.out_features, self.k = in_features, out_features, k
        self.ste, self.ste_param = ste, float(ste_param)
        self.latents = nn.ParameterList(
            [nn.Parameter(torch.zeros(out_features, in_features, device=device, dtype=dtype)) for _ in range(k)])
        self.g = nn.Parameter(torch.ones(k, out_features, device=device, dtype=torch.float32))
        self.h = nn.Parameter(torch.ones(k, in_features, device=device, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, k: int = 2, ste: str = "identity",
                    ste_param: float = 1.0) -> "IndependentRaBiTLinear":
        _check_linear("IndependentRaBiTLinear.from_linear", linear)
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, k=k, bias=linear.bias is not None, ste=ste,
                ste_param=ste_param, device=w.device, dtype=w.dtype)
        if linear.bias is not None:
            with torch.no_grad():
                m.bias.copy_(linear.bias)
        return m

    def rabit_latents(self) -> list[nn.Parameter]:
        return list(self.latents)

    def _paths(self, dtype=None):
        for k, w in enumerate(self.latents):
            yield residual_binarize(w.contiguous(), self.g[k:k + 1], self.h[k:k + 1], dtype, self.ste,
                                    self.ste_param, self.check_finite)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return sum(what for what, _ in self._paths(dtype))

    def forward(self, x: Tensor) -> Tensor:
        dtype = _gemm_dtype(x)
        bias = self.bias.to(dtype) if self.bias is not None else None
        return F.linear(x.to(dtype), self.dequantize(dtype), bias)

    @torch.no_grad()
    def packed_signs(self) -> Tensor:
        return torch.cat([packed for _, packed in self._paths()])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, "
                f"bias={self.bias is not None}, independent latents")


def _fits(src: Tensor, dst: Tensor) -> bool:
    """Whether ``dst`` (``src`` [K, n] cast) is finite and no path's vector lies wholly below the normal range (its
    largest value a subnormal or 0, as if the path were cut). Single small values may flush: their products are
    negligible beside the path's largest."""
    peak = src.abs().amax(1)
    return bool(torch.isfinite(dst).all()) and not bool(((peak != 0) & (peak < torch.finfo(dst.dtype).tiny)).any())


def _scales_in(g: Tensor, h: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """g [K, out] and h [K, in] cast to ``dtype``. A layer computes g_k ⊙ B_k ⊙ h_k, so where a scale vector does not
    fit ``dtype`` (float16: a value above 65504, or the whole vector below 6.1e-5) a power of two per path moves from
    one vector to the other, which keeps every product g_k[o]·h_k[i] exact; an error if that cannot fit them either.
    Scales that fit are cast unchanged."""
    gd, hd = g.to(dtype), h.to(dtype)
    if _fits(g, gd) and _fits(h, hd):
        return gd, hd
    g32, h32 = g.float(), h.float()
    tiny = torch.finfo(torch.float32).tiny
    gmax = g32.abs().amax(1, keepdim=True).clamp_min(tiny)
    hmax = h32.abs().amax(1, keepdim=True).clamp_min(tiny)
    c = torch.exp2(torch.round(0.5 * torch.log2(hmax / gmax)))  # both maxima near sqrt(gmax·hmax)
    g32, h32 = g32 * c, h32 / c
    gd, hd = g32.to(dtype), h32.to(dtype)
    if _fits(g32, gd) and _fits(h32, hd):
        return gd, hd
    raise ValueError(f"PackedRaBiTLinear.from_rabit_linear: the scales span more than {dtype} can hold (|g| from "
                     f"{g.abs().min().item():.3g} to {g.abs().max().item():.3g}, |h| from {h.abs().min().item():.3g} to "
                     f"{h.abs().max().item():.3g}); the layer's training likely diverged")


class PackedRaBiTLinear(nn.Module):
    """Inference form: packed sign planes + scales, no latent weight; ``y = Σ_k g_k ⊙ (B_k (h_k ⊙ x)) + b``.

    Buffers: ``packed`` ``[K, out, ceil(in/32)]`` int32, ``g`` ``[K, out]`` and ``h`` ``[K, in]`` (float16 by
    default, the export format), optional ``bias``.
    """

    def __init__(self, in_features: int, out_features: int, k: int = 2, bias: bool = True,
                 scale_dtype: torch.dtype = torch.float16, bias_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        _check_dims("PackedRaBiTLinear", in_features, out_features, k)
        self.in_features, self.out_features, self.k = in_features, out_features, k
        self.register_buffer("packed", torch.zeros(k, out_features, words_per_row(in_features), dtype=torch.int32,
                                                   device=device))
        self.register_buffer("g", torch.ones(k, out_features, dtype=scale_dtype, device=device))
        self.register_buffer("h", torch.ones(k, in_features, dtype=scale_dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_rabit_linear(cls, m: RaBiTLinear, scale_dtype: torch.dtype = torch.float16) -> "PackedRaBiTLinear":
        """Freeze the signs the QAT layer uses now and keep its scales in ``scale_dtype``."""
        if not isinstance(m, QAT_LAYERS):
            raise TypeError(f"PackedRaBiTLinear.from_rabit_linear: expected a RaBiTLinear, got {type(m).__name__}")
        p = cls(m.in_features, m.out_features, k=m.k, bias=m.bias is not None, scale_dtype=scale_dtype,
                bias_dtype=m.bias.dtype if m.bias is not None else torch.float32, device=m.g.device)
        p.packed.copy_(m.packed_signs())
        for name in ("g", "h"):
            if not torch.isfinite(getattr(m, name)).all():
                raise ValueError(f"PackedRaBiTLinear.from_rabit_linear: {name} contains NaN or Inf")
        g, h = _scales_in(m.g.detach(), m.h.detach(), scale_dtype)
        p.g.copy_(g)
        p.h.copy_(h)
        if m.bias is not None:
            p.bias.copy_(m.bias)
        return p

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"PackedRaBiTLinear: input has {x.shape[-1]} features but the layer expects "
                             f"{self.in_features}")
        lead = x.shape[:-1]
        y = packed_linear(x.reshape(-1, self.in_features).contiguous(), self.packed, self.g, self.h, self.bias)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, "
                f"bias={self.bias is not None}, scales={self.g.dtype}")


QAT_LAYERS = (RaBiTLinear, IndependentRaBiTLinear)
