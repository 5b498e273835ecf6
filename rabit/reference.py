"""The RaBiT math in plain PyTorch: the specification every kernel is tested against.

Nothing here is fast; everything here is meant to be read next to the paper
(RaBiT, arXiv 2602.05367) and ``kernels/rabit_format.h``.

Notation: a layer has latent weight ``W [out, in]`` and K binary paths with row scales
``g [K, out]`` and column scales ``h [K, in]``. Path k is ``g_k ⊙ B_k ⊙ h_k`` with ``B_k`` in {±1}.

The forward is the *coupled* residual chain::

    R_0 = W
    B_k = sign(R_{k-1})            (sign(0) = +1)
    R_k = R_{k-1} - g_k ⊙ B_k ⊙ h_k
    Ŵ   = Σ_k g_k ⊙ B_k ⊙ h_k

All arithmetic is float32 in exactly this order (``(g*B)*h``, no fused multiply-add), so that the
C and CUDA kernels reproduce the signs bit for bit.
"""

from __future__ import annotations

import torch

WORD_BITS = 32
FORMAT_VERSION = 1
STE_VARIANTS = ("identity", "clipped", "tanh")


def words_per_row(in_features: int) -> int:
    return (in_features + WORD_BITS - 1) // WORD_BITS


def sign0(x: torch.Tensor) -> torch.Tensor:
    """sign with sign(0) = +1, as float32 ±1."""
    return torch.where(x >= 0, 1.0, -1.0).to(torch.float32)


