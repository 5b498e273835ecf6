"""Counter-based sampling of next tokens: the random draw of row r at sequence position t depends only on
(seed, r, t).

Why not ``torch.multinomial`` with a ``torch.Generator``: a generator's stream depends on how the rows are
batched and on the device, and a CUDA graph can only replay the default generator. Here every draw is a hash
of its coordinates, computed with integer tensor ops, so

* the same (seed, row, position) gives the same uniform number on the CPU, on CUDA and inside a captured
  CUDA graph (the HF loop and :class:`rabit.static_decode.StaticDecoder` draw the same numbers);
* a set of sequences sampled in batches of any size gets the same draws (row = index in the whole set).

The token is then the inverse CDF of softmax(logits / temperature) (optionally restricted to the top k) at
that uniform number, the same distribution ``torch.multinomial`` samples from.
"""

from __future__ import annotations

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF
# Salts that keep seeds, rows and positions in separate domains of the hash. lowbias32 maps 0 to 0, so without
# them seed 0 made the draw of (row r, position t) a symmetric function of r and t and pinned it to the smallest
# uniform at t == r.
_SEED_SALT = 0x243F6A88
_POS_SALT = 0x9E3779B9


def _mul32(x: Tensor | int, c: int) -> Tensor | int:
    """x * c mod 2^32 for x in [0, 2^32) (an int64 tensor or an int): in 16-bit halves of c, so no product passes
    2^49 (int64 overflow is undefined in C++, the kernels' language)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def mix32(x: Tensor | int) -> Tensor | int:
    """A 32-bit integer hash (``lowbias32``, Chris Wellons' hash-prospector) of x in [0, 2^32): an int64 tensor,
    or a Python int (no tensor, so no host-to-device copy per decoding step)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_keys(seed: int, rows: Tensor) -> Tensor:
    """int64 [B] keys of the rows ``rows`` (indices in the whole sampled set, < 2^32) under ``seed`` (any int >= 0)."""
    if seed < 0:
        raise ValueError(f"rabit: the sampling seed must be >= 0 (got {seed})")
    if rows.numel() and not (0 <= int(rows.min()) and int(rows.max()) <= _M32):
        raise ValueError(f"rabit: row indices must be in [0, 2^32) (got {int(rows.min())} .. {int(rows.max())})")
    s = mix32(mix32((seed & _M32) ^ _SEED_SALT) ^ ((seed >> 32) & _M32))
    return mix32(rows.to(torch.int64) ^ s)


def uniforms(keys: Tensor, pos: Tensor | int) -> Tensor:
    """float64 [B] uniform numbers in (0, 1) of the rows with ``keys`` [B] at sequence position ``pos``."""
    p = mix32(mix32(pos & _M32) ^ _POS_SALT)  # an int position stays a Python int: no device copy per step
    return (mix32(keys ^ p).to(torch.float64) + 0.5) / 2.0**32


def sample_next(logits: Tensor, keys: Tensor, pos: Tensor | int, temperature: float = 1.0,
                top_k: int | None = None) -> Tensor:
    """The next token [B] (int64) of rows with ``keys`` [B], placed at sequence position ``pos``, drawn from
    softmax(logits [B, V] / temperature), restricted to the ``top_k`` largest logits when given.

    No host synchronisation: usable inside a CUDA-graph capture (``pos`` then is a device tensor)."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # float64 CDF: 49k float32 probabilities summed in float32 would blur the rare tokens' intervals
    cdf = torch.softmax(logits, dim=-1).to(torch.float64).cumsum(-1)
    target = uniforms(keys, pos) * cdf[:, -1]
    # a token with probability 0 has an empty interval: searchsorted(right=True) never lands on it
    idx = torch.searchsorted(cdf, target[:, None], right=True)[:, 0]
    return idx.clamp_(max=logits.shape[-1] - 1)
