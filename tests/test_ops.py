"""Every rabit op against rabit.reference (the plain-PyTorch spec), plus opcheck, gradcheck and
input errors. Signs and packed bits must match exactly; float results follow the 2x rule."""

import itertools
import re
import subprocess
import sys

import pytest
import torch

import rabit
from rabit import _core
from rabit import reference as R

from conftest import available_devices
from helpers import (FLOAT_DTYPES, SHAPES, abs_terms, assert_float_close, cuda_rounds_xh_to_fp16, dtype_id,
                     random_layer, shape_id, tanh_ste_dw_bound)

DEVICES = available_devices()


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


# ---------------------------------------------------------------- forward: signs and Ŵ
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("wdtype", FLOAT_DTYPES, ids=dtype_id)
def test_residual_binarize_matches_reference(shape, k, wdtype, device):
    w, g, h = random_layer(*shape, k, wdtype, device)
    for out_dtype in [None, *FLOAT_DTYPES]:
        what, packed = rabit.residual_binarize(w, g, h, out_dtype)
        ref_what, ref_packed = R.residual_binarize(w.cpu(), g.cpu(), h.cpu(), out_dtype)
        assert what.dtype == (out_dtype or wdtype)
        assert torch.equal(packed.cpu(), ref_packed), "sign planes differ from the reference"
        assert torch.equal(what.cpu(), ref_what), f"Ŵ ({out_dtype}) differs from the reference"


def test_residual_binarize_k4_and_random_sizes(device):
    for _ in range(5):
        out, in_features = torch.randint(1, 200, (2,)).tolist()
        w, g, h = random_layer(out, in_features, 4, torch.float32, device)
        what, packed = rabit.residual_binarize(w, g, h)
        ref_what, ref_packed = R.residual_binarize(w.cpu(), g.cpu(), h.cpu())
        assert torch.equal(packed.cpu(), ref_packed) and torch.equal(what.cpu(), ref_what)


def test_path_two_corrects_path_one(device):
    # the coupled chain: B2 = sign(W - Ŵ1), and adding path 2 shrinks the error
    w, g, h = random_layer(64, 96, 2, torch.float32, device)
    g[0], h[0] = w.abs().mean(1), torch.ones(96, device=device)
    g[1], h[1] = (w.abs() - g[0][:, None]).abs().mean(1), torch.ones(96, device=device)
    signs = rabit.unpack_signs(rabit.residual_binarize(w, g, h)[1], 96)
    assert torch.equal(signs[0], torch.where(w >= 0, 1.0, -1.0))
    w1 = g[0][:, None] * signs[0] * h[0]
    assert torch.equal(signs[1], torch.where(w - w1 >= 0, 1.0, -1.0))
    what = rabit.residual_binarize(w, g, h)[0]
    assert (w - what).norm() < (w - w1).norm()


def test_sign_of_zero_is_plus_one(device):
    w = torch.zeros(3, 40, device=device)
    g = torch.ones(2, 3, device=device)
    h = torch.ones(2, 40, device=device)
    signs = rabit.unpack_signs(rabit.residual_binarize(w, g, h)[1], 40)
    assert torch.equal(signs[0], torch.ones(3, 40, device=device))  # sign(0) = +1
    assert torch.equal(signs[1], -torch.ones(3, 40, device=device))  # residual 0 - 1 < 0


