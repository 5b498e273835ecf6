"""Python side of the ``torch.ops.rabit`` library: fake (meta) kernels, autograd, and the public
wrappers. Schemas live in csrc/torch_bindings.cpp; the math is specified in rabit/reference.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import FLOAT_DTYPES
from .reference import STE_VARIANTS, words_per_row
from .runtime.format import MAX_K

_ops = torch.ops.rabit


def _check_ste(op: str, ste: str, ste_param: float) -> None:
    torch._check(ste in STE_VARIANTS, lambda: f"{op}: unknown ste {ste!r}; use one of {STE_VARIANTS}")
    torch._check(ste == "identity" or ste_param > 0, lambda: f"{op}: ste_param must be > 0 for ste={ste!r}")


def _check_scales(op: str, g: Tensor, h: Tensor, out: int, in_features: int) -> None:
    torch._check(g.dim() == 2 and h.dim() == 2, lambda: f"{op}: expected 2-D g [K, out] and h [K, in], got "
                 f"{g.dim()}-D and {h.dim()}-D")
    torch._check(1 <= g.shape[0] <= MAX_K, lambda: f"{op}: g has K={g.shape[0]} paths; rabit supports K=1..{MAX_K}")
    torch._check(tuple(g.shape) == (g.shape[0], out) and tuple(h.shape) == (g.shape[0], in_features),
                 lambda: f"{op}: g is {tuple(g.shape)} and h is {tuple(h.shape)} but the layer needs "
                 f"[K, {out}] and [K, {in_features}]")


# ---------------------------------------------------------------------------------------------
# fake kernels: shapes and dtypes only, for torch.compile / FakeTensor / opcheck
# ---------------------------------------------------------------------------------------------
@torch.library.register_fake("rabit::residual_binarize")
def _residual_binarize_fake(weight, g, h, out_dtype=None, ste="identity", ste_param=1.0, check_finite=True):
    op = "rabit.residual_binarize"
    torch._check(weight.dim() == 2, lambda: f"{op}: expected a 2-D weight, got {weight.dim()}-D")
    _check_ste(op, ste, ste_param)
    out, in_features = weight.shape
    _check_scales(op, g, h, out, in_features)
    what = weight.new_empty((out, in_features), dtype=out_dtype or weight.dtype)
    packed = weight.new_empty((g.shape[0], out, words_per_row(in_features)), dtype=torch.int32)
    return what, packed


@torch.library.register_fake("rabit::residual_binarize_backward")
def _residual_binarize_backward_fake(grad, weight, g, h, packed, ste="identity", ste_param=1.0):
    op = "rabit.residual_binarize_backward"
    torch._check(grad.shape == weight.shape, lambda: f"{op}: grad is {tuple(grad.shape)} but weight is "
                 f"{tuple(weight.shape)}")
    _check_ste(op, ste, ste_param)
    _check_scales(op, g, h, weight.shape[0], weight.shape[1])
    return torch.empty_like(weight), torch.empty_like(g), torch.empty_like(h)


@torch.library.register_fake("rabit::scale_grads")
def _scale_grads_fake(grad, g, h, packed):
    op = "rabit.scale_grads"
    torch._check(grad.dim() == 2, lambda: f"{op}: expected a 2-D grad, got {grad.dim()}-D")
    _check_scales(op, g, h, grad.shape[0], grad.shape[1])
    return torch.empty_like(g), torch.empty_like(h)


@torch.library.register_fake("rabit::pack_signs")
def _pack_signs_fake(signs):
    torch._check(signs.dim() >= 1 and signs.shape[-1] >= 1,
                 lambda: f"rabit.pack_signs: expected signs with a non-empty last dimension (the in-features), got "
                 f"shape {tuple(signs.shape)}")
    return signs.new_empty((*signs.shape[:-1], words_per_row(signs.shape[-1])), dtype=torch.int32)


@torch.library.register_fake("rabit::unpack_signs")
def _unpack_signs_fake(packed, in_features, dtype=None):
    torch._check(packed.dim() >= 1, lambda: "rabit.unpack_signs: expected packed words with at least 1 dimension")
    torch._check(packed.shape[-1] == words_per_row(in_features),
                 lambda: f"rabit.unpack_signs: packed rows hold {packed.shape[-1]} words but in_features="
                 f"{in_features} needs {words_per_row(in_features)}")
    return packed.new_empty((*packed.shape[:-1], in_features), dtype=dtype or torch.float32)


@torch.library.register_fake("rabit::dequantize")
def _dequantize_fake(packed, g, h, dtype=None):
    op = "rabit.dequantize"
    torch._check(packed.dim() == 3, lambda: f"{op}: expected 3-D packed [K, out, words], got {packed.dim()}-D")
    torch._check(h.dim() == 2, lambda: f"{op}: expected 2-D h [K, in], got {h.dim()}-D")
    _check_scales(op, g, h, packed.shape[1], h.shape[1])
    torch._check(packed.shape[2] == words_per_row(h.shape[1]),
                 lambda: f"{op}: packed rows hold {packed.shape[2]} words but h has in={h.shape[1]}, which needs "
                 f"{words_per_row(h.shape[1])}")
    return packed.new_empty((packed.shape[1], h.shape[1]), dtype=dtype or torch.float32)


@torch.library.register_fake("rabit::packed_linear")
def _packed_linear_fake(x, packed, g, h, bias=None):
    op = "rabit.packed_linear"
    torch._check(x.dim() == 2, lambda: f"{op}: expected a 2-D x [M, in], got {x.dim()}-D")
    torch._check(packed.dim() == 3, lambda: f"{op}: expected 3-D packed [K, out, words], got {packed.dim()}-D")
    # the checks of the real kernels that do not need values, so that shape inference (torch.compile, meta)
    # refuses what a run would refuse
    torch._check(x.dtype in FLOAT_DTYPES, lambda: f"{op}: expected x to be float32, float16 or bfloat16, got {x.dtype}")
    torch._check(packed.dtype == torch.int32, lambda: f"{op}: expected packed to be int32, got {packed.dtype}")
    torch._check(x.device == packed.device, lambda: f"{op}: x is on {x.device} but packed on {packed.device}")
    _check_scales(op, g, h, packed.shape[1], x.shape[1])
    torch._check(packed.shape[2] == words_per_row(x.shape[1]),
                 lambda: f"{op}: packed rows hold {packed.shape[2]} words but x has in={x.shape[1]}, which needs "
                 f"{words_per_row(x.shape[1])}")
    return x.new_empty((x.shape[0], packed.shape[1]))


def i8_layout_bytes(K: int, out: int, in_features: int) -> int:
    """Bytes of ``i8_layout``'s output (kernels/cpu/packed_linear_i8.c): blocks of 16 rows, 128 columns."""
    return K * (-(-out // 16)) * (-(-in_features // 128) * 8) * 32


@torch.library.register_fake("rabit::i8_layout")
def _i8_layout_fake(packed, in_features):
    op = "rabit.i8_layout"
    torch._check(packed.dim() == 3, lambda: f"{op}: expected 3-D packed [K, out, words], got {packed.dim()}-D")
    torch._check(packed.dtype == torch.int32, lambda: f"{op}: expected packed to be int32, got {packed.dtype}")
    if packed.device.type == "cuda":  # the CUDA class reads the packed words as they are
        torch._check(packed.shape[2] == words_per_row(in_features),
                     lambda: f"{op}: packed rows hold {packed.shape[2]} words but in_features={in_features} needs "
                     f"{words_per_row(in_features)}")
        return packed.new_empty(packed.shape)
    return packed.new_empty((i8_layout_bytes(packed.shape[0], packed.shape[1], in_features),), dtype=torch.uint8)


@torch.library.register_fake("rabit::packed_linear_i8")
def _packed_linear_i8_fake(x, layout, g, h, bias=None):
    op = "rabit.packed_linear_i8"
    if layout.device.type == "cuda":  # layout: the packed words; fp16/bf16 x
        torch._check(layout.dim() == 3, lambda: f"{op}: on CUDA the layout is the packed words [K, out, words], got "
                     f"a {layout.dim()}-D layout")
        torch._check(x.shape[0] == 0 or x.dtype != torch.float32,
                     lambda: f"{op}: on CUDA the int8 activation class takes float16 or bfloat16 x, got float32")
        return _packed_linear_fake(x, layout, g, h, bias)
    torch._check(x.dim() == 2, lambda: f"{op}: expected a 2-D x [M, in], got {x.dim()}-D")
    torch._check(x.dtype in FLOAT_DTYPES, lambda: f"{op}: expected x to be float32, float16 or bfloat16, got {x.dtype}")
    _check_scales(op, g, h, g.shape[1], x.shape[1])
    n = i8_layout_bytes(g.shape[0], g.shape[1], x.shape[1])
    torch._check(layout.dim() == 1 and layout.dtype == torch.uint8 and layout.shape[0] == n,
                 lambda: f"{op}: expected layout to be a uint8 vector of {n} bytes, got {layout.dtype} "
                 f"{tuple(layout.shape)}")
    return x.new_empty((x.shape[0], g.shape[1]))


def int8_shapes(out: int, in_features: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of ``int8_weight``'s outputs for an ``[out, in]`` weight: groups of 8 rows, blocks of 32 columns."""
    groups, nb = -(-out // 8), -(-in_features // 32)
    return (groups, nb, 8, 32), (groups, nb, 8)


@torch.library.register_fake("rabit::int8_weight")
def _int8_weight_fake(weight):
    op = "rabit.int8_weight"
    torch._check(weight.dim() == 2, lambda: f"{op}: expected a 2-D weight [out, in], got {weight.dim()}-D")
    torch._check(weight.dtype in FLOAT_DTYPES,
                 lambda: f"{op}: expected weight to be float32, float16 or bfloat16, got {weight.dtype}")
    qs, ss = int8_shapes(*weight.shape)
    return weight.new_empty(qs, dtype=torch.int8), weight.new_empty(ss, dtype=torch.float32)


@torch.library.register_fake("rabit::int8_linear")
def _int8_linear_fake(x, qweight, scales, out_features, bias=None):
    op = "rabit.int8_linear"
    torch._check(x.dim() == 2, lambda: f"{op}: expected a 2-D x [M, in], got {x.dim()}-D")
    torch._check(x.dtype in FLOAT_DTYPES, lambda: f"{op}: expected x to be float32, float16 or bfloat16, got {x.dtype}")
    qs, ss = int8_shapes(out_features, x.shape[1])
    torch._check(qweight.dtype == torch.int8 and tuple(qweight.shape) == qs,
                 lambda: f"{op}: expected qweight to be int8 {list(qs)}, got {qweight.dtype} {tuple(qweight.shape)}")
    torch._check(scales.dtype == torch.float32 and tuple(scales.shape) == ss,
                 lambda: f"{op}: expected scales to be float32 {list(ss)}, got {scales.dtype} {tuple(scales.shape)}")
    return x.new_empty((x.shape[0], out_features))


@torch.library.register_fake("rabit::packed_linear_group")
def _packed_linear_group_fake(x, packed, g, h, bias):
    op = "rabit.packed_linear_group"
    n = len(packed)
    torch._check(n >= 1, lambda: f"{op}: expected at least one layer, got an empty packed list")
    torch._check(len(g) == n and len(h) == n and len(bias) in (0, n),
                 lambda: f"{op}: packed, g, h and bias must list the same layers (bias may be empty: no biases), "
                 f"got {n}, {len(g)}, {len(h)} and {len(bias)} entries")
    return [_packed_linear_fake(x, packed[i], g[i], h[i], bias[i] if bias else None) for i in range(n)]


@torch.library.register_fake("rabit::packed_linear_fused")
def _packed_linear_fused_fake(x, packed, g, h, bias, norm_weight, eps, up, residual, prefetch_weights=False):
    op = "rabit.packed_linear_fused"
    torch._check(up is None or up.shape == x.shape, lambda: f"{op}: up must have x's shape {tuple(x.shape)}")
    torch._check(up is None or up.dtype == x.dtype, lambda: f"{op}: up must have x's dtype {x.dtype}")
    torch._check(norm_weight is None or tuple(norm_weight.shape) == (x.shape[1],),
                 lambda: f"{op}: norm_weight must be [{x.shape[1]}] (x's width)")
    torch._check(residual is None or len(packed) == 1,
                 lambda: f"{op}: a residual is added to a single layer's output, got {len(packed)} layers")
    return _packed_linear_group_fake(x, packed, g, h, bias)


@torch.library.register_fake("rabit::packed_linear_fused_i8")
def _packed_linear_fused_i8_fake(x, layout, g, h, bias, norm_weight, eps, up, residual):
    op = "rabit.packed_linear_fused_i8"
    torch._check(len(layout) >= 1 and len(g) == len(layout) and len(h) == len(layout),
                 lambda: f"{op}: layout, g and h must list the same layers")
    torch._check(residual is None or len(layout) == 1,
                 lambda: f"{op}: a residual is added to a single layer's output, got {len(layout)} layers")
    torch._check(layout[0].device.type != "cuda" or x.shape[0] <= 1,
                 lambda: f"{op}: on CUDA the int8 activation class takes one row of x (decoding at batch 1), got "
                 f"{x.shape[0]}")
    return [_packed_linear_i8_fake(x, lay, gl, hl) for lay, gl, hl in zip(layout, g, h)]


@torch.library.register_fake("rabit::decode_attention")
def _decode_attention_fake(q, k, v, k_cache, v_cache, cos, sin, pos, scale):
    torch._check(q.dim() == 3, lambda: f"rabit.decode_attention: expected a 3-D q [B, H, D], got {q.dim()}-D")
    return q.new_empty(q.shape)


@torch.library.register_fake("rabit::decode_layers")
def _decode_layers_fake(x, weights, bias, eps, k_cache, v_cache, cos, sin, pos, n_heads, scale, int8):
    torch._check(x.dim() == 2, lambda: f"rabit.decode_layers: expected a 2-D x [B, hidden], got {x.dim()}-D")
    return x.new_empty(x.shape)


# ---------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------
def _rb_setup_context(ctx, inputs, output):
    weight, g, h, _out_dtype, ste, ste_param, _check_finite = inputs
    _what, packed = output
    # Only the packed planes (1 bit per weight per path) are kept: B is never stored as a matrix.
    ctx.save_for_backward(weight, g, h, packed)
    ctx.ste, ctx.ste_param = ste, ste_param


def _rb_backward(ctx, grad_what, _grad_packed):
    weight, g, h, packed = ctx.saved_tensors
    if grad_what is None:
        return None, None, None, None, None, None, None
    dw, dg, dh = _ops.residual_binarize_backward(grad_what.contiguous(), weight, g, h, packed, ctx.ste, ctx.ste_param)
    return dw, dg, dh, None, None, None, None


torch.library.register_autograd("rabit::residual_binarize", _rb_backward, setup_context=_rb_setup_context)


def _pl_setup_context(ctx, inputs, output):
    x, packed, g, h, bias = inputs
    ctx.save_for_backward(x, packed, g, h)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _pl_grads(dy, x, packed, g, h, need_x, need_g, need_h, bias_dtype):
    """(dx in float32, dg, dh, db) of y = Σ_k g_k ⊙ (B_k (h_k ⊙ x)) + b, which is linear in each of x, g, h, b
    (B is constant); None where not needed (db: bias_dtype None)."""
    signs = _ops.unpack_signs(packed, h.shape[1], torch.float32)  # [K, out, in]
    dyf, xf, gf, hf = dy.float(), x.float(), g.float(), h.float()
    dx = dg = dh = db = None
    if need_x or need_h:
        t = torch.einsum("mo,ko,koi->kmi", dyf, gf, signs)  # (dy ⊙ g_k) B_k
    if need_x:
        dx = (t * hf[:, None, :]).sum(0)
    if need_g:
        z = torch.einsum("mi,ki,koi->kmo", xf, hf, signs)  # B_k (h_k ⊙ x)
        dg = torch.einsum("mo,kmo->ko", dyf, z).to(g.dtype)
    if need_h:
        dh = torch.einsum("kmi,mi->ki", t, xf).to(h.dtype)
    if bias_dtype is not None:
        db = dyf.sum(0).to(bias_dtype)
    return dx, dg, dh, db


def _pl_backward(ctx, dy):
    x, packed, g, h = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dg, dh, db = _pl_grads(dy, x, packed, g, h, need[0], need[2], need[3],
                               ctx.bias_dtype if ctx.has_bias and need[4] else None)
    return None if dx is None else dx.to(x.dtype), None, dg, dh, db


torch.library.register_autograd("rabit::packed_linear", _pl_backward, setup_context=_pl_setup_context)


def _plg_setup_context(ctx, inputs, output):
    x, packed, g, h, bias = inputs
    ctx.n = len(packed)
    ctx.save_for_backward(x, *packed, *g, *h)
    ctx.bias_dtypes = [b.dtype for b in bias]


def _plg_backward(ctx, dys):
    # each layer's packed_linear gradients; x's are summed over the layers in float32 and rounded once (separate
    # packed_linear calls round each layer's share to x's dtype first: with fp16/bf16 x the last bits can differ)
    x, *rest = ctx.saved_tensors
    n = ctx.n
    packed, g, h = rest[:n], rest[n:2 * n], rest[2 * n:]
    need_x, _, need_g, need_h, need_b = ctx.needs_input_grad
    dx, dgs, dhs, dbs = None, [], [], []
    for i in range(n):
        if dys[i] is None:
            dgs.append(None), dhs.append(None), dbs.append(None)
            continue
        bdt = ctx.bias_dtypes[i] if ctx.bias_dtypes and need_b[i] else None  # bias: every layer's or none
        dxi, dg, dh, db = _pl_grads(dys[i], x, packed[i], g[i], h[i], need_x, need_g[i], need_h[i], bdt)
        if dxi is not None:
            dx = dxi if dx is None else dx + dxi
        dgs.append(dg), dhs.append(dh), dbs.append(db)
    return None if dx is None else dx.to(x.dtype), [None] * n, dgs, dhs, dbs if ctx.bias_dtypes else []


torch.library.register_autograd("rabit::packed_linear_group", _plg_backward, setup_context=_plg_setup_context)


# ---------------------------------------------------------------------------------------------
# the QAT layer: y = x Ŵᵀ + b, keeping the sign planes instead of Ŵ for the backward
# ---------------------------------------------------------------------------------------------
# Autograd around F.linear would keep Ŵ (16 bits per weight in fp16/bf16) from the forward to the backward for
# dX = dY Ŵ; this keeps the K sign planes (K bits per weight) beside what nn.Linear keeps (x and references to the
# parameters), and rebuilds Ŵ from them in the backward (dequantize: residual_binarize's Ŵ bit for bit, reading K
# bits per weight). A torch.autograd.Function over the ops above rather than an op of its own: a training step
# calls it once per layer, and a torch.library custom op costs several times the Python dispatch time (measured
# on SmolLM2-135M training: 1.38x the FP step time against 1.19x), which small layers cannot hide behind the GPU.
class _QATLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, g, h, bias, ste, ste_param, check_finite):
        what, packed = _ops.residual_binarize(weight, g, h, x.dtype, ste, ste_param, check_finite)
        ctx.save_for_backward(x, weight, g, h, packed)
        ctx.ste, ctx.ste_param, ctx.has_bias = ste, ste_param, bias is not None
        return F.linear(x, what, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight, g, h, packed = ctx.saved_tensors
        need_x, need_wgh, need_b = ctx.needs_input_grad[0], any(ctx.needs_input_grad[1:4]), ctx.needs_input_grad[4]
        dx = dw = dg = dh = db = None
        dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        f32 = _dw_is_dwhat(ctx, weight)
        # traced by torch.compile (TrainConfig.compile): the serial schedule, whose ops the compiler can order
        if (need_x and need_wgh and dy.is_cuda and weight.numel() >= OVERLAP_MIN_WEIGHTS
                and not torch.compiler.is_compiling()):
            dx, dw, dg, dh = _overlapped_backward(ctx, f32, dy2, x2, weight, g, h, packed)
            dx = dx.reshape(x.shape)
        else:
            if need_x:
                dx = dy2.mm(_ops.dequantize(packed, g, h, x.dtype)).reshape(x.shape)
            if need_wgh:
                dw, dg, dh = _weight_grads(ctx, f32, _dwhat(f32, dy2, x2), weight, g, h, packed)
        if ctx.has_bias and need_b:
            db = dy2.sum(0)
        return dx, dw, dg, dh, db, None, None, None


def _dw_is_dwhat(ctx, weight) -> bool:
    """Whether dW is dŴ itself: the identity STE passes ∂L/∂Ŵ through unchanged, and a float32 latent takes it in
    float32. dŴ is then taken from the GEMM in float32 (not rounded to x's dtype first) and is returned as dW, and
    the fused backward only reduces it to dg, dh (scale_grads: one read of dŴ, no dW written)."""
    return FLOAT32_DWHAT and ctx.ste == "identity" and weight.dtype == torch.float32


# Module state for benchmarks and tests: False takes dŴ in x's dtype and runs residual_binarize_backward (which
# writes dW) in every case, the schedule before scale_grads existed.
FLOAT32_DWHAT = True
_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()  # torch.mm(..., out_dtype=) (CUDA, torch >= 2.8)


def _mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b accumulated and returned in float32: cuBLAS writes float32 straight from fp16/bf16 operands (products
    of fp16/bf16 values are exact in float32, so on the CPU, or without out_dtype, the upcast operands give the same
    sums up to their order)."""
    if a.dtype == torch.float32:
        return a.mm(b)
    if a.is_cuda and _MM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float().mm(b.float())


# f32: _dw_is_dwhat(ctx, weight), decided once per backward
def _dwhat(f32, dy2, x2):
    # dŴ = dYᵀ X comes out of the GEMM contiguous [out, in]: no transposed copy before the fused backward
    return _mm_f32(dy2.t(), x2) if f32 else dy2.t().mm(x2)


def _weight_grads(ctx, f32, dwhat, weight, g, h, packed):
    if f32:
        return (dwhat, *_ops.scale_grads(dwhat, g, h, packed))
    return _ops.residual_binarize_backward(dwhat, weight, g, h, packed, ctx.ste, ctx.ste_param)


# Layers with at least this many weights run their backward on two CUDA streams (below); smaller ones serially,
# where the two stream switches and event waits cost more than the overlap gains. Module state so that benchmarks
# and tests can time and compare both schedules; the results are the same either way (the same kernels on the
# same inputs, each deterministic).
OVERLAP_MIN_WEIGHTS = 1 << 22
_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


def _overlapped_backward(ctx, f32, dy2, x2, weight, g, h, packed):
    """The layer's backward with its two memory-bound kernels beside its two compute-bound GEMMs.

    Serially it is dequantize -> dX GEMM -> dŴ GEMM -> the fused backward. dequantize needs only the planes and
    dŴ = dYᵀX needs no Ŵ, so they run at once on two streams; then the fused backward (needs dŴ) runs beside
    dX = dY Ŵ (needs Ŵ). A bandwidth-bound kernel can then take SMs the GEMM leaves idle (its last wave) instead of
    always running alone; measured 1-4 % off the step on an H100 (docs/kernels.md). The side stream forks from and
    joins the current one, so this also holds inside CUDA-graph capture; record_stream keeps the caching allocator
    from handing a tensor's memory to its own stream while the other one may still read it."""
    main = torch.cuda.current_stream(dy2.device)
    side = _side_stream(dy2.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        what = _ops.dequantize(packed, g, h, x2.dtype)
        what_ready = side.record_event()
    dwhat = _dwhat(f32, dy2, x2)  # main stream, beside dequantize
    side.wait_stream(main)
    with torch.cuda.stream(side):
        dw, dg, dh = _weight_grads(ctx, f32, dwhat, weight, g, h, packed)
    main.wait_event(what_ready)
    dx = dy2.mm(what)  # main stream, beside the fused backward
    main.wait_stream(side)
    what.record_stream(main)
    dwhat.record_stream(side)
    for t in (dw, dg, dh):
        t.record_stream(main)
    return dx, dw, dg, dh


def _check_qat_linear(x, weight, bias):
    op = "rabit.qat_linear"  # residual_binarize checks weight, g, h, ste
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: expected x to be float32, float16 or bfloat16, got {x.dtype}")
    if weight.dim() == 2 and (x.dim() == 0 or x.shape[-1] != weight.shape[1]):
        raise ValueError(f"{op}: x has {x.shape[-1] if x.dim() else 0} features in its last dimension but the "
                         f"weight is {tuple(weight.shape)} (expects {weight.shape[1]})")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype):
        raise ValueError(f"{op}: bias must be [{weight.shape[0]}] in x's dtype {x.dtype}, got {tuple(bias.shape)} "
                         f"{bias.dtype}")


# ---------------------------------------------------------------------------------------------
# public wrappers
# ---------------------------------------------------------------------------------------------
def residual_binarize(weight: Tensor, g: Tensor, h: Tensor, out_dtype: torch.dtype | None = None,
                      ste: str = "identity", ste_param: float = 1.0,
                      check_finite: bool = True) -> tuple[Tensor, Tensor]:
    """Coupled residual binarization (one QAT forward): returns ``(Ŵ, packed)``.

    Args:
        weight: latent weight ``[out, in]`` (float32, bfloat16 or float16), contiguous.
        g: row scales ``[K, out]``; h: column scales ``[K, in]`` (any float dtype; computed in float32).
        out_dtype: dtype of Ŵ (default: the weight's).
        ste, ste_param: the straight-through estimator used by the backward
            (``"identity"``, ``"clipped"`` with window ``|w| <= ste_param``, or ``"tanh"``).
        check_finite: raise ``ValueError`` if weight, g or h hold NaN/Inf (default). On CUDA this costs
            one device synchronisation per call. With ``False`` the kernels compute on: a NaN latent entry
            takes the sign −1 in every path (``NaN >= 0`` is false), non-finite scales give non-finite Ŵ
            (the trainer turns the check off; it checks the parameters itself, see rabit.train).
    Returns:
        Ŵ ``[out, in]`` and the K sign planes ``[K, out, ceil(in/32)]`` int32 (kernels/rabit_format.h).
    Differentiable in weight (STE), g and h (exact, signs held constant).
    """
    return _ops.residual_binarize(weight, g, h, out_dtype, ste, ste_param, check_finite)


def qat_linear(x: Tensor, weight: Tensor, g: Tensor, h: Tensor, bias: Tensor | None = None,
               ste: str = "identity", ste_param: float = 1.0, check_finite: bool = True) -> Tensor:
    """One QAT layer, ``y = x Ŵᵀ + bias`` with ``Ŵ = residual_binarize(weight, g, h, x.dtype)``.

    The same values and gradients as ``F.linear(x, residual_binarize(weight, g, h, x.dtype)[0], bias)``, but
    the layer keeps only the K sign planes (K bits per weight) beside what ``nn.Linear`` keeps (``x`` and the
    parameters): the backward rebuilds Ŵ from them (:func:`dequantize`) instead of keeping Ŵ (16 bits per weight
    in fp16/bf16) alive between the two. With the identity STE and a float32 latent, ∂L/∂Ŵ is accumulated and kept
    in float32 (it is dW), where the unfused form rounds it to x's dtype first: dW, dg, dh are then slightly more
    exact than that form's for fp16/bf16 x. ``x`` is ``[..., in]``; Ŵ is built in
    ``x``'s dtype; ``bias`` must have that dtype too. Arguments as in :func:`residual_binarize`.
    """
    _check_qat_linear(x, weight, bias)
    return _QATLinear.apply(x, weight, g, h, bias, ste, ste_param, check_finite)


def dequantize(packed: Tensor, g: Tensor, h: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``Ŵ = Σ_k g_k ⊙ B_k ⊙ h_k`` ``[out, in]`` from the planes ``[K, out, words]`` and ``g [K, out]``, ``h [K, in]``
    (``in`` is taken from h), in ``dtype`` (default float32), with :func:`residual_binarize`'s arithmetic: for the
    planes it returned, its Ŵ bit for bit. Not differentiable."""
    return _ops.dequantize(packed, g, h, dtype)


def residual_binarize_backward(grad: Tensor, weight: Tensor, g: Tensor, h: Tensor, packed: Tensor,
                               ste: str = "identity", ste_param: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """One pass over ``grad = ∂L/∂Ŵ``: returns ``(dW, dg, dh)`` (see rabit.reference)."""
    return _ops.residual_binarize_backward(grad, weight, g, h, packed, ste, ste_param)


def scale_grads(grad: Tensor, g: Tensor, h: Tensor, packed: Tensor) -> tuple[Tensor, Tensor]:
    """``(dg, dh)`` of :func:`residual_binarize_backward` alone, without dW, for ``grad = ∂L/∂Ŵ`` ``[out, in]``:
    with the identity STE and a float32 weight dW is ``grad`` itself, so a caller holding it in float32 needs
    only these two reductions (one read of grad and the planes, nothing written but dg, dh)."""
    return _ops.scale_grads(grad, g, h, packed)


def pack_signs(signs: Tensor) -> Tensor:
    """Pack ``[..., in]`` signs (bit = value >= 0) into int32 words ``[..., ceil(in/32)]``."""
    return _ops.pack_signs(signs)


def unpack_signs(packed: Tensor, in_features: int, dtype: torch.dtype | None = None) -> Tensor:
    """Unpack int32 words to ±1 (default float32), ``[..., in_features]``."""
    return _ops.unpack_signs(packed, in_features, dtype)


def packed_linear(x: Tensor, packed: Tensor, g: Tensor, h: Tensor, bias: Tensor | None = None) -> Tensor:
    """``y = Σ_k g_k ⊙ (B_k (h_k ⊙ x)) + bias`` for ``x [M, in]``, straight from the packed planes."""
    return _ops.packed_linear(x, packed, g, h, bias)


def _cpu_only(op: str, *tensors: Tensor, fix: str) -> None:
    for t in tensors:
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"{op}: runs on the CPU only (CPU int8 kernels), got a tensor on {t.device}; {fix}")


def i8_layout(packed: Tensor, in_features: int) -> Tensor:
    """The packed words of a layer (``[K, out, words]``) in ``packed_linear_i8``'s layout. On the CPU: rearranged,
    uint8, one bit a weight padded to multiples of 16 rows and 128 columns. On CUDA: a copy of the packed words, which
    the CUDA class reads as they are (a decoder passes its packed buffers themselves)."""
    return _ops.i8_layout(packed, in_features)


def packed_linear_i8(x: Tensor, layout: Tensor, g: Tensor, h: Tensor, bias: Tensor | None = None) -> Tensor:
    """``packed_linear`` on int8 activations (inference): an opt-in accuracy class, relative error ~1e-2 of the output
    (the class of llama.cpp's int8 activations), not packed_linear's float32 level. ``layout`` is
    ``i8_layout(packed, in_features)``. Each device has its own kernel and quantization:

    - CPU: ``h_k ⊙ x`` becomes int8 lookup tables with a scale per 128 columns, looked up 32 at a time;
      ``rabit.reference.packed_linear_i8`` gives its exact bits.
    - CUDA (float16 / bfloat16 x): ``h_k ⊙ x`` is quantized to int8 with a scale per 128 columns and its 8 bit planes
      multiplied with the weights' bits on binary tensor cores, one launch per row of x (a decoding kernel);
      ``rabit.reference.packed_linear_i8_cuda`` gives its value before the float32 sums and the rounding to x's dtype.
    """
    return _ops.packed_linear_i8(x, layout, g, h, bias)


def int8_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """A dense weight ``[out, in]`` (float32, float16 or bfloat16, finite) quantized for :func:`int8_linear`, llama.cpp's
    Q8_0 kind: a scale ``amax / 127`` per row and block of 32 columns, values ``round(w * 127 / amax)``. Returns
    ``(qweight int8 [groups, nb, 8, 32], scales float32 [groups, nb, 8])``: groups of 8 rows (zero rows past ``out``),
    ``nb`` blocks of 32 columns (zeros past ``in``), so that the kernel reads each as one stream. A weight that came
    from a Q8_0 file (SmolLM2's embeddings) is kept exactly. CPU only."""
    _cpu_only("rabit.int8_weight", weight, fix="on CUDA use a float16 weight and F.linear")
    return _ops.int8_weight(weight)


def int8_linear(x: Tensor, qweight: Tensor, scales: Tensor, out_features: int, bias: Tensor | None = None) -> Tensor:
    """``y = x Wᵀ + bias`` (``[M, out_features]``, out_features: W's rows, which the padded groups of 8 do not tell
    apart) for ``x [M, in]`` on :func:`int8_weight`'s output, with x quantized to int8 the same way
    (per row and 32 columns) and the blocks' integer dot products summed in float32 (CPU, inference; no autograd):
    a relative error of ~1e-2 against float32, the class of llama.cpp's Q8_0 x Q8_0 products. Built for a packed
    model's dense LM head (``StaticDecoder(head_dtype="int8")``); ``rabit.reference.int8_linear`` gives its exact bits.
    """
    _cpu_only("rabit.int8_linear", x, qweight, scales, bias, fix="on CUDA use a float16 weight and F.linear")
    return _ops.int8_linear(x, qweight, scales, out_features, bias)


def packed_linear_group(x: Tensor, packed: list[Tensor], g: list[Tensor], h: list[Tensor],
                        bias: list[Tensor | None] | None = None) -> list[Tensor]:
    """``[packed_linear(x, packed[l], g[l], h[l], bias[l]) for each layer l]`` in one call, bit for bit, for layers
    that read the same x (a decoder's q/k/v or gate/up projections). On CUDA, a decode-size x (fp16/bf16, at most
    16 rows) runs all the layers in one launch of the decode kernels instead of one per layer, when they share K,
    the dtypes of g, h and bias, and the decode kernel their sizes take; every other call runs the layers one by
    one. ``bias``: None, or one entry
    per layer (each a tensor or None)."""
    packed, g, h = list(packed), list(g), list(h)
    bias = [] if bias is None else list(bias)
    if bias and len(bias) != len(packed):
        raise ValueError(f"rabit.packed_linear_group: bias lists {len(bias)} layers but packed lists {len(packed)}; "
                         "pass one entry per layer (None for a layer without a bias) or bias=None")
    if all(b is None for b in bias):
        return _ops.packed_linear_group(x, packed, g, h, [])
    if all(b is not None for b in bias):
        return _ops.packed_linear_group(x, packed, g, h, bias)
    # some layers have a bias and some not: the op takes all or none, so those run as packed_linear each
    return [_ops.packed_linear(x, *layer) for layer in zip(packed, g, h, bias, strict=True)]


def _fused_bias_list(op, x, g, h, bias, norm_weight, up, residual) -> list[Tensor]:
    """The fused ops' common checks (decoding only: no backward; bias None or one per layer); bias as the op's list."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, norm_weight, up, residual, *g, *h, *(bias or []))):
        raise RuntimeError(f"{op} is for decoding and has no backward; call it under torch.no_grad() or "
                           "torch.inference_mode()")
    bias = [] if bias is None else list(bias)
    if any(b is None for b in bias):
        raise ValueError(f"{op}: bias must be None or one tensor per layer")
    return bias


def packed_linear_fused(x: Tensor, packed: list[Tensor], g: list[Tensor], h: list[Tensor],
                        bias: list[Tensor] | None = None, norm_weight: Tensor | None = None, eps: float = 1e-6,
                        up: Tensor | None = None, residual: Tensor | None = None,
                        prefetch_weights: bool = False) -> list[Tensor]:
    """A decoder's glue fused into :func:`packed_linear_group` (spec: :func:`rabit.reference.packed_linear_fused`):
    the layers read ``u = silu(x) * up`` where ``up`` is given (a SwiGLU MLP's down_proj), else ``x``; with
    ``norm_weight`` they read HF's RMSNorm of it, ``u * rsqrt(mean(u²) + eps) * norm_weight`` (the q/k/v and
    gate/up projections after a layer's norms); output l is ``packed_linear(u, layer l) + residual`` (residual: a
    single layer only, o_proj and down_proj), in float32 and rounded once to x's dtype. On CUDA the decode kernel
    that :func:`packed_linear` runs at that shape, with the glue inside: fp16/bf16 x with at most 4 rows, and with a
    norm at most 32768 columns (an error elsewhere: run the ops unfused there); on the CPU the packed kernel with the
    glue as plain float32 loops around it (``kernels/cpu/fused_glue.c``). ``bias``: None or one tensor per layer. For decoding: no backward.

    ``prefetch_weights=True`` lets the CUDA-core kernel (narrow layers) load the layers' parameters (packed, g, h,
    bias, norm_weight) before the kernel ahead of it in the stream has finished (it is launched with programmatic
    dependent launch; x, up and residual are still read after that kernel ends). Pass it only where that kernel does
    not write those parameters, as in a decoder, whose weights never change: :class:`rabit.static_decode.StaticDecoder`
    does. It saves about a sixth of a SmolLM2-shape decode step (docs/kernels.md). The MMA kernels of wider layers
    load their weights before they wait for their own prologue in any case, and take no early loads besides."""
    bias = _fused_bias_list("rabit.packed_linear_fused", x, g, h, bias, norm_weight, up, residual)
    return _ops.packed_linear_fused(x, list(packed), list(g), list(h), bias, norm_weight, float(eps), up, residual,
                                    bool(prefetch_weights))


def packed_linear_fused_i8(x: Tensor, layout: list[Tensor], g: list[Tensor], h: list[Tensor],
                           bias: list[Tensor] | None = None, norm_weight: Tensor | None = None, eps: float = 1e-6,
                           up: Tensor | None = None, residual: Tensor | None = None) -> list[Tensor]:
    """:func:`packed_linear_fused` with :func:`packed_linear_i8` as the layers' product (int8 activations; spec on the
    CPU: :func:`rabit.reference.packed_linear_fused` with ``int8_tables=True``): ``layout[l]`` is ``i8_layout`` of
    layer l. On CUDA one row of float16 / bfloat16 x (decoding at batch 1), the layers in one launch. For decoding: no
    backward."""
    bias = _fused_bias_list("rabit.packed_linear_fused_i8", x, g, h, bias, norm_weight, up, residual)
    return _ops.packed_linear_fused_i8(x, list(layout), list(g), list(h), bias, norm_weight, float(eps), up, residual)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, cos: Tensor, sin: Tensor,
                     pos: Tensor, scale: float | None = None) -> Tensor:
    """One decoding step of attention in one call (spec: :func:`rabit.reference.decode_attention`): the rotary
    embedding of the new token's q ``[B, H, D]`` and k ``[B, Hkv, D]``, k and v written into the caches
    ``[B, Hkv, S, D]`` at position ``pos`` (a 1-element int64 tensor on the same device, so that a CUDA graph
    replays it at the current position), and softmax attention over positions 0 .. pos; returns ``[B, H, D]``.
    ``scale`` defaults to ``D ** -0.5``. On CUDA one launch reads only the positions in use, split over blocks
    (split-KV); a pos outside the cache gives NaN outputs there (no device read in the call), an error on the CPU.
    Inference only: it has no backward."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, cos, sin)):
        raise RuntimeError("rabit.decode_attention is for decoding and has no backward; call it under "
                           "torch.no_grad() or torch.inference_mode()")
    return _ops.decode_attention(q, k, v, k_cache, v_cache, cos, sin, pos, q.shape[-1] ** -0.5 if scale is None
                                 else float(scale))


# ---------------------------------------------------------------------------------------------
# reference kernels for a device without compiled ones (explicit opt-in)
# ---------------------------------------------------------------------------------------------
_REFERENCE_DEVICES: set[str] = set()


def has_native_kernels(device_type: str) -> bool:
    """Whether the compiled extension registered kernels for ``device_type`` ("cpu", "cuda")."""
    if device_type.upper() in _REFERENCE_DEVICES:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("rabit::residual_binarize", device_type.upper())


def use_reference_kernels(device_type: str = "cuda") -> None:
    """Register rabit.reference (plain PyTorch) as the implementation of every rabit op on
    ``device_type``, for a build without compiled kernels there (e.g. a CPU-only build used on a
    GPU). Opt-in, never automatic: the reference computes the same signs bit for bit and the same
    float results up to summation order (except where the CUDA fp16 decode kernel (fp16/bf16 x, 2 <= M <= 16, layers
    wider than the CUDA-core kernel's) rounds x*h to fp16, which the reference does not), but is slower and uses more memory."""
    from . import reference as R

    key = device_type.upper()
    if key in _REFERENCE_DEVICES:
        return
    if has_native_kernels(device_type):
        raise RuntimeError(f"rabit: {device_type} already has compiled rabit kernels; not overriding them")

    def rb(weight, g, h, out_dtype=None, ste="identity", ste_param=1.0, check_finite=True):
        _check_ste("rabit.residual_binarize", ste, ste_param)
        if check_finite:  # the compiled kernels' messages
            for name, t in (("g", g), ("h", h)):
                if not torch.isfinite(t).all():
                    raise ValueError(f"rabit.residual_binarize: {name} contains NaN or Inf")
            if not torch.isfinite(weight).all():
                raise ValueError("rabit.residual_binarize: the latent weight contains NaN or Inf; "
                                 "check the learning rate or the checkpoint it was loaded from")
        what, packed = R.residual_binarize(weight, g, h, out_dtype)
        return what, packed

    impls = {
        "residual_binarize": rb,
        "residual_binarize_backward": lambda grad, weight, g, h, packed, ste="identity", ste_param=1.0:
            R.residual_binarize_backward(grad, weight, g, h, packed, ste, ste_param),
        "scale_grads": lambda grad, g, h, packed: R.scale_grads(grad, g, h, packed),
        "pack_signs": lambda signs: R.pack_signs(signs),
        "unpack_signs": lambda packed, in_features, dtype=None: R.unpack_signs(packed, in_features,
                                                                                dtype or torch.float32),
        "packed_linear": lambda x, packed, g, h, bias=None: R.packed_linear(x, packed, g, h, bias),
        "packed_linear_group": lambda x, packed, g, h, bias: R.packed_linear_group(x, packed, g, h, bias),
        "packed_linear_fused": lambda x, packed, g, h, bias, norm_weight, eps, up, residual, prefetch_weights=False:
            R.packed_linear_fused(x, packed, g, h, bias, norm_weight, eps, up, residual),
        "decode_attention": R.decode_attention,
        "dequantize": lambda packed, g, h, dtype=None: R.dequantize(
            R.unpack_signs(packed, h.shape[1], torch.float32), g, h).to(dtype or torch.float32),
    }
    for name, fn in impls.items():
        torch.library.impl(f"rabit::{name}", key)(fn)
    _REFERENCE_DEVICES.add(key)
