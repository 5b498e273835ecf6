"""Muon with the Newton–Schulz iterations batched over matrices of the same shape.

``torch.optim.Muon`` orthogonalises one matrix at a time: five iterations of three small GEMMs each, so a
model with hundreds of latent matrices launches thousands of kernels per step. On SmolLM2-135M (210 latents)
that took 134 of the 263 ms of a QAT step on an H200 (benchmarks/bench_train.py, torch.profiler). Transformer
layers repeat the same few shapes, so this subclass stacks the matrices of one shape and runs the same
iteration with batched GEMMs (``torch.baddbmm``): the same arithmetic, per matrix, as ``torch.optim.Muon``
(momentum, Nesterov, bf16 Newton–Schulz with the same coefficients, decoupled weight decay, the same learning-
rate adjustment) and the same state (``momentum_buffer``), so checkpoints of either load into the other.
Only the GEMM kernels differ (batched instead of single), which may change the bf16 rounding of the
iteration; tests/test_muon.py compares the two.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor
from torch.optim._muon import _adjust_lr

# Stack at most this many elements per batched iteration: bounds the extra memory (the stacked bf16 copy and
# its Gram matrices) for large models; SmolLM2's biggest shape group (60 x 1536 x 576) is one chunk.
_MAX_STACK_ELEMS = 1 << 27


def _zeropower_batched(x: Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float) -> Tensor:
    """torch.optim._muon._zeropower_via_newtonschulz for a stack [n, rows, cols] (rows <= cols), bf16."""
    a, b, c = ns_coefficients
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)
    for _ in range(ns_steps):
        gram = torch.bmm(x, x.mT)
        update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, update, x, beta=a)
    return x


class GroupedMuon(torch.optim.Muon):
    """``torch.optim.Muon`` (same arguments, state and per-matrix math) with batched Newton–Schulz."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            if not params:
                continue
            momentum, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
            if wd:  # decoupled weight decay, before the update (as torch's Muon)
                torch._foreach_mul_(params, 1 - lr * wd)
            torch._foreach_lerp_(bufs, grads, 1 - momentum)
            updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
            # the iteration runs on the wide orientation (rows <= cols), as torch's does
            by_shape: dict[tuple, list[int]] = defaultdict(list)
            for i, p in enumerate(params):
                r, c = p.shape
                by_shape[(min(r, c), max(r, c), r > c, p.device)].append(i)
            for (r, c, transposed, _dev), idx in by_shape.items():
                per_chunk = max(1, _MAX_STACK_ELEMS // (r * c))
                for s in range(0, len(idx), per_chunk):
                    chunk = idx[s:s + per_chunk]
                    x = torch.stack([updates[i].mT if transposed else updates[i] for i in chunk]).bfloat16()
                    x = _zeropower_batched(x, group["ns_coefficients"], group["ns_steps"], group["eps"])
                    ps = [params[i] for i in chunk]
                    torch._foreach_add_(ps, list(x.mT.unbind(0)) if transposed else list(x.unbind(0)),
                                        alpha=-_adjust_lr(lr, group["adjust_lr_fn"], ps[0].shape))
        return loss