# ---------------------------------------------------------------- backward
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("wdtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("ste", ["identity", "clipped", "tanh"])
def test_backward_matches_reference(shape, k, wdtype, ste, device):
    w, g, h = random_layer(*shape, k, wdtype, device)
    grad = torch.randn(*shape, device=device).to(wdtype)
    _, packed = rabit.residual_binarize(w, g, h)
    param = 0.7
    dw, dg, dh = rabit.residual_binarize_backward(grad, w, g, h, packed, ste, param)
    args = (grad.cpu(), w.cpu(), g.cpu(), h.cpu(), packed.cpu(), ste, param)
    rdw, rdg, rdh = R.residual_binarize_backward(*args)
    _, dg64, dh64 = R.residual_binarize_backward(*args, compute_dtype=torch.float64)
    assert dw.dtype == wdtype and dg.dtype == g.dtype and dh.dtype == h.dtype
    if ste == "tanh":
        bound = tanh_ste_dw_bound(grad, rdw)
        assert ((dw.cpu().float() - rdw.float()).abs() <= bound).all()
    else:
        assert torch.equal(dw.cpu(), rdw)
    assert_float_close(dg.cpu(), rdg, dg64, "dg")
    assert_float_close(dh.cpu(), rdh, dh64, "dh")


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("gdtype", FLOAT_DTYPES, ids=dtype_id)
def test_scale_grads_is_the_backward_without_dw(shape, k, gdtype, device):
    """scale_grads returns the backward's dg, dh bit for bit (the same kernel, dW not written), and follows the
    reference by the 2x rule."""
    w, g, h = random_layer(*shape, k, torch.float32, device)
    grad = torch.randn(*shape, device=device).to(gdtype)
    _, packed = rabit.residual_binarize(w, g, h)
    dg, dh = rabit.scale_grads(grad, g, h, packed)
    _, bdg, bdh = rabit.residual_binarize_backward(grad, w, g, h, packed)
    assert torch.equal(dg, bdg) and torch.equal(dh, bdh)
    args = (grad.cpu(), g.cpu(), h.cpu(), packed.cpu())
    rdg, rdh = R.scale_grads(*args)
    dg64, dh64 = R.scale_grads(*args, compute_dtype=torch.float64)
    assert_float_close(dg.cpu(), rdg, dg64, "dg")
    assert_float_close(dh.cpu(), rdh, dh64, "dh")
    # scales in another dtype come back in it, as from the backward
    dg16, dh16 = rabit.scale_grads(grad, g.half(), h.bfloat16(), packed)
    assert dg16.dtype == torch.float16 and dh16.dtype == torch.bfloat16


def test_scale_grads_errors(device):
    w, g, h = random_layer(5, 40, 2, torch.float32, device)
    _, packed = rabit.residual_binarize(w, g, h)
    grad = torch.randn(5, 40, device=device)
    with pytest.raises(ValueError, match="rabit.scale_grads: expected a 2-D grad, got 3-D"):
        rabit.scale_grads(grad[None], g, h, packed)
    with pytest.raises(ValueError, match=r"rabit.scale_grads: packed is \[2, 5, 2\] but K=2, out=5, in=70"):
        rabit.scale_grads(torch.randn(5, 70, device=device), g, torch.rand(2, 70, device=device), packed)
    with pytest.raises(TypeError, match="rabit.scale_grads: expected grad to be float32, float16 or bfloat16"):
        rabit.scale_grads(grad.double(), g, h, packed)
    with pytest.raises(ValueError, match="rabit.scale_grads: expected grad to be contiguous"):
        rabit.scale_grads(torch.randn(40, 5, device=device).t(), g, h, packed)


def test_clipped_ste_masks_outside_window(device):
    w = torch.tensor([[-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0]], device=device)
    g, h = torch.ones(2, 1, device=device), torch.ones(2, 7, device=device)
    _, packed = rabit.residual_binarize(w, g, h)
    dw, _, _ = rabit.residual_binarize_backward(torch.ones_like(w), w, g, h, packed, "clipped", 1.0)
    assert dw.tolist() == [[0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]]  # the edge |w| = c passes


@pytest.mark.parametrize("k", [1, 2])
def test_multithreaded_kernels_match_reference(k, device):
    # large enough for the kernels to open a parallel region (RABIT_PARALLEL_MIN_WORDS)
    w, g, h = random_layer(1031, 509 * k, k, torch.float32, device)
    what, packed = rabit.residual_binarize(w, g, h)
    ref_what, ref_packed = R.residual_binarize(w.cpu(), g.cpu(), h.cpu())
    assert torch.equal(packed.cpu(), ref_packed) and torch.equal(what.cpu(), ref_what)
    grad = torch.randn_like(w)
    dw, dg, dh = rabit.residual_binarize_backward(grad, w, g, h, packed)
    args = (grad.cpu(), w.cpu(), g.cpu(), h.cpu(), packed.cpu())
    _, rdg, rdh = R.residual_binarize_backward(*args)
    _, dg64, dh64 = R.residual_binarize_backward(*args, compute_dtype=torch.float64)
    assert torch.equal(dw, grad)
    assert_float_close(dg.cpu(), rdg, dg64, "dg")
    assert_float_close(dh.cpu(), rdh, dh64, "dh")
    x = torch.randn(3, w.shape[1], device=device)
    y = rabit.packed_linear(x, packed, g, h)
    pl = (x.cpu(), packed.cpu(), g.cpu(), h.cpu())
    assert_float_close(y.cpu(), R.packed_linear(*pl), R.packed_linear(*pl, compute_dtype=torch.float64), "y",
                       abs_terms(x, g, h, None).cpu(), k * w.shape[1])
    assert torch.equal(rabit.unpack_signs(rabit.pack_signs(rabit.unpack_signs(packed, w.shape[1])), w.shape[1]),
                       rabit.unpack_signs(packed, w.shape[1]))


def test_backward_is_deterministic(device):
    w, g, h = random_layer(1031, 509, 2, torch.float32, device)
    grad = torch.randn_like(w)
    _, packed = rabit.residual_binarize(w, g, h)
    a = rabit.residual_binarize_backward(grad, w, g, h, packed)
    b = rabit.residual_binarize_backward(grad, w, g, h, packed)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_float16_conversions_are_exact_for_every_half(device):
    # identity STE copies G into dW's dtype: every finite half -> float32, and float32 -> half/bf16
    halfs = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    halfs = halfs[torch.isfinite(halfs)].reshape(1, -1).to(device)
    w32 = torch.zeros(halfs.shape, device=device)
    g, h = torch.ones(1, 1, device=device), torch.ones(1, halfs.shape[1], device=device)
    packed = rabit.residual_binarize(w32, g, h)[1]
    dw, _, _ = rabit.residual_binarize_backward(halfs, w32, g, h, packed)
    assert torch.equal(dw, halfs.float())
    x = torch.randn(1, 4096, device=device) * torch.logspace(-9, 5, 4096, device=device)
    x = torch.cat([x, torch.tensor([[65504.0, 65519.0, 65520.0, 6e-8, 3e-8, 2.9e-8]], device=device)], 1)
    for dt in (torch.float16, torch.bfloat16):
        wd = torch.zeros(x.shape, device=device, dtype=dt)
        hx = torch.ones(1, x.shape[1], device=device)
        packed = rabit.residual_binarize(wd, g, hx)[1]
        dw, _, _ = rabit.residual_binarize_backward(x, wd, g, hx, packed)
        assert torch.equal(dw, x.to(dt)), f"float32 -> {dt} rounding differs from torch"


# ---------------------------------------------------------------- packing
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_pack_unpack_round_trip(shape, device):
    signs = torch.where(torch.rand(3, *shape, device=device) < 0.5, -1.0, 1.0)
    packed = rabit.pack_signs(signs)
    assert packed.dtype == torch.int32 and packed.shape == (3, shape[0], R.words_per_row(shape[1]))
    assert torch.equal(packed.cpu(), R.pack_signs(signs.cpu()))
    for dt in FLOAT_DTYPES:
        assert torch.equal(rabit.unpack_signs(packed, shape[1], dt), signs.to(dt))


def test_pack_bit_order_and_padding():
    signs = -torch.ones(1, 35)
    signs[0, 0] = 1  # bit 0 of word 0
    signs[0, 33] = 1  # bit 1 of word 1
    packed = rabit.pack_signs(signs)
    assert packed.tolist() == [[1, 2]]  # LSB-first; set bit = +1; padding bits clear
    signs[0, 31] = 1
    assert rabit.pack_signs(signs)[0, 0].item() == 1 - 2**31  # bit 31 set: 0x80000001 as int32


def test_unpack_ignores_padding_bits():
    packed = torch.tensor([[-1]], dtype=torch.int32)  # all 32 bits set
    assert torch.equal(rabit.unpack_signs(packed, 5), torch.ones(1, 5))


def test_pack_float64_signs_in_their_own_dtype():
    # -1e-300 rounds to -0.0 in float32, whose bit is 1; the sign of the float64 value is what counts
    signs = torch.tensor([[-1e-300, -1e-46, 1e-300, 0.0, -0.0, float("nan"), 2.0]], dtype=torch.float64)
    assert torch.equal(rabit.pack_signs(signs), R.pack_signs(signs))
    assert rabit.unpack_signs(rabit.pack_signs(signs), 7).tolist() == [[-1.0, -1.0, 1.0, 1.0, 1.0, -1.0, 1.0]]


def test_pack_accepts_integer_signs():
    signs = torch.tensor([[1, -1, 0, -3]], dtype=torch.int8)
    assert rabit.unpack_signs(rabit.pack_signs(signs), 4).tolist() == [[1.0, -1.0, 1.0, -1.0]]


# ---------------------------------------------------------------- packed GEMV / GEMM
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("xdtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("m", [1, 2, 5, 16])
def test_packed_linear_matches_reference(shape, k, xdtype, m, device):
    w, g, h = random_layer(*shape, k, torch.float32, device)
    _, packed = rabit.residual_binarize(w, g, h)
    x = torch.randn(m, shape[1], device=device).to(xdtype)
    bias = torch.randn(shape[0], device=device) if m % 2 else None
    for scales in (torch.float32, torch.float16):
        gs, hs = g.to(scales), h.to(scales)
        y = rabit.packed_linear(x, packed, gs, hs, bias)
        assert y.dtype == xdtype and y.shape == (m, shape[0])
        args = (x.cpu(), packed.cpu(), gs.cpu(), hs.cpu(), None if bias is None else bias.cpu())
        terms = abs_terms(x, gs, hs, bias).cpu()
        ref = R.packed_linear(*args, xh_fp16=cuda_rounds_xh_to_fp16(device, xdtype, m))
        assert_float_close(y.cpu(), ref, R.packed_linear(*args, compute_dtype=torch.float64), "packed_linear",
                           terms, k * shape[1])


# ---------------------------------------------------------------- packed_linear_group: layers that read one x
# (out, in) per layer; odd `out` leaves partial 16-row tiles in the CUDA kernels; 5 layers need two CUDA launches
# (at most 4 layers a launch); in = 8000 takes the 1-bit decode kernel at M = 1.
GROUP_LAYERS = [[(17, 45), (40, 45), (5, 45)], [(64, 512), (48, 512)], [(33, 600)] * 5, [(24, 8000), (9, 8000)]]


def _group_args(layers, k, device, scales=torch.float16, bias=True):
    """(packed, g, h, bias) per layer; bias on every layer or none (the op runs groups only then: the wrapper runs a
    group with some biases as separate calls, test_packed_linear_group_of_unlike_layers)."""
    args = []
    for out, in_features in layers:
        w, g, h = random_layer(out, in_features, k, torch.float32, device)
        _, packed = rabit.residual_binarize(w, g, h)
        args.append((packed, g.to(scales), h.to(scales), torch.randn(out, device=device) if bias else None))
    return args


@pytest.mark.parametrize("layers", GROUP_LAYERS, ids=lambda ls: f"{len(ls)}x{ls[0][1]}")
@pytest.mark.parametrize("xdtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 16, 17])
def test_packed_linear_group_is_packed_linear_per_layer(layers, xdtype, m, device):
    if layers[0][1] == 8000 and m > 2:
        pytest.skip("the long rows are for the 1-bit kernel (M <= 2)")
    for bias in (True, False):
        args = _group_args(layers, 2, device, bias=bias)
        x = torch.randn(m, layers[0][1], device=device).to(xdtype)
        packed, g, h, b = (list(t) for t in zip(*args))
        ys = torch.ops.rabit.packed_linear_group(x, packed, g, h, b if bias else [])  # the op, not the wrapper
        assert len(ys) == len(layers)
        for i, (y, a) in enumerate(zip(ys, args)):
            assert torch.equal(y, rabit.packed_linear(x, *a)), f"layer {i}, bias {bias}"


def test_packed_linear_group_of_unlike_layers(device):
    """Layers with different K, scale dtypes or bias dtypes run one by one on CUDA: still each layer's output."""
    a = _group_args([(20, 96)], 2, device) + _group_args([(31, 96)], 3, device) + \
        _group_args([(16, 96)], 2, device, torch.float32) + _group_args([(24, 96)], 2, device, bias=False)
    a[2] = (*a[2][:3], torch.randn(16, device=device).half())
    for m in (1, 4, 9):
        x = torch.randn(m, 96, device=device).half()
        # different K; different scale and bias dtypes; some layers with a bias and some without (the wrapper)
        for sub in ([a[0], a[1]], [a[0], a[2]], [a[2], a[0], a[2]], [a[0], a[3], a[0]]):
            ys = rabit.packed_linear_group(x, *map(list, zip(*sub)))
            for y, args in zip(ys, sub):
                assert torch.equal(y, rabit.packed_linear(x, *args))


@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_group_gradients_are_the_layers(bias, device):
    args = _group_args([(7, 45), (12, 45), (5, 45)], 2, device, torch.float32, bias)
    x0 = torch.randn(3, 45, device=device)
    dys = [torch.randn(3, a[0].shape[1], device=device) for a in args]

    def grads(group):
        x = x0.clone().requires_grad_()
        gs = [a[1].clone().requires_grad_() for a in args]
        hs = [a[2].clone().requires_grad_() for a in args]
        bs = [None if a[3] is None else a[3].clone().requires_grad_() for a in args]
        if group:
            ys = rabit.packed_linear_group(x, [a[0] for a in args], gs, hs, bs)
        else:
            ys = [rabit.packed_linear(x, a[0], g, h, b) for a, g, h, b in zip(args, gs, hs, bs)]
        sum((y * dy).sum() for y, dy in zip(ys, dys)).backward()
        return [x.grad] + [t.grad for t in gs + hs + bs if t is not None]

    for got, want in zip(grads(True), grads(False), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_packed_linear_group_errors(device):
    (packed, g, h, _), = _group_args([(5, 40)], 2, device)
    x = torch.randn(2, 40, device=device).half()
    with pytest.raises(ValueError, match="at least one layer"):
        rabit.packed_linear_group(x, [], [], [])
    with pytest.raises(ValueError, match=r"must list the same layers \(bias may be empty: no biases\), got 2, 1, 2 "
                       "and 0 entries"):
        rabit.packed_linear_group(x, [packed, packed], [g], [h, h])
    with pytest.raises(ValueError, match="got 2, 2, 2 and 1 entries"):
        torch.ops.rabit.packed_linear_group(x, [packed, packed], [g, g], [h, h], [torch.randn(5, device=device)])
    with pytest.raises(ValueError, match="bias lists 1 layers but packed lists 2"):
        rabit.packed_linear_group(x, [packed, packed], [g, g], [h, h], [None])
    with pytest.raises(ValueError, match=r"rabit.packed_linear_group \(layer 1\): x is \[2, 40\] but h is \[2, 70\]; x "
                       r"must be \[M, in\] with the layer's in=70"):
        rabit.packed_linear_group(x, [packed, packed], [g, g], [h, torch.rand(2, 70, device=device)])
    with pytest.raises(TypeError, match=r"\(layer 0\): expected packed to hold int32 words"):
        rabit.packed_linear_group(x, [packed.float()], [g], [h])


# ---------------------------------------------------------------- packed_linear_fused: the decoder's glue in the kernel
# (norm, up, residual) per decoder call: q/k/v and gate/up on a norm, down_proj on silu(gate) * up plus the residual,
# o_proj plus the residual; and the plain group, each glue piece alone, and all three together
FUSED_MODES = {"norm": (True, False, False), "swiglu+residual": (False, True, True), "residual": (False, False, True),
               "plain": (False, False, False), "up": (False, True, False), "all": (True, True, True)}
# (out, in) per layer: odd sizes, partial row tiles, one word a row, each of the CUDA-core kernel's rows-a-block cases
# (in <= 512: 32 rows, <= 1024: 16, <= 1536: 8), and the MMA kernels packed_linear takes on CUDA for wider rows: int8
# at M = 1 and fp16 from M = 2 (in = 2048, 4100: a partial group of 512 columns; two layers of different heights), at
# M = 1 the 1-bit one (8000; 20000: more than 32 groups of 512, the norm's second pass over them; 32768: the norm's
# most, 64 groups), and a call whose layers take different kernels (1536 columns: 100 rows the CUDA-core one, 2100
# rows int8 or fp16), one launch each
FUSED_LAYERS = [[(17, 45), (40, 45), (5, 45)], [(33, 600)], [(64, 1100), (9, 1100)], [(576, 576)], [(100, 2048)],
                [(300, 4100), (33, 4100)], [(40, 8000)], [(24, 20000)], [(9, 32768)], [(100, 1536), (2100, 1536)]]


def _fused_inputs(layers, mode, m, xdtype, device, bias, k=2):
    norm, up, residual = FUSED_MODES[mode]
    if residual:
        layers = layers[:1]
    args = _group_args(layers, k, device, bias=bias)
    in_features = layers[0][1]
    # the parameters first, the activations last: with prefetch_weights the CUDA kernel may read the parameters
    # before the kernel just before it has finished, so that kernel must not be the one that wrote them. The norm's
    # weight in x's dtype for fp16 x, in float32 for bf16 x (the kernel reads either)
    wdtype = xdtype if xdtype != torch.bfloat16 else torch.float32
    kw = {"norm_weight": (torch.rand(in_features, device=device) + 0.5).to(wdtype) if norm else None, "eps": 1e-5}
    x = torch.randn(m, in_features, device=device).to(xdtype)
    kw["up"] = torch.randn(m, in_features, device=device).to(xdtype) if up else None
    kw["residual"] = torch.randn(m, layers[0][0], device=device).to(xdtype) if residual else None
    packed, g, h, b = (list(t) for t in zip(*args))
    return x, packed, g, h, (b if bias else None), kw


def _fused_terms(x, g, h, b, kw):
    """abs_terms of the layers' float64 input (the norm's scale folded in) plus |residual|: the float32 floor."""
    u = x.double().cpu()
    if kw["up"] is not None:
        u = torch.nn.functional.silu(u) * kw["up"].double().cpu()
    if kw["norm_weight"] is not None:
        u = u * torch.rsqrt(u.square().mean(-1, keepdim=True) + kw["eps"]) * kw["norm_weight"].double().cpu()
    t = abs_terms(u, g.cpu(), h.cpu(), None if b is None else b.cpu())
    return t + (kw["residual"].abs().double().cpu() if kw["residual"] is not None else 0)


@pytest.mark.parametrize("layers", FUSED_LAYERS, ids=lambda ls: f"{len(ls)}x{ls[0][1]}")
@pytest.mark.parametrize("mode", list(FUSED_MODES))
@pytest.mark.parametrize("xdtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_packed_linear_fused_matches_reference(layers, mode, xdtype, m, device):
    # K = 1..4 over the (m, layers) cases, every K at every m somewhere
    k = 1 + (m + FUSED_LAYERS.index(layers)) % 4
    for bias, prefetch in ((True, False), (False, False), (True, True)):
        x, packed, g, h, b, kw = _fused_inputs(layers, mode, m, xdtype, device, bias, k=k)
        ys = rabit.packed_linear_fused(x, packed, g, h, b, **kw, prefetch_weights=prefetch)
        _assert_fused_close(ys, x, packed, g, h, b, kw, f"{mode} K={k} bias {bias} prefetch {prefetch}")


def _assert_fused_close(ys, x, packed, g, h, b, kw, what):
    """ys against rabit.reference.packed_linear_fused by the 2x rule (float64 oracle, float32 floor)."""
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    args = (x.cpu(), [p.cpu() for p in packed], [t.cpu() for t in g], [t.cpu() for t in h],
            [t.cpu() for t in b] if b else ())
    kwc = {k: cpu(v) if k != "eps" else v for k, v in kw.items()}
    # from 2 rows on, CUDA's fp16 decode kernel rounds h * u to fp16 (the CUDA-core one of narrow layers does not:
    # held to the same looser bound)
    low = R.packed_linear_fused(*args, **kwc, xh_fp16=cuda_rounds_xh_to_fp16(x.device, x.dtype, x.shape[0]))
    ref = R.packed_linear_fused(*args, **kwc, compute_dtype=torch.float64)
    assert len(ys) == len(packed)
    for i, y in enumerate(ys):
        assert y.dtype == x.dtype and y.shape == (x.shape[0], packed[i].shape[1])
        terms = _fused_terms(x, g[i], h[i], b[i] if b else None, kw)
        assert_float_close(y.cpu(), low[i], ref[i], f"{what} layer {i}", terms, 2 * x.shape[1])


def test_packed_linear_fused_group_is_its_layers_and_float32_on_cpu(device):
    """A layer's output does not depend on the other layers of the call (bit for bit); on the CPU float32 x works."""
    for layers, mode in itertools.product(([(17, 300), (40, 300), (5, 300)], [(17, 2100), (40, 2100), (5, 2100)]),
                                          ("norm", "up", "plain")):
        x, packed, g, h, b, kw = _fused_inputs(layers, mode, 3, torch.float16, device, True)
        ys = rabit.packed_linear_fused(x, packed, g, h, b, **kw)
        for i in range(3):
            alone = rabit.packed_linear_fused(x, [packed[i]], [g[i]], [h[i]], [b[i]], **kw)[0]
            assert torch.equal(ys[i], alone), f"{mode} layer {i}"
            # the early parameter loads change when they happen, not what is computed
            early = rabit.packed_linear_fused(x, [packed[i]], [g[i]], [h[i]], [b[i]], **kw, prefetch_weights=True)[0]
            assert torch.equal(ys[i], early), f"{mode} layer {i} prefetch"
    if device == "cpu":
        x, packed, g, h, b, kw = _fused_inputs(layers[:1], "all", 2, torch.float32, device, True)
        y = rabit.packed_linear_fused(x, packed, g, h, b, **kw)[0]
        ref = R.packed_linear_fused(x, packed, g, h, b, **kw, compute_dtype=torch.float64)[0]
        assert y.dtype == torch.float32 and (y.double() - ref).norm() / ref.norm() < 1e-5


def test_packed_linear_fused_chain_reads_its_input_after_the_kernel_ahead(device):
    """Two calls back to back, the second reading the first's output as x and up (a decoder's chain), with early
    parameter loads and no synchronisation, equal the same calls with a synchronisation between them: x, up and the
    residual are read only after the kernel ahead has finished."""
    (pa, ga, ha, ba), = _group_args([(300, 600)], 2, device)
    (pb, gb, hb, bb), = _group_args([(200, 300)], 2, device)
    nw = torch.rand(600, device=device).half() + 0.5
    x = torch.randn(3, 600, device=device).half()
    res = torch.randn(3, 200, device=device).half()

    def chain(prefetch, sync):
        y = rabit.packed_linear_fused(x, [pa], [ga], [ha], [ba], norm_weight=nw, prefetch_weights=prefetch)[0]
        if sync and device == "cuda":
            torch.cuda.synchronize()
        return rabit.packed_linear_fused(y, [pb], [gb], [hb], [bb], up=y.flip(0).contiguous(), residual=res,
                                         prefetch_weights=prefetch)[0]

    want = chain(False, True)
    for _ in range(20):
        assert torch.equal(chain(True, False), want)


def test_packed_linear_ops_take_an_empty_x(device):
    x, packed, g, h, b, kw = _fused_inputs([(5, 40), (7, 40)], "norm", 2, torch.float16, device, True)
    ys = rabit.packed_linear_fused(x[:0], packed, g, h, b, norm_weight=kw["norm_weight"])
    assert [tuple(y.shape) for y in ys] == [(0, 5), (0, 7)]
    for xdtype in FLOAT_DTYPES:
        assert rabit.packed_linear(x[:0].to(xdtype), packed[0], g[0], h[0], b[0]).shape == (0, 5)


@pytest.mark.parametrize("m", [1, 3, 17, 40])
def test_packed_linear_nonfinite_input_poisons_only_its_row(m, device):
    """An Inf or NaN in a row of x makes every output of that row non-finite and leaves the other rows finite, on every
    kernel path (CPU lookup tables below 32 rows and the dense GEMM from 32; CUDA decode kernels up to 16 rows and the
    prefill above). Which non-finite value comes out is not pinned: summing the paths first (the GEMM on Ŵ) turns one
    Inf into ±Inf where adding the paths' ±Inf afterwards (the reference, the tables) gives NaN."""
    torch.manual_seed(m)
    w, g, h = random_layer(37, 300, 2, device=device)
    _, packed = rabit.residual_binarize(w, g, h)
    for bad, dtype in itertools.product((float("inf"), float("-inf"), float("nan")), FLOAT_DTYPES):
        x = torch.randn(m, 300, device=device).to(dtype)
        r = m // 2
        x[r, 123] = bad
        y = rabit.packed_linear(x, packed, g, h)
        assert not y[r].isfinite().any(), (bad, dtype)
        assert y[torch.arange(m, device=device) != r].isfinite().all(), (bad, dtype)


def test_packed_linear_fused_nonfinite_input_makes_its_row_nan(device):
    for in_features, mode in itertools.product((600, 4100), ("norm", "swiglu+residual", "plain")):
        x, packed, g, h, b, kw = _fused_inputs([(40, in_features)], mode, 3, torch.float16, device, True)
        x[1, 77] = float("nan")
        y = rabit.packed_linear_fused(x, packed, g, h, b, **kw)[0]
        assert y[1].isnan().all(), (in_features, mode)
        assert y[[0, 2]].isfinite().all(), (in_features, mode)


def test_packed_linear_fused_errors(device):
    x, packed, g, h, b, kw = _fused_inputs([(5, 40), (7, 40)], "norm", 2, torch.float16, device, False)
    with pytest.raises(ValueError, match=r"a residual is added to a single layer's output, got 2 layers"):
        rabit.packed_linear_fused(x, packed, g, h, residual=torch.randn(2, 5, device=device).half())
    with pytest.raises(ValueError, match=r"norm_weight must be \[in=40\]"):
        rabit.packed_linear_fused(x, packed, g, h, norm_weight=torch.ones(41, device=device))
    with pytest.raises(ValueError, match=r"up must have x's shape"):
        rabit.packed_linear_fused(x, packed, g, h, up=torch.randn(3, 40, device=device).half())
    with pytest.raises(TypeError, match=r"up must have x's dtype"):
        rabit.packed_linear_fused(x, packed, g, h, up=torch.randn(2, 40, device=device))
    with pytest.raises(ValueError, match=r"residual must be \[M=2, out=5\]"):
        rabit.packed_linear_fused(x, packed[:1], g[:1], h[:1], residual=torch.randn(2, 7, device=device).half())
    with pytest.raises(ValueError, match=r"eps must be finite and >= 0"):
        rabit.packed_linear_fused(x, packed, g, h, norm_weight=kw["norm_weight"], eps=-1.0)
    with pytest.raises(ValueError, match=r"eps must be finite and >= 0"):
        rabit.packed_linear_fused(x, packed, g, h, norm_weight=kw["norm_weight"], eps=float("nan"))
    with pytest.raises(TypeError, match=r"expected norm_weight to be float32, float16 or bfloat16, got Int"):
        rabit.packed_linear_fused(x, packed, g, h, norm_weight=torch.ones(40, device=device, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"expected norm_weight to be contiguous"):
        rabit.packed_linear_fused(x, packed, g, h, norm_weight=torch.ones(80, device=device)[::2])
    with pytest.raises(ValueError, match=r"expected up to be contiguous"):
        rabit.packed_linear_fused(x, packed, g, h, up=torch.randn(40, 2, device=device).half().T)
    with pytest.raises(TypeError, match=r"residual must have x's dtype"):
        rabit.packed_linear_fused(x, packed[:1], g[:1], h[:1], residual=torch.randn(2, 5, device=device))
    with pytest.raises(ValueError,
                       match=r"\(layer 1\): x is \[\d+, 40\] but h is \[2, 70\]; x must be \[M, in\] with the layer's in=70"):
        rabit.packed_linear_fused(x, packed, g, [h[0], torch.rand(2, 70, device=device)])
    with pytest.raises(RuntimeError, match="no backward"):
        rabit.packed_linear_fused(x, packed, [g[0].requires_grad_(), g[1]], h)
    g[0].requires_grad_(False)
    if device == "cuda":  # outside the fused kernels: an error, not another kernel
        with pytest.raises(TypeError, match="float16 or bfloat16 x, got float32"):
            rabit.packed_linear_fused(x.float(), packed, g, h)
        with pytest.raises(ValueError, match="take 1..4 rows of x, got x \\[5, 40\\]"):
            rabit.packed_linear_fused(torch.randn(5, 40, device=device).half(), packed, g, h)
        (p2, g2, h2, _), = _group_args([(5, 32769)], 1, device, bias=False)
        x2 = torch.randn(1, 32769, device=device).half()
        with pytest.raises(ValueError, match="the fused RMSNorm takes at most 32768 columns"):
            rabit.packed_linear_fused(x2, [p2], [g2], [h2], norm_weight=torch.ones(32769, device=device))
        kw2 = {"norm_weight": None, "eps": 1e-6, "up": x2.flip(1).contiguous(), "residual": None}
        y2 = rabit.packed_linear_fused(x2, [p2], [g2], [h2], **kw2)  # no norm: no bound
        _assert_fused_close(y2, x2, [p2], [g2], [h2], None, kw2, "32769 columns, up only")
        (p3, g3, h3, _), = _group_args([(6, 40)], 3, device, bias=False)
        with pytest.raises(ValueError, match="the layers must share K, got 2 and 3"):
            rabit.packed_linear_fused(x, [packed[0], p3], [g[0], g3], [h[0], h3])
        with pytest.raises(TypeError, match="must share their dtypes .* layer 1 has Float"):
            rabit.packed_linear_fused(x, packed, [g[0], g[1].float()], h)
        with pytest.raises(ValueError, match="x is on cuda"):
            rabit.packed_linear_fused(x, packed, g, h, up=x.cpu())


def test_round_activations_f16_scales_each_group_by_a_power_of_two():
    """The reference of the CUDA fp16 decode kernel: per row, path and 512-column group, h*x rounded to fp16 after
    a power-of-two scaling, so it is scale-invariant, never overflows or underflows, rounds to 11 significant bits,
    and a group does not depend on the others."""
    torch.manual_seed(0)
    x, h = torch.randn(3, 1100), torch.rand(2, 1100) + 0.2
    r = R.round_activations_f16(x, h)
    xh = x[None] * h[:, None]
    assert r.shape == (2, 3, 1100) and r.dtype == torch.float32
    for e in (-60, -20, 20, 60):  # fp16 alone would underflow to 0 or overflow to inf at these scales
        assert torch.equal(R.round_activations_f16(x * 2.0**e, h), r * 2.0**e)
    amax = xh[..., :512].abs().amax(-1, keepdim=True)
    normal = xh[..., :512].abs() >= amax * 2.0**-14  # where fp16 keeps all 11 bits
    err = (r[..., :512] - xh[..., :512]).abs()
    assert (err[normal] <= xh[..., :512].abs()[normal] * 2.0**-11).all()
    assert (err > 0).any()  # it does round
    x2 = x.clone()
    x2[:, 512:] *= 1e6  # other groups only
    assert torch.equal(R.round_activations_f16(x2, h)[..., :512], r[..., :512])


def test_packed_linear_equals_dense_product_of_qat_weight():
    w, g, h = random_layer(96, 200, 2)
    what, packed = rabit.residual_binarize(w, g, h)
    x = torch.randn(4, 200)
    y64 = x.double() @ what.double().T
    assert_float_close(rabit.packed_linear(x, packed, g, h), x @ what.T, y64, "packed vs dense",
                       abs_terms(x, g, h, None), 2 * 200)


def _cpu_runs(kernel: str) -> bool:
    """Whether this CPU runs the table kernel `kernel` (set_cpu_kernel refuses one it lacks)."""
    try:
        rabit.set_cpu_kernel(kernel)
        return True
    except RuntimeError:
        return False
    finally:
        rabit.set_cpu_kernel("auto")


@pytest.mark.parametrize("kernel", ["avx2", "avx512"])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_simd_kernel_equals_scalar_kernel_bit_for_bit(kernel, m):
    # every table kernel uses the same tables' values and summation order (kernels/cpu/packed_linear.h); the shapes
    # cover partial row blocks (32 rows for AVX2, 64 for AVX-512), partial 8-word (AVX2) and 16-word (AVX-512) chunks
    # and one-word rows
    if not _cpu_runs(kernel):
        pytest.skip(f"CPU without {kernel}")
    for out, in_features in [(1, 1), (5, 33), (31, 100), (67, 257), (130, 4096), (64, 513), (129, 1000), (33, 480)]:
        w, g, h = random_layer(out, in_features, 2)
        _, packed = rabit.residual_binarize(w, g, h)
        x = torch.randn(m, in_features)
        bias = torch.randn(out)
        try:
            rabit.set_cpu_kernel("ref")
            y_ref = rabit.packed_linear(x, packed, g, h, bias)
            rabit.set_cpu_kernel(kernel)
            y_simd = rabit.packed_linear(x, packed, g, h, bias)
            # the NumPy module's copy of the C core takes the same kernel
            _core.set_cpu_kernel(kernel)
            y_np = _core.packed_linear(x.numpy(), packed.numpy().view("uint32"), g.numpy(), h.numpy(), bias.numpy())
        finally:
            rabit.set_cpu_kernel("auto")
            _core.set_cpu_kernel("auto")
        assert torch.equal(y_ref, y_simd)
        assert torch.equal(torch.from_numpy(y_np), y_ref)


def test_cpu_auto_takes_the_widest_table_kernel():
    expected = "avx512" if _cpu_runs("avx512") else "avx2" if _cpu_runs("avx2") else "ref"
    assert rabit.cpu_kernel() == expected and _core.cpu_kernel() == expected


@pytest.mark.skipif(not _cpu_runs("avx2"), reason="CPU without AVX2")
def test_dequantize_avx2_rows_equal_scalar_rows_bit_for_bit():
    """rabit.dequantize runs the AVX2 row kernel unless "ref" is forced: the same Ŵ, the forward's, at odd widths
    (a scalar tail after the whole words) and K = 1..4."""
    for (out, in_features), k in (((3, 31), 1), ((5, 33), 2), ((17, 257), 3), ((9, 4096), 4)):
        w, g, h = random_layer(out, in_features, k)
        what, packed = rabit.residual_binarize(w, g, h)
        try:
            rabit.set_cpu_kernel("ref")
            scalar = rabit.dequantize(packed, g, h)
        finally:
            rabit.set_cpu_kernel("auto")
        assert torch.equal(scalar, what) and torch.equal(rabit.dequantize(packed, g, h), what)


@pytest.mark.parametrize("sdtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_cpu_packed_linear_reads_half_scales_exactly(sdtype):
    """The CPU packed linear converts fp16 / bf16 g and h to float32 itself (F16C for fp16 where the CPU has it, 8 a
    vector and a scalar tail): the outputs equal those of the same scales given as float32, bit for bit, with
    subnormal, tiny and huge scale values and sizes that leave a tail (K * out, K * in not multiples of 8)."""
    gen = torch.Generator().manual_seed(11)
    for out, in_features, k in [(13, 37, 3), (64, 64, 2), (1, 7, 1), (130, 577, 4)]:
        w = torch.randn(out, in_features, generator=gen)
        g = torch.rand(k, out, generator=gen) + 0.05
        h = torch.rand(k, in_features, generator=gen) + 0.5
        _, packed = rabit.residual_binarize(w, g, h)
        gs, hs = g.to(sdtype), h.to(sdtype)
        tiny = 1e-7 if sdtype == torch.float16 else 1e-30  # fp16: a subnormal
        gs[0, 0], hs[-1, -1], hs[0, :3] = tiny, 3e4, tiny
        x = torch.randn(3, in_features, generator=gen)
        y = rabit.packed_linear(x, packed, gs, hs)
        assert torch.equal(y, rabit.packed_linear(x, packed, gs.float(), hs.float())), (out, in_features, k)


def test_set_cpu_kernel_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown kernel 'sse9'.*'gemm'"):
        rabit.set_cpu_kernel("sse9")


def test_cpu_kernels_lists_the_names_the_core_takes():
    """rabit.CPU_KERNELS (what the benchmarks offer) is the C core's table: each name is known to it (ValueError
    only for unknown names; RuntimeError where this CPU lacks the instructions), and the error lists them all."""
    for name in rabit.CPU_KERNELS:
        try:
            rabit.set_cpu_kernel(name)
        except RuntimeError:
            pass  # known, but not on this CPU
        finally:
            rabit.set_cpu_kernel("auto")
    with pytest.raises(ValueError) as e:
        rabit.set_cpu_kernel("sse9")
    assert sorted(re.findall(r"'(\w+)'", str(e.value))[1:]) == sorted(rabit.CPU_KERNELS)


# (out, in) for the CPU GEMM path: odd sizes; in = 40000 makes tiles of 26 rows (RABIT_CPU_GEMM_TILE_ELEMS // in), so
# out = 60 runs three tiles, the last one partial
GEMM_SHAPES = [(1, 1), (5, 33), (67, 257), (130, 576), (60, 40000)]


@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=shape_id)
@pytest.mark.parametrize("xdtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("m", [1, 7, 32, 45])
def test_cpu_gemm_path_matches_reference(shape, xdtype, m):
    """Ŵ dequantized tile by tile into ATen's GEMM (forced here at every M): the reference by the 2x rule, with and
    without bias, float32 and fp16 scales."""
    k = 2
    w, g, h = random_layer(*shape, k)
    _, packed = rabit.residual_binarize(w, g, h)
    x = torch.randn(m, shape[1]).to(xdtype)
    bias = torch.randn(shape[0]) if m % 2 else None
    try:
        rabit.set_cpu_kernel("gemm")
        assert rabit.cpu_kernel() == "gemm"
        for scales in (torch.float32, torch.float16):
            gs, hs = g.to(scales), h.to(scales)
            y = rabit.packed_linear(x, packed, gs, hs, bias)
            assert y.dtype == xdtype and y.shape == (m, shape[0])
            args = (x, packed, gs, hs, bias)
            assert_float_close(y, R.packed_linear(*args), R.packed_linear(*args, compute_dtype=torch.float64),
                               "packed_linear (gemm)", abs_terms(x, gs, hs, bias), k * shape[1])
    finally:
        rabit.set_cpu_kernel("auto")


def test_cpu_gemm_path_multiplies_by_the_forwards_what_exactly():
    """x = the identity (one-hot rows): the GEMM path returns Ŵ's columns bit for bit, through every tile (in = 40000:
    tiles of 26 rows, three for out = 60), in the torch op and in the NumPy module."""
    w, g, h = random_layer(60, 40000, 2)
    what, packed = rabit.residual_binarize(w, g, h)
    cols = torch.tensor([0, 1, 7, 31, 32, 33, 999, 20000, 39968, 39999] * 4)  # 40 rows: auto takes the GEMM too
    x = torch.nn.functional.one_hot(cols, 40000).float()
    packed_n = packed.numpy().view("uint32")
    for kernel in ("gemm", "auto"):
        try:
            rabit.set_cpu_kernel(kernel)
            _core.set_cpu_kernel(kernel)
            y = rabit.packed_linear(x, packed, g, h)
            y_n = _core.packed_linear(x.numpy(), packed_n, g.numpy(), h.numpy())
        finally:
            rabit.set_cpu_kernel("auto")
            _core.set_cpu_kernel("auto")
        assert torch.equal(y, what[:, cols].T)
        assert torch.equal(torch.from_numpy(y_n), what[:, cols].T)


def test_cpu_auto_takes_tables_below_32_rows_and_the_gemm_from_32():
    """The default dispatch: the table kernel's bits below 32 rows of x, the GEMM's from 32 (each compared with the
    forced implementation), and the two agree to float32 rounding."""
    assert rabit.CPU_GEMM_MIN_ROWS == _core.CPU_GEMM_MIN_ROWS == 32
    w, g, h = random_layer(300, 700, 2)
    _, packed = rabit.residual_binarize(w, g, h)
    table = rabit.cpu_kernel()  # under "auto": the table kernel it runs below 32 rows
    for m in (31, 32, 100):
        x = torch.randn(m, 700)
        bias = torch.randn(300)
        auto = rabit.packed_linear(x, packed, g, h, bias)
        try:
            forced = {}
            for name in (table, "gemm"):
                rabit.set_cpu_kernel(name)
                forced[name] = rabit.packed_linear(x, packed, g, h, bias)
        finally:
            rabit.set_cpu_kernel("auto")
        assert torch.equal(auto, forced["gemm" if m >= 32 else table])
        assert not torch.equal(forced["gemm"], forced[table])  # two summation orders: they are told apart
        # float32 rounding at the outputs' scale (an element near 0 is a cancellation, not a relative measure)
        scale = float(forced[table].abs().max())
        torch.testing.assert_close(forced["gemm"], forced[table], rtol=0, atol=1e-6 * scale)


# ---------------------------------------------------------------- opcheck / gradcheck
def _decode_layers_samples():
    """rabit.decode_layers on one layer (hidden 32, 4 heads of 8, 2 KV heads, MLP 40, batch 2) with float32 tables and
    with int8 layouts (and q/k/v biases)."""
    hidden, H, Hkv, D, inter, S = 32, 4, 2, 8, 40, 10
    shapes = [(H * D, hidden), (Hkv * D, hidden), (Hkv * D, hidden), (hidden, H * D), (inter, hidden),
              (inter, hidden), (hidden, inter)]
    weights, layouts = [torch.rand(hidden) + 0.5, torch.rand(hidden) + 0.5], []
    for out, inn in shapes:
        w, g, h = random_layer(out, inn, 2)
        packed = rabit.residual_binarize(w, g, h)[1]
        weights += [packed, g, h.half()]
        layouts.append(rabit.i8_layout(packed, inn))
    i8 = list(weights)
    for j, lay in enumerate(layouts):
        i8[2 + 3 * j] = lay
    bias = [torch.randn(out) for out, _ in shapes[:3]] + [torch.empty(0)] * 4
    args = (torch.randn(1, 2, Hkv, S, D), torch.randn(1, 2, Hkv, S, D), torch.randn(S, D), torch.randn(S, D),
            torch.tensor([4]), H, D ** -0.5)
    return [(torch.ops.rabit.decode_layers.default, (torch.randn(2, hidden), weights, [], [1e-6, 1e-5], *args, False)),
            (torch.ops.rabit.decode_layers.default, (torch.randn(2, hidden), i8, bias, [1e-5, 1e-6], *args, True))]


def _opcheck_samples(device):
    w, g, h = random_layer(7, 45, 2, torch.float32, device)
    w2, g2, h2 = random_layer(3, 64, 3, torch.bfloat16, device)
    _, packed = rabit.residual_binarize(w, g, h)
    _, packed2 = rabit.residual_binarize(w2, g2, h2)
    grad = torch.randn_like(w)
    x = torch.randn(4, 45, device=device)
    rb = torch.ops.rabit.residual_binarize.default
    # the int8 activation class: on CUDA one row of fp16/bf16 x (a layer group or one row of the fused glue)
    i8_cuda = [
        (torch.ops.rabit.i8_layout.default, (packed, 45)),
        (torch.ops.rabit.packed_linear_i8.default,
         (x.half(), rabit.i8_layout(packed, 45), g, h.half(), torch.randn(7, device=device))),
        (torch.ops.rabit.packed_linear_fused_i8.default,
         (x[:1].bfloat16(), [packed] * 2, [g, g], [h, h], [], torch.rand(45, device=device) + 0.5, 1e-5, None, None)),
        (torch.ops.rabit.packed_linear_fused_i8.default,
         (x[:1].half(), [packed], [g], [h], [torch.randn(7, device=device).half()], None, 1e-6, x[:1].half() * 0.5,
          torch.randn(1, 7, device=device).half())),
    ]
    # the int8 tables, the int8 head and the one-call step run on the CPU only
    i8 = i8_cuda if torch.device(device).type != "cpu" else [
        (torch.ops.rabit.i8_layout.default, (packed, 45)),
        (torch.ops.rabit.packed_linear_i8.default,
         (x.half(), rabit.i8_layout(packed, 45), g, h.half(), torch.randn(7, device=device))),
        (torch.ops.rabit.packed_linear_fused_i8.default,
         (x.bfloat16(), [rabit.i8_layout(packed, 45)] * 2, [g, g], [h, h], [], torch.rand(45) + 0.5, 1e-5, None,
          None)),
        (torch.ops.rabit.packed_linear_fused_i8.default,
         (x, [rabit.i8_layout(packed, 45)], [g], [h], [torch.randn(7)], None, 1e-6, x * 0.5, torch.randn(4, 7))),
        *_decode_layers_samples(),
        (torch.ops.rabit.int8_weight.default, (w.detach().bfloat16(),)),
        (torch.ops.rabit.int8_linear.default, (x.half(), *rabit.int8_weight(w.detach()), 7, torch.randn(7))),
        (torch.ops.rabit.int8_linear.default, (x, *rabit.int8_weight(w.detach()), 7, None)),
    ]
    return i8 + [
        (rb, (w, g, h, None, "identity", 1.0)),
        (rb, (w.requires_grad_(), g.clone().requires_grad_(), h.clone().requires_grad_(), None, "clipped", 2.0)),
        (rb, (w2, g2, h2, torch.float16, "tanh", 0.5)),
        (torch.ops.rabit.residual_binarize_backward.default, (grad, w.detach(), g, h, packed, "identity", 1.0)),
        (torch.ops.rabit.residual_binarize_backward.default, (torch.randn(3, 64, device=device).bfloat16(), w2, g2, h2, packed2, "tanh", 0.3)),
        (torch.ops.rabit.scale_grads.default, (grad, g, h, packed)),
        (torch.ops.rabit.scale_grads.default, (torch.randn(3, 64, device=device).half(), g2.bfloat16(), h2, packed2)),
        (torch.ops.rabit.pack_signs.default, (torch.randn(2, 3, 70, device=device),)),
        (torch.ops.rabit.unpack_signs.default, (packed, 45, torch.bfloat16)),
        (torch.ops.rabit.dequantize.default, (packed, g, h, torch.float16)),
        (torch.ops.rabit.dequantize.default, (packed2, g2.bfloat16(), h2, None)),
        (torch.ops.rabit.packed_linear.default, (x, packed, g, h, None)),
        (torch.ops.rabit.packed_linear.default,
         (x.clone().requires_grad_(), packed, g.clone().requires_grad_(), h.half(), torch.randn(7, device=device))),
        (torch.ops.rabit.packed_linear_group.default,
         (x.half(), [packed, packed], [g.half(), g.half()], [h, h], [])),
        (torch.ops.rabit.packed_linear_group.default,
         (x.clone().requires_grad_(), [packed, packed], [g.clone().requires_grad_(), g], [h, h.clone().requires_grad_()],
          [torch.randn(7, device=device), torch.randn(7, device=device).requires_grad_()])),
        (torch.ops.rabit.packed_linear_fused.default,
         (x.half(), [packed, packed], [g.half(), g.half()], [h, h], [], torch.rand(45, device=device).half() + 0.5,
          1e-5, None, None)),
        (torch.ops.rabit.packed_linear_fused.default,
         (x.bfloat16(), [packed], [g], [h], [torch.randn(7, device=device)], None, 1e-6, x.bfloat16() * 0.5,
          torch.randn(4, 7, device=device).bfloat16(), True)),
        (torch.ops.rabit.decode_attention.default,
         (torch.randn(2, 6, 16, device=device).half(), torch.randn(2, 3, 16, device=device).half(),
          torch.randn(2, 3, 16, device=device).half(), torch.randn(2, 3, 140, 16, device=device).half(),
          torch.randn(2, 3, 140, 16, device=device).half(), torch.randn(140, 16, device=device).half(),
          torch.randn(140, 16, device=device).half(), torch.tensor([133], device=device), 0.25)),
    ]


def test_opcheck_every_op(device):
    for op, args in _opcheck_samples(device):
        torch.library.opcheck(op, args)


def test_every_op_has_an_opcheck_sample():
    tested = {op.name() for op, _ in _opcheck_samples("cpu")}
    registered = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("rabit::")}
    assert len(registered) >= 7 and tested == registered


# The kernels compute in float32, so gradcheck runs in float32. It is exact where it applies:
# with B held fixed, Ŵ is bilinear in (g_k, h_k) of the LAST path and packed_linear is linear in each
# of x, g, h, bias, so central differences have no truncation error at any step size; a large eps
# makes float32 rounding negligible. (Perturbing an earlier path's scales would flip later signs:
# there the op's derivative holds B constant by definition, so finite differences do not apply.)
GC = dict(eps=0.25, atol=2e-4, rtol=2e-3, nondet_tol=0.0)
float32_gradcheck = pytest.mark.filterwarnings("ignore:Input #.* is not a double precision")


@float32_gradcheck
def test_gradcheck_scales_of_last_path(device):
    for k in (1, 2):
        w, g, h = random_layer(5, 37, k, torch.float32, device)

        def f(g_last, h_last):
            gg = torch.cat([g[:-1], g_last[None]])
            hh = torch.cat([h[:-1], h_last[None]])
            return rabit.residual_binarize(w, gg, hh)[0]

        assert torch.autograd.gradcheck(f, (g[-1].clone().requires_grad_(), h[-1].clone().requires_grad_()), **GC)


@float32_gradcheck
def test_gradcheck_packed_linear(device):
    w, g, h = random_layer(6, 41, 2, torch.float32, device)
    _, packed = rabit.residual_binarize(w, g, h)
    inputs = (torch.randn(3, 41, device=device), g.clone(), h.clone(), torch.randn(6, device=device))
    for i in range(4):  # one input at a time: the op is linear in each one
        args = [t.clone().requires_grad_(j == i) for j, t in enumerate(inputs)]
        assert torch.autograd.gradcheck(
            lambda *a: rabit.packed_linear(a[0], packed, a[1], a[2], a[3]), tuple(args), **GC)


# ---------------------------------------------------------------- dequantize: Ŵ from the planes
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_dequantize_is_residual_binarize_what(shape, k, device):
    w, g, h = random_layer(*shape, k, torch.float32, device)
    for odt in FLOAT_DTYPES:
        what, packed = rabit.residual_binarize(w, g, h, odt)
        assert torch.equal(rabit.dequantize(packed, g, h, odt), what), f"Ŵ ({odt}) is not the forward's"
    # scales in other dtypes are used as float32, like every op
    assert torch.equal(rabit.dequantize(packed, g.half(), h.bfloat16()),
                       R.dequantize(R.unpack_signs(packed.cpu(), shape[1]), g.half().cpu(), h.bfloat16().cpu()).to(device))


def test_dequantize_wide_rows(device):
    """Rows over several blocks of the CUDA kernel (1,024 columns each), with and without its 16-byte path."""
    for out, in_features in [(70, 1032), (129, 2048), (3, 2601)]:
        w, g, h = random_layer(out, in_features, 2, torch.float32, device)
        for odt in FLOAT_DTYPES:
            what, packed = rabit.residual_binarize(w, g, h, odt)
            assert torch.equal(rabit.dequantize(packed, g, h, odt), what), f"{out}x{in_features} {odt}"
        # h a view at an offset of one float: the kernel must not take the 16-byte path
        h_off = torch.cat([torch.zeros(1, device=device), h.flatten()])[1:].view_as(h)
        what, packed = rabit.residual_binarize(w, g, h_off, torch.float16)
        assert torch.equal(rabit.dequantize(packed, g, h_off, torch.float16), what)


def test_dequantize_errors(device):
    w, g, h = random_layer(5, 40, 2, torch.float32, device)
    _, packed = rabit.residual_binarize(w, g, h)
    with pytest.raises(TypeError, match="int32 words"):
        rabit.dequantize(packed.float(), g, h)
    with pytest.raises(ValueError, match=r"packed is \[2, 5, 2\] but K=2, out=5, in=70 need \[2, 5, 3\]"):
        rabit.dequantize(packed, g, torch.rand(2, 70, device=device))
    with pytest.raises(ValueError, match="g has 3 paths but h has 2"):
        rabit.dequantize(packed, torch.rand(3, 5, device=device), h)


@pytest.mark.parametrize("more", ["packed", "scales"])
def test_packed_ops_check_packed_against_the_scales_k(more, device):
    """packed's K is checked against g and h's: with K taken from packed, a packed of 2 paths and scales of 1 made the
    kernels read past g and h (garbage or out-of-bounds), and the other way round ignored g[1], h[1]."""
    w, g, h = random_layer(8, 40, 2, torch.float32, device)
    _, packed = rabit.residual_binarize(w, g, h)
    if more == "packed":  # packed K=2, scales K=1
        p, gs, hs, want = packed, g[:1].contiguous(), h[:1].contiguous(), r"packed is \[2, 8, 2\] but K=1"
    else:  # packed K=1, scales K=2
        p, gs, hs, want = packed[:1].contiguous(), g, h, r"packed is \[1, 8, 2\] but K=2"
    x = torch.randn(3, 40, device=device)
    with pytest.raises(ValueError, match=want):
        rabit.packed_linear(x, p, gs, hs)
    with pytest.raises(ValueError, match=want):
        rabit.dequantize(p, gs, hs)
    with pytest.raises(ValueError, match=r"\(layer 0\): " + want):
        rabit.packed_linear_group(x, [p], [gs], [hs])
    with pytest.raises(ValueError, match=want):
        rabit.packed_linear_fused(x, [p], [gs], [hs])


@pytest.mark.parametrize("lead", [(0,), (0, 3), (2, 0)])
def test_pack_and_unpack_take_no_rows(lead, device):
    """Zero rows give empty results of the reference's shape (the kernels refused the null data pointer)."""
    signs = torch.randn(*lead, 37, device=device)
    packed = rabit.pack_signs(signs)
    assert packed.shape == R.pack_signs(signs.cpu()).shape == (*lead, 2) and packed.dtype == torch.int32
    back = rabit.unpack_signs(packed, 37)
    assert back.shape == signs.shape and back.device == signs.device


# Each native op's shape check, raised in a fresh process so that a crash fails one test instead of killing the run.
# A build that linked a private static copy of libstdc++ into rabit._C (a compiler with only libstdc++.a, on the
# GPU machine) crashed with SIGSEGV on exactly these: the first message that formats an integer (setup.py links the
# C++ runtime torch uses since then).
SHAPE_ERROR_CALLS = {
    "packed_linear": ("rabit.packed_linear(torch.randn(2, 70, device=D).half(), packed, g, h70)",
                      "packed is [2, 5, 2] but K=2, out=5, in=70 need [2, 5, 3]"),
    "residual_binarize_backward": ("rabit.residual_binarize_backward(torch.randn(5, 70, device=D), "
                                   "torch.randn(5, 70, device=D), g, h70, packed)", "70"),
    "unpack_signs": ("rabit.unpack_signs(packed, 70)", "70"),
    "dequantize": ("rabit.dequantize(packed, g, h70)", "70"),
    "residual_binarize": ("rabit.residual_binarize(w, torch.rand(3, 5, device=D), h)", "g has 3 paths but h has 2"),
    "packed_linear_group": ("rabit.packed_linear_group(torch.randn(1, 40, device=D).half(), [packed, packed], [g, g], "
                            "[h, h70])",
                            " (layer 1): x is [1, 40] but h is [2, 70]; x must be [M, in] with the layer's in=70"),
}


@pytest.mark.parametrize("op", sorted(SHAPE_ERROR_CALLS))
def test_shape_errors_raise_in_a_fresh_process(op, device):
    stmt, fragment = SHAPE_ERROR_CALLS[op]
    code = (f"import torch, rabit\nD = {device!r}\n"
            "w = torch.randn(5, 40, device=D); g = torch.rand(2, 5, device=D) + 0.1\n"
            "h = torch.rand(2, 40, device=D) + 0.5; h70 = torch.rand(2, 70, device=D)\n"
            "_, packed = rabit.residual_binarize(w, g, h)\n"
            f"try:\n    {stmt}\nexcept ValueError as e:\n    print('ValueError', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"the process died (rc {r.returncode}) instead of raising ValueError: {r.stderr[-800:]}"
    assert r.stdout.startswith(f"ValueError rabit.{op}") and fragment in r.stdout, r.stdout


# ---------------------------------------------------------------- qat_linear: one op for the QAT layer
def _unfused_qat_linear(x, w, g, h, bias, ste, ste_param):
    what, _ = rabit.residual_binarize(w, g, h, x.dtype, ste, ste_param)
    return torch.nn.functional.linear(x, what, bias)


@pytest.mark.parametrize("shape", [(1, 1), (7, 31), (13, 95), (64, 129), (33, 256)], ids=shape_id)
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("xdtype", FLOAT_DTYPES, ids=dtype_id)
def test_qat_linear_matches_residual_binarize_then_linear(shape, k, xdtype, device):
    out, in_features = shape
    for lead, bias_on, ste in (((5,), True, "identity"), ((2, 3), False, "clipped"), ((4,), True, "tanh")):
        w, g, h = random_layer(out, in_features, k, torch.float32, device)
        x = torch.randn(*lead, in_features, device=device).to(xdtype)
        bias = torch.randn(out, device=device).to(xdtype) if bias_on else None
        leaves = [t.clone().requires_grad_() for t in (x, w, g, h)] + ([bias.clone().requires_grad_()] if bias_on else [])
        ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]

        def split(ts):
            return ts[:4] + [ts[4] if bias_on else None]

        y = rabit.qat_linear(*split(leaves), ste, 1.5)
        y_ref = _unfused_qat_linear(*split(ref_leaves), ste, 1.5)
        assert y.dtype == xdtype and y.shape == (*lead, out)
        assert torch.equal(y, y_ref), "forward differs from residual_binarize + F.linear"
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, leaves, dy)
        ref_grads = torch.autograd.grad(y_ref, ref_leaves, dy)
        # With the identity STE and a float32 latent, qat_linear keeps dŴ = dW in float32 from the GEMM, where the
        # unfused path rounds it to x's dtype first: for fp16/bf16 x its dW, dg, dh are then judged against a float64
        # oracle by the 2x rule (tests/helpers.py), with the unfused path as the low-precision reference.
        f32_dwhat = ste == "identity" and xdtype != torch.float32
        if f32_dwhat:
            dwhat64 = dy.reshape(-1, out).double().t().mm(x.reshape(-1, in_features).double()).cpu()
            _, packed = rabit.residual_binarize(w, g, h)
            oracle = dict(zip(["g", "h"], R.scale_grads(dwhat64, g.cpu(), h.cpu(), packed.cpu(), torch.float64)),
                          weight=dwhat64)
        for name, a, b in zip(["x", "weight", "g", "h", "bias"], grads, ref_grads):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            if f32_dwhat and name in oracle:
                assert_float_close(a.cpu(), b.cpu(), oracle[name], f"grad of {name}")
            else:  # the same math; only the order of the GEMM sums may differ (dŴ = dYᵀX instead of (XᵀdY)ᵀ)
                torch.testing.assert_close(a, b, msg=lambda m, name=name: f"grad of {name}: {m}")


def _activation_bytes(fn, keep):
    """Bytes of the tensors autograd keeps from fn()'s forward for its backward, other than those in keep
    (inputs and parameters, which exist anyway), counting each storage once."""
    seen = {}
    kept = {t.untyped_storage().data_ptr() for t in keep}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in kept:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_rabit_linear_keeps_no_what_for_the_backward(xdtype, device):
    """The issue's memory target: a QAT layer keeps at most K bits per weight beyond what nn.Linear keeps."""
    out, in_features, k = 96, 150, 2
    m = rabit.RaBiTLinear(in_features, out, k=k).to(device)
    x = torch.randn(3, 4, in_features, device=device, dtype=xdtype, requires_grad=True)
    keep = [x, *m.parameters()]
    dense = torch.nn.Linear(in_features, out, device=device, dtype=xdtype)
    assert _activation_bytes(lambda: dense(x), [x, *dense.parameters()]) == 0  # nn.Linear keeps only x and W
    budget = k * out * R.words_per_row(in_features) * 4  # the packed planes: K bits per weight
    assert _activation_bytes(lambda: m(x.to(xdtype)), keep) <= budget
    # the check would catch the unfused form, whose F.linear keeps Ŵ (16 or 32 bits per weight) for dX
    unfused = _activation_bytes(lambda: _unfused_qat_linear(x, m.weight, m.g, m.h, m.bias.to(xdtype), "identity",
                                                            1.0), keep)
    assert unfused >= out * in_features * torch.finfo(xdtype).bits // 8 > budget


def test_qat_linear_errors():
    w, g, h = random_layer(6, 20, 2)
    with pytest.raises(ValueError, match=r"x has 21 features in its last dimension but the weight is \(6, 20\)"):
        rabit.qat_linear(torch.randn(3, 21), w, g, h)
    with pytest.raises(ValueError, match="bias must be \\[6\\] in x's dtype torch.float32"):
        rabit.qat_linear(torch.randn(3, 20), w, g, h, torch.randn(6).half())
    with pytest.raises(TypeError, match="expected x to be float32, float16 or bfloat16, got torch.float64"):
        rabit.qat_linear(torch.randn(3, 20, dtype=torch.float64), w, g, h)


@float32_gradcheck
def test_gradcheck_qat_linear(device):
    w, g, h = random_layer(6, 41, 2, torch.float32, device)
    x, bias = torch.randn(3, 41, device=device), torch.randn(6, device=device)

    def f(x_, b_, g_last, h_last):
        return rabit.qat_linear(x_, w, torch.cat([g[:-1], g_last[None]]), torch.cat([h[:-1], h_last[None]]), b_)

    inputs = (x, bias, g[-1], h[-1])
    for i in range(4):  # one input at a time: linear in x and bias, bilinear in the last path's scales
        args = [t.clone().requires_grad_(j == i) for j, t in enumerate(inputs)]
        assert torch.autograd.gradcheck(f, tuple(args), **GC)


def test_ste_gradient_of_weight_is_grad_what(device):
    w, g, h = random_layer(9, 50, 2, torch.float32, device)
    w.requires_grad_()
    what, _ = rabit.residual_binarize(w, g, h)
    upstream = torch.randn_like(what)
    (gw,) = torch.autograd.grad(what, w, upstream)
    assert torch.equal(gw, upstream)  # identity straight-through estimator


# ---------------------------------------------------------------- input errors
def test_errors_name_the_problem():
    w, g, h = random_layer(4, 10, 2)
    with pytest.raises(ValueError, match="expected a 2-D weight, got 3-D"):
        rabit.residual_binarize(w[None], g, h)
    with pytest.raises(ValueError, match="g is .* but the layer has out=4"):
        rabit.residual_binarize(w, g[:, :3], h)
    with pytest.raises(ValueError, match="h is .* but the layer has in=10"):
        rabit.residual_binarize(w, g, h[:, :9])
    with pytest.raises(ValueError, match="K=5 paths"):
        rabit.residual_binarize(w, torch.ones(5, 4), torch.ones(5, 10))
    with pytest.raises(TypeError, match="expected weight to be float32, float16 or bfloat16, got Long"):
        rabit.residual_binarize(w.long(), g, h)
    with pytest.raises(ValueError, match="contiguous"):
        rabit.residual_binarize(torch.randn(10, 4).T, g, h)
    bad = w.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        rabit.residual_binarize(bad, g, h)
    with pytest.raises(ValueError, match="g contains NaN"):
        rabit.residual_binarize(w, torch.full_like(g, float("inf")), h)
    with pytest.raises(ValueError, match="h contains NaN"):
        rabit.residual_binarize(w, g, torch.full_like(h, float("nan")))
    with pytest.raises(ValueError, match="unknown ste 'sigmoid'"):
        rabit.residual_binarize(w, g, h, None, "sigmoid")
    _, packed = rabit.residual_binarize(w, g, h)
    with pytest.raises(ValueError, match="grad must be"):
        rabit.residual_binarize_backward(torch.randn(4, 11), w, g, h, packed)
    with pytest.raises(TypeError, match="int32 words"):
        rabit.packed_linear(torch.randn(1, 10), packed.float(), g, h)
    with pytest.raises(ValueError, match="expected a 2-D x"):
        rabit.packed_linear(torch.randn(10), packed, g, h)
    with pytest.raises(ValueError, match=r"x is \[1, 12\] but h is \[2, 10\]; x must be \[M, in\] with the layer's in=10"):
        rabit.packed_linear(torch.randn(1, 12), packed, g, h)
    with pytest.raises(ValueError, match="bias has 3 elements but out=4"):
        rabit.packed_linear(torch.randn(1, 10), packed, g, h, torch.zeros(3))
    with pytest.raises(ValueError, match="in_features=33 needs 2"):
        rabit.unpack_signs(packed, 33)


@pytest.mark.parametrize("what", ["weight", "g", "h"])
def test_residual_binarize_without_finite_check_computes_like_the_reference(what, device):
    # check_finite=False (the trainer's mode): no error, and the outputs are those of the plain-PyTorch
    # reference on the same non-finite input (a NaN latent entry takes the sign -1 in every path).
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    w, g, h = torch.randn(7, 45, generator=gen), torch.rand(2, 7, generator=gen) + 0.1, torch.rand(2, 45, generator=gen) + 0.5
    t = {"weight": w, "g": g, "h": h}[what]
    t.view(-1)[3] = float("nan")
    t.view(-1)[5] = float("inf")
    what_k, packed_k = rabit.residual_binarize(w.to(device), g.to(device), h.to(device), check_finite=False)
    what_r, packed_r = R.residual_binarize(w, g, h)
    assert torch.equal(packed_k.cpu(), packed_r)
    torch.testing.assert_close(what_k.cpu(), what_r, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ValueError, match="NaN or Inf"):
        rabit.residual_binarize(w.to(device), g.to(device), h.to(device))


# ---------------------------------------------------------------- shape inference (meta tensors, torch.compile)
def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


@pytest.mark.parametrize("case, call, match", [
    ("int x", lambda: rabit.packed_linear(_meta(2, 40, dtype=torch.int32), _meta(2, 8, 2, dtype=torch.int32),
                                          _meta(2, 8), _meta(2, 40)), "expected x to be float32, float16 or bfloat16"),
    ("word count", lambda: rabit.packed_linear(_meta(2, 40), _meta(2, 8, 3, dtype=torch.int32), _meta(2, 8),
                                               _meta(2, 40)), "packed rows hold 3 words but x has in=40, which needs 2"),
    ("packed dtype", lambda: rabit.packed_linear(_meta(2, 40), _meta(2, 8, 2, dtype=torch.int64), _meta(2, 8),
                                                 _meta(2, 40)), "expected packed to be int32"),
    ("x on another device", lambda: rabit.packed_linear(_meta(2, 40), torch.zeros(2, 8, 2, dtype=torch.int32),
                                                        torch.ones(2, 8), torch.ones(2, 40)), "x is on meta but packed on cpu"),
    ("norm_weight", lambda: rabit.packed_linear_fused(_meta(2, 40), [_meta(2, 8, 2, dtype=torch.int32)], [_meta(2, 8)],
                                                      [_meta(2, 40)], norm_weight=_meta(41)), r"norm_weight must be \[40\]"),
    ("up dtype", lambda: rabit.packed_linear_fused(_meta(2, 40), [_meta(2, 8, 2, dtype=torch.int32)], [_meta(2, 8)],
                                                   [_meta(2, 40)], up=_meta(2, 40, dtype=torch.float16)),
     "up must have x's dtype"),
    ("0-d signs", lambda: rabit.pack_signs(torch.empty((), device="meta")), "expected signs with a non-empty last"),
])
def test_meta_shape_inference_refuses_what_the_kernels_refuse(case, call, match):
    # on the meta device only the fake kernels run: they must not pass what a real call would refuse
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        call()
