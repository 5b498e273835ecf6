"""The path-freezing baseline (rabit-method.md §7, baseline 3): train path 1 alone, freeze it, then fit
path 2 to the residual it leaves and train path 2 alone.

Stage 1 is 1-bit QAT (``RaBiTLinear`` with K = 1). :func:`add_residual_path_` then turns each of those
layers into an ``IndependentRaBiTLinear`` with K = 2 whose path 1 is the trained one, frozen (its latent
has ``requires_grad=False``; gradient hooks zero the updates of its scales g[0], h[0]) and whose path 2
starts as the sign and rank-1 magnitude fit of the weight residual R = W_fp − Ŵ1 (latent_2 = R, so
sign(latent_2) is the fitted sign). Stage 2 trains path 2 against the frozen path 1: unlike RaBiT, the
paths never adapt to each other during training.
"""

from __future__ import annotations

import torch
from torch import nn

from .init import rank1_fit
from .quantize import _set_submodule
from .nn import IndependentRaBiTLinear, RaBiTLinear


def _frozen_row_hook(param: torch.Tensor):
    """A gradient hook zeroing row 0 (path 1) of param's gradient. The mask is built once; `.to` is a no-op while
    the gradient stays on the mask's device and dtype, and follows the model if it is moved later."""
    mask = torch.ones(param.shape[0], 1, device=param.device, dtype=param.dtype)
    mask[0] = 0.0

    def hook(grad):
        return grad * mask.to(grad.device, grad.dtype)

    return hook


@torch.no_grad()
def add_residual_path_(student: nn.Module, teacher: nn.Module) -> int:
    """Stage 2 of path freezing, in place: every K = 1 ``RaBiTLinear`` of ``student`` becomes a K = 2
    ``IndependentRaBiTLinear`` (path 1 frozen, path 2 fitted to the residual of the teacher's weight of the
    same name). Returns the number of layers converted."""
    names = [n for n, m in student.named_modules() if isinstance(m, RaBiTLinear)]
    if not names:
        raise ValueError("rabit path freezing: the student has no RaBiTLinear layers; quantize it with k=1 first")
    for name in names:
        m = student.get_submodule(name)
        if m.k != 1:
            raise ValueError(f"rabit path freezing: {name} has k={m.k}; stage 1 must train a single path (k=1)")
        w = teacher.get_submodule(name).weight.detach().float()
        what1 = m.dequantize(torch.float32)
        r = w - what1
        g2, h2 = rank1_fit(r.abs())
        new = IndependentRaBiTLinear(m.in_features, m.out_features, k=2, bias=m.bias is not None, ste=m.ste,
                                     ste_param=m.ste_param, device=m.weight.device, dtype=m.weight.dtype)
        new.latents[0].copy_(m.weight)
        new.latents[0].requires_grad_(False)
        new.latents[1].copy_(r.to(m.weight.dtype))
        new.g.copy_(torch.stack([m.g[0], g2]))
        new.h.copy_(torch.stack([m.h[0], h2]))
        new.g.register_hook(_frozen_row_hook(new.g))
        new.h.register_hook(_frozen_row_hook(new.h))
        if m.bias is not None:
            new.bias.copy_(m.bias)
        _set_submodule(student, name, new)
    return len(names)