def residual_signs(weight: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The K sign planes ``[K, out, in]`` (float32 ±1) of the coupled residual chain."""
    r = weight.to(torch.float32)
    g = g.to(torch.float32)
    h = h.to(torch.float32)
    signs = []
    for k in range(g.shape[0]):
        b = sign0(r)
        signs.append(b)
        r = r - (g[k][:, None] * b) * h[k][None, :]
    return torch.stack(signs)


def dequantize(signs: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Ŵ = Σ_k g_k ⊙ B_k ⊙ h_k in float32, summed in path order."""
    g = g.to(torch.float32)
    h = h.to(torch.float32)
    what = (g[0][:, None] * signs[0]) * h[0][None, :]
    for k in range(1, signs.shape[0]):
        what = what + (g[k][:, None] * signs[k]) * h[k][None, :]
    return what


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """Pack a ``[..., in]`` tensor of signs into int32 words (bit=1 ⇔ value >= 0)."""
    in_features = signs.shape[-1]
    nw = words_per_row(in_features)
    bits = (signs >= 0).to(torch.int64)
    pad = nw * WORD_BITS - in_features
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    bits = bits.reshape(*signs.shape[:-1], nw, WORD_BITS)
    weights = torch.bitwise_left_shift(
        torch.ones(WORD_BITS, dtype=torch.int64, device=signs.device),
        torch.arange(WORD_BITS, device=signs.device),
    )
    words = (bits * weights).sum(-1)  # 0 .. 2**32 - 1 in int64
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as int32
    return words.to(torch.int32)


def unpack_signs(packed: torch.Tensor, in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: ``[..., words]`` int32 → ``[..., in_features]`` of ±1."""
    shifts = torch.arange(WORD_BITS, dtype=torch.int64, device=packed.device)
    words = packed.to(torch.int64) & 0xFFFFFFFF
    bits = (words[..., None] >> shifts) & 1
    bits = bits.reshape(*packed.shape[:-1], -1)[..., :in_features]
    return torch.where(bits == 1, 1.0, -1.0).to(dtype)


def residual_binarize(weight, g, h, out_dtype=None):
    """Forward of one QAT step: returns ``(Ŵ, packed)``.

    Ŵ has ``out_dtype`` (default: the weight's dtype); packed is ``[K, out, words]`` int32.
    """
    signs = residual_signs(weight, g, h)
    what = dequantize(signs, g, h).to(out_dtype or weight.dtype)
    return what, pack_signs(signs)


def ste_factor(weight: torch.Tensor, ste: str, ste_param: float) -> torch.Tensor:
    """d(latent)/d(Ŵ) surrogate of the straight-through estimator, float32.

    identity: 1.   clipped: 1[|w| <= c].   tanh: 1 - tanh(w / c)^2 (a smooth window of width c).
    """
    w = weight.to(torch.float32)
    if ste == "identity":
        return torch.ones_like(w)
    if ste == "clipped":
        return (w.abs() <= ste_param).to(torch.float32)
    if ste == "tanh":
        t = torch.tanh(w / ste_param)
        return 1.0 - t * t
    raise ValueError(f"rabit: unknown ste {ste!r}; expected one of {STE_VARIANTS}")


def residual_binarize_backward(grad, weight, g, h, packed, ste="identity", ste_param=1.0,
                               compute_dtype=torch.float32):
    """Backward of :func:`residual_binarize` w.r.t. (weight, g, h) for G = ∂L/∂Ŵ.

    dW = G ⊙ ste_factor(W); dg_k = (G ⊙ B_k) h_k; dh_k = (G ⊙ B_k)ᵀ g_k, with B held constant.
    dW has the weight's dtype; dg, dh have g's and h's. ``compute_dtype=torch.float64`` gives the
    high-precision oracle the tests measure errors against.
    """
    dg, dh = scale_grads(grad, g, h, packed, compute_dtype)
    dw = (grad.float() * ste_factor(weight, ste, ste_param)).to(weight.dtype)
    return dw, dg, dh


def scale_grads(grad, g, h, packed, compute_dtype=torch.float32):
    """dg_k = (G ⊙ B_k) h_k and dh_k = (G ⊙ B_k)ᵀ g_k for G = ``grad`` = ∂L/∂Ŵ, B held constant: the scale part of
    :func:`residual_binarize_backward` (with the identity STE and a float32 weight, its dW is G itself).
    dg, dh have g's and h's dtype."""
    G = grad.to(compute_dtype)
    signs = unpack_signs(packed, grad.shape[1], compute_dtype)
    gf = g.to(compute_dtype)
    hf = h.to(compute_dtype)
    gb = G[None] * signs  # [K, out, in]
    dg = (gb * hf[:, None, :]).sum(-1)
    dh = (gb * gf[:, :, None]).sum(-2)
    return dg.to(g.dtype), dh.to(h.dtype)


def round_activations_f16(x, h, group=512):
    """h_k ⊙ x as the CUDA fp16 decode kernel multiplies it (``kernels/cuda/packed_decode.cu``): computed in
    float32, then per row of x, path and group of 512 columns scaled by a power of two 1/S, S = 2^(e - 15) with
    2^e > max |h_k ⊙ x| of the group (so the scaled values stay below 2^15), rounded to fp16 and scaled back.
    Returns ``[K, M, in]`` float32."""
    xh = x.float()[None, :, :] * h.float()[:, None, :]
    n = xh.shape[-1]
    xg = torch.nn.functional.pad(xh, (0, (-n) % group)).unflatten(-1, (-1, group))
    amax = xg.abs().amax(-1, keepdim=True)
    e = torch.frexp(amax).exponent.clamp_min(-96)  # amax < 2^e; -96 keeps 1/S finite, as the kernel
    inv = torch.where(amax > 0, torch.ldexp(torch.ones_like(amax), 15 - e), torch.ones_like(amax))
    return ((xg * inv).half().float() / inv).flatten(-2)[..., :n]


def packed_linear(x, packed, g, h, bias=None, compute_dtype=torch.float32, xh_fp16=False):
    """y = Σ_k g_k ⊙ (B_k (h_k ⊙ x)) + bias for x ``[M, in]``; output in x's dtype (or compute_dtype
    when that is float64, the tests' oracle). ``xh_fp16``: h_k ⊙ x rounded as the fp16 decode kernel rounds
    it (``round_activations_f16``), the reference of that kernel."""
    in_features = h.shape[1]
    signs = unpack_signs(packed, in_features, compute_dtype)
    gf = g.to(compute_dtype)
    xf, hf = x.to(compute_dtype), h.to(compute_dtype)
    xr = round_activations_f16(x, h).to(compute_dtype) if xh_fp16 else None
    y = torch.zeros(x.shape[0], packed.shape[1], dtype=compute_dtype, device=x.device)
    for k in range(packed.shape[0]):  # one path at a time: the fallback kernels' memory stays that of one x*h
        xh = xr[k] if xh_fp16 else xf * hf[k][None, :]
        y = y + gf[k][None, :] * (xh @ signs[k].T)
    if bias is not None:
        y = y + bias.to(compute_dtype)
    return y if compute_dtype == torch.float64 else y.to(x.dtype)


def _int8_scale(amax):
    """(finite, scale, inv) of the int8 quantizers' blocks from their largest magnitudes amax (float32): scale =
    amax / 127 (NaN where the block holds a NaN or Inf), inv = 127 / amax (0 where amax is 0 or not finite); amax below
    2^-120 counts as 0 (127 / amax would overflow), as the kernels' RABIT_I8_MIN_AMAX."""
    finite = torch.isfinite(amax)
    amax = torch.where(finite & (amax < 2.0**-120), 0.0, amax)
    c127 = torch.full_like(amax, 127.0)  # tensor / tensor: a float32 division (a Python scalar's can round otherwise)
    scale = torch.where(finite, amax / c127, torch.nan)
    inv = torch.where(finite & (amax > 0), c127 / torch.where(finite & (amax > 0), amax, 1.0), 0.0)
    return finite, scale, inv


def int8_tables(x, h, block=128):
    """The int8 lookup tables of ``packed_linear_i8`` (``kernels/cpu/packed_linear_i8.c``) for x ``[M, in]``: per path,
    row of x and group of 4 columns c = 4t .. 4t+3 (zero past ``in``, padded to whole blocks of ``block`` columns) the
    16 float32 sums e[n] of ±h⊙x (bit j of n set: +), e[n] = ((s0 + s1) + s2) - c3 for n < 8 and -e[~n & 7] above;
    per block mx = max |e| (taken as 0 below 2^-120, where 127 / mx overflows), scale mx / 127 (NaN where the block
    holds a NaN or Inf) and entries round(e * (127 / mx)) (half to even; 0 where mx = 0). Returns (q ``[K, M, in_pad / 4, 16]`` of integer values, scales ``[K, M,
    in_pad / block]``), float32."""
    xh = x.float()[None, :, :] * h.float()[:, None, :]
    n = xh.shape[-1]
    c = torch.nn.functional.pad(xh, (0, (-n) % block)).unflatten(-1, (-1, 4))  # [K, M, G, 4]
    i = torch.arange(8, device=x.device)
    sgn = [torch.where((i >> j) & 1 == 1, 1.0, -1.0) for j in range(3)]  # exact sign flips
    e = ((c[..., 0:1] * sgn[0] + c[..., 1:2] * sgn[1]) + c[..., 2:3] * sgn[2]) - c[..., 3:4]  # [K, M, G, 8]
    e16 = torch.cat([e, -e.flip(-1)], -1)  # n = 8 + i: ~n & 7 = 7 - i
    eb = e.unflatten(2, (-1, block // 4))  # [K, M, nb, groups a block, 8]
    finite, scale, inv = _int8_scale(eb.abs().amax((-2, -1)))  # NaN or Inf propagate
    q = torch.round(e16 * inv.repeat_interleave(block // 4, -1)[..., None])
    return torch.where(finite.repeat_interleave(block // 4, -1)[..., None], q, 0.0), scale


def packed_linear_i8(x, packed, g, h, bias=None, block=128):
    """``rabit.packed_linear_i8``'s output, bit for bit: a row's block sum is the integer sum of its groups' entries of
    :func:`int8_tables` (nibble n of a row: bit j = column 4t + j's sign bit), rs = Σ_b scale_b · sum_b in float32 in
    block order, y = ((0 + g_0 · rs_0) + g_1 · rs_1) + ... + bias, rounded once to x's dtype."""
    q, scale = int8_tables(x, h, block)  # [K, M, G, 16], [K, M, nb]
    K, out, in_features = packed.shape[0], packed.shape[1], h.shape[1]
    bits = (unpack_signs(packed, in_features) > 0).long()
    bits = torch.nn.functional.pad(bits, (0, q.shape[2] * 4 - in_features)).unflatten(-1, (-1, 4))  # [K, out, G, 4]
    nib = (bits * (1 << torch.arange(4, device=x.device))).sum(-1)  # [K, out, G]
    y = torch.zeros(x.shape[0], out, dtype=torch.float32, device=x.device)
    for k in range(K):
        # picked[m, o, t] = q[k, m, t, nib[k, o, t]]
        picked = q[k][:, None, :, :].expand(-1, out, -1, -1).gather(-1, nib[k][None, :, :, None].expand(
            x.shape[0], -1, -1, 1))[..., 0]
        sums = picked.unflatten(-1, (-1, block // 4)).sum(-1)  # [M, out, nb]: exact integers
        rs = torch.zeros(x.shape[0], out, dtype=torch.float32, device=x.device)
        for b in range(sums.shape[-1]):
            rs = rs + scale[k, :, b][:, None] * sums[..., b]
        y = y + g[k].float()[None, :] * rs
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def int8_activations_cuda(x, h):
    """The int8 activations of ``rabit.packed_linear_i8`` on CUDA for x ``[M, in]``: per path k, row of x and
    sub-group of 128 columns a scale. ``h_k ⊙ x`` (float32) is zero-padded to whole groups of 512 columns; a group's
    column c (0..511) is in sub-group (c // 32) % 4 (blocks of 32 columns, every fourth: the k128 halves of the kernel's
    binary MMAs); per sub-group amax = max |h_k ⊙ x| (taken as 0 below 2^-120), S = amax / 127 and Q = round(h_k ⊙ x ·
    (127 / amax)) (float32 operations, half to even; 0 where amax is 0). NaN or Inf anywhere in a group make all its S
    NaN. Returns (Q ``[K, M, in_pad]`` of integer values, float32; S ``[K, M, in_pad // 512, 4]``)."""
    xh = x.float()[None, :, :] * h.float()[:, None, :]
    xb = torch.nn.functional.pad(xh, (0, (-xh.shape[-1]) % 512)).unflatten(-1, (-1, 4, 4, 32))  # [K, M, G, t, sub, 32]
    finite, scale, inv = _int8_scale(xb.abs().amax((-3, -1)))  # [K, M, G, sub]: Inf / NaN make a NaN scale
    q = torch.round(xb * inv[..., None, :, None])
    group_finite = finite.all(-1, keepdim=True)
    q = torch.where(finite[..., None, :, None], q, 0.0)
    scale = torch.where(group_finite, scale, torch.nan)
    return q.flatten(-4), scale


def dequantize_int8_activations_cuda(q, scale):
    """Q · S per column, float64 ``[K, M, in_pad]``, from :func:`int8_activations_cuda`'s (Q, S)."""
    qs = q.double().unflatten(-1, (-1, 4, 4, 32)) * scale.double()[..., None, :, None]  # [K, M, G, t, sub, 32]
    return qs.flatten(-4)


def packed_linear_i8_cuda(x, packed, g, h, bias=None):
    """The value of ``rabit.packed_linear_i8`` on CUDA (the int8 activation class of the decode kernel) in float64:
    y = Σ_k g_k Σ_sub-groups S · Σ_j sign_j Q_j + bias with Q, S of :func:`int8_activations_cuda`. The kernel sums
    those terms in float32 and rounds once to x's dtype, so it matches this to their rounding, not bit for bit."""
    in_features = x.shape[1]
    xq = dequantize_int8_activations_cuda(*int8_activations_cuda(x, h))  # [K, M, in_pad]
    signs = torch.nn.functional.pad(unpack_signs(packed, in_features).double(), (0, xq.shape[-1] - in_features))
    y = torch.zeros(x.shape[0], packed.shape[1], dtype=torch.float64, device=x.device)
    for k in range(packed.shape[0]):
        y = y + g[k].double() * (xq[k] @ signs[k].T)
    if bias is not None:
        y = y + bias.double()
    return y


def int8_blocks(v, block=32):
    """llama.cpp's Q8_0 quantization of the rows of v ``[R, n]`` as ``rabit.int8_weight`` and ``rabit.int8_linear`` do it
    (``kernels/cpu/int8_linear.c``): zero-padded to whole blocks of ``block`` columns, per block amax = max |v| (taken as
    0 below 2^-120), scale amax / 127 (NaN where the block holds a NaN or Inf) and q = round(v * (127 / amax)) (half to
    even; 0 where amax = 0 or the block is not finite). Returns (q ``[R, nb, block]`` of integer values, float32; scales
    ``[R, nb]``)."""
    vb = torch.nn.functional.pad(v.float(), (0, (-v.shape[-1]) % block)).unflatten(-1, (-1, block))
    finite, scale, inv = _int8_scale(vb.abs().amax(-1))
    q = torch.round(torch.where(finite[..., None], vb, 0.0) * inv[..., None]).clamp(-127, 127)
    return q, scale


def int8_weight(weight):
    """``rabit.int8_weight``'s output: :func:`int8_blocks` of the rows in groups of 8 (zero rows past ``out``), qweight
    int8 ``[groups, nb, 8, 32]`` and scales float32 ``[groups, nb, 8]``."""
    q, scale = int8_blocks(weight)  # [out, nb, 32], [out, nb]
    pad = (-weight.shape[0]) % 8
    q = torch.nn.functional.pad(q, (0, 0, 0, 0, 0, pad)).unflatten(0, (-1, 8)).transpose(1, 2)
    scale = torch.nn.functional.pad(scale, (0, 0, 0, pad)).unflatten(0, (-1, 8)).transpose(1, 2)
    return q.to(torch.int8).contiguous(), scale.contiguous()


def int8_linear(x, qweight, scales, out_features, bias=None):
    """``rabit.int8_linear``'s output, bit for bit: x's rows quantized by :func:`int8_blocks`, per block b the exact
    integer dot of the int8 values, y = Σ_b (scale_w[b] · scale_x[b]) · dot_b in float32 in block order from 0, + bias,
    rounded once to x's dtype."""
    qx, sx = int8_blocks(x)  # [M, nb, 32], [M, nb]
    qw = qweight.double().transpose(1, 2).flatten(0, 1)[:out_features]  # [out, nb, 32]
    sw = scales.transpose(1, 2).flatten(0, 1)[:out_features]  # [out, nb]
    dots = torch.einsum("mbj,obj->mob", qx.double(), qw).float()  # exact: |dot| <= 32 * 127^2 < 2^24
    y = torch.zeros(x.shape[0], out_features, dtype=torch.float32, device=x.device)
    for b in range(qw.shape[1]):
        y = y + (sw[:, b][None, :] * sx[:, b][:, None]) * dots[..., b]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def packed_linear_group(x, packed, g, h, bias=()):
    """packed_linear of each layer (lists of one entry per layer; bias empty or one per layer) on the same x."""
    bias = list(bias) or [None] * len(packed)
    return [packed_linear(x, p, gl, hl, b) for p, gl, hl, b in zip(packed, g, h, bias, strict=True)]


def packed_linear_fused(x, packed, g, h, bias=(), norm_weight=None, eps=1e-6, up=None, residual=None,
                        compute_dtype=torch.float32, xh_fp16=False, int8_tables=False, int8_cuda=False):
    """The glue of a decoder fused into packed_linear_group: the layers read u = silu(x) * up (up given) or x, as
    HF's RMSNorm u * rsqrt(mean(u²) + eps) * norm_weight where norm_weight is given, neither rounded; output l is
    Σ_k g_k ⊙ (B_k (h_k ⊙ u)) times the norm's per-row scale, plus bias[l] and residual (a single layer), rounded
    once to x's dtype (or kept in compute_dtype when that is float64, the tests' oracle). ``xh_fp16``: h_k ⊙ u
    rounded as the fp16 decode kernel rounds it (u with the norm's weight, before its row scale), that kernel's
    reference. ``int8_tables``: the layers' product is :func:`packed_linear_i8` (float32 u), the reference of
    ``rabit.packed_linear_fused_i8`` on the CPU (compute_dtype float32); ``int8_cuda``: it is
    :func:`packed_linear_i8_cuda` of u ⊙ norm_weight in float32, the value of ``rabit.packed_linear_fused_i8`` on CUDA
    (compute_dtype float64)."""
    if residual is not None and len(packed) != 1:
        raise ValueError(f"rabit.packed_linear_fused: a residual is added to a single layer's output, got "
                         f"{len(packed)} layers")
    u = x.to(compute_dtype)
    if up is not None:
        u = torch.nn.functional.silu(u) * up.to(compute_dtype)
    rs = None
    if norm_weight is not None:
        rs = torch.rsqrt(u.square().mean(-1, keepdim=True) + eps)
        u = u * norm_weight.to(compute_dtype)
    bias = list(bias) or [None] * len(packed)
    ys = []
    for p, gl, hl, b in zip(packed, g, h, bias, strict=True):
        if int8_tables:
            y = packed_linear_i8(u.float(), p, gl, hl).to(compute_dtype)
        elif int8_cuda:
            y = packed_linear_i8_cuda(u.float(), p, gl, hl).to(compute_dtype)
        else:
            y = packed_linear(u, p, gl, hl, None, compute_dtype=compute_dtype, xh_fp16=xh_fp16)  # in compute_dtype
        if rs is not None:
            y = y * rs
        if b is not None:
            y = y + b.to(compute_dtype)
        if residual is not None:
            y = y + residual.to(compute_dtype)
        ys.append(y if compute_dtype == torch.float64 else y.to(x.dtype))
    return ys


def rope(x, cos, sin):
    """Rotary embedding of x ``[..., D]`` with the rows cos, sin ``[D]`` (HF's rotate_half form), as
    :func:`decode_attention` computes it: float32 without a fused multiply-add, rounded once to x's dtype."""
    xf, c, s = x.float(), cos.float(), sin.float()
    half = x.shape[-1] // 2
    rot = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * c + rot * s).to(x.dtype)


def decode_attention(q, k, v, k_cache, v_cache, cos, sin, pos, scale):
    """One decoding step of attention: q ``[B, H, D]`` and the new token's k, v ``[B, Hkv, D]`` (before the rotary
    embedding), every row at cache position ``pos`` (a 1-element tensor). Writes rope(k) and v into the caches
    ``[B, Hkv, S, D]`` at pos (in place) and returns ``softmax(scale * rope(q) Kᵀ) V`` over positions 0 .. pos,
    ``[B, H, D]`` in q's dtype; query head j reads KV head j // (H / Hkv) (grouped-query attention); cos, sin are
    ``[P >= S, D]``, one row per position. Scores, softmax and the weighted sum in float32."""
    p = int(pos.reshape(-1)[0])
    if not 0 <= p < k_cache.shape[2]:  # a negative index would wrap around silently
        raise ValueError(f"rabit.decode_attention: pos={p} is outside the cache's {k_cache.shape[2]} positions")
    B, H, D = q.shape
    Hkv = k.shape[1]
    k_cache[:, :, p] = rope(k, cos[p], sin[p])
    v_cache[:, :, p] = v
    keys = k_cache[:, :, : p + 1].float()
    vals = v_cache[:, :, : p + 1].float()
    qg = rope(q, cos[p], sin[p]).float().reshape(B, Hkv, H // Hkv, D)
    w = torch.softmax((qg @ keys.transpose(-1, -2)) * scale, dim=-1)  # [B, Hkv, G, p + 1]
    return (w @ vals).reshape(B, H, D).to(q.dtype)
