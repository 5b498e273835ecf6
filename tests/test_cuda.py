"""CUDA kernels against the CPU kernels and rabit.reference: signs, packed words and Ŵ bit for bit, dW exact
(identity / clipped), dg, dh and packed_linear by the 2x error rule of tests/helpers.py. Skipped without a GPU
(the `cuda` marker; see conftest.py). tests/test_ops.py also runs every op test on "cuda" when it is available."""

import itertools

import pytest
import torch

import rabit
from rabit import reference as R

from helpers import (CUDA_F16_DECODE_MIN_M, CUDA_SIMT_DEFAULT_MAX_IN, CUDA_SIMT_DEFAULT_MAX_M,
                     CUDA_SIMT_DEFAULT_MAX_WEIGHTS, CUDA_SIMT_MAX_IN, CUDA_SIMT_MAX_M, FLOAT_DTYPES, SHAPES,
                     assert_float_close, dtype_id, random_layer, shape_id, tanh_ste_dw_bound)

pytestmark = pytest.mark.cuda

DEV = "cuda"
EXTRA_SHAPES = [(100, 1000), (70, 4099), (19, 512), (33, 2048)]


@pytest.fixture(autouse=True)
def _needs_cuda_kernels():
    if not (torch.cuda.is_available() and torch.ops.rabit.residual_binarize.default.has_kernel_for_dispatch_key("CUDA")):
        pytest.skip("rabit was built without CUDA kernels")


def _poison(nbytes=64 << 20):
    """Fill the caching allocator's free memory with NaN so that an output element the kernel forgets to write
    cannot inherit a correct value from an earlier call."""
    t = torch.full((nbytes // 4,), float("nan"), device=DEV)
    del t


def _layer(shape, k, wdtype, scales=torch.float32):
    w, g, h = random_layer(*shape, k, wdtype)
    return w, g.to(scales), h.to(scales)


# ---------------------------------------------------------------- forward
@pytest.mark.parametrize("shape", SHAPES + EXTRA_SHAPES, ids=shape_id)
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("wdtype", FLOAT_DTYPES, ids=dtype_id)
def test_forward_bit_exact_vs_cpu(shape, k, wdtype):
    w, g, h = random_layer(*shape, k, wdtype)
    for out_dtype in [None, *FLOAT_DTYPES]:
        what_c, packed_c = rabit.residual_binarize(w, g, h, out_dtype)
        _poison()
        what_g, packed_g = rabit.residual_binarize(w.to(DEV), g.to(DEV), h.to(DEV), out_dtype)
        assert what_g.dtype == what_c.dtype and packed_g.dtype == torch.int32
        assert torch.equal(packed_g.cpu(), packed_c), "sign planes differ from the CPU kernel"
        assert torch.equal(what_g.cpu(), what_c), f"Ŵ ({out_dtype}) differs from the CPU kernel"


def test_forward_exact_ties_and_zero_residuals():
    # W built from the scales so that residuals hit exactly 0 (sign(0) = +1) and sit on rounding ties
    out, in_features = 37, 300
    g = torch.rand(3, out) + 0.5
    h = torch.rand(3, in_features) + 0.5
    s = torch.where(torch.rand(out, in_features) < 0.5, -1.0, 1.0)
    w = (g[0][:, None] * s) * h[0][None, :]
    w[::3] = 0.0
    w[1, ::7] = -0.0
    for scales in (torch.float32, torch.float16):
        gs, hs = g.to(scales), h.to(scales)
        what_c, packed_c = rabit.residual_binarize(w, gs, hs)
        what_g, packed_g = rabit.residual_binarize(w.to(DEV), gs.to(DEV), hs.to(DEV))
        assert torch.equal(packed_g.cpu(), packed_c)
        assert torch.equal(what_g.cpu(), what_c)
        assert torch.equal(packed_c, R.residual_binarize(w, gs, hs)[1])


def test_forward_reports_non_finite_like_cpu():
    w, g, h = (t.to(DEV) for t in random_layer(9, 70, 2))
    for bad in (float("nan"), float("inf"), -float("inf")):
        wb = w.clone()
        wb[4, 65] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            rabit.residual_binarize(wb, g, h)
    with pytest.raises(ValueError, match="g contains NaN or Inf"):
        rabit.residual_binarize(w, torch.full_like(g, float("inf")), h)
    hb = h.clone()
    hb[1, 3] = float("nan")
    with pytest.raises(ValueError, match="h contains NaN or Inf"):
        rabit.residual_binarize(w, g, hb)
    rabit.residual_binarize(w, g, h)  # still usable afterwards


# ---------------------------------------------------------------- backward
@pytest.mark.parametrize("shape", SHAPES + EXTRA_SHAPES, ids=shape_id)
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("wdtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("ste", ["identity", "clipped", "tanh"])
def test_backward_vs_cpu_and_reference(shape, k, wdtype, ste):
    w, g, h = random_layer(*shape, k, wdtype)
    gdt = FLOAT_DTYPES[(k + len(ste)) % 3]  # ∂L/∂Ŵ in another dtype than W now and then
    grad = torch.randn(*shape).to(gdt)
    _, packed = rabit.residual_binarize(w, g, h)
    param = 0.7
    dw_c, _, _ = rabit.residual_binarize_backward(grad, w, g, h, packed, ste, param)
    _poison()
    dw, dg, dh = rabit.residual_binarize_backward(*(t.to(DEV) for t in (grad, w, g, h, packed)), ste, param)
    assert dw.dtype == wdtype and dg.dtype == g.dtype and dh.dtype == h.dtype
    if ste == "tanh":
        bound = tanh_ste_dw_bound(grad, dw_c)
        assert ((dw.cpu().float() - dw_c.float()).abs() <= bound).all()
    else:
        assert torch.equal(dw.cpu(), dw_c)
    args = (grad, w, g, h, packed, ste, param)
    _, rdg, rdh = R.residual_binarize_backward(*args)
    _, dg64, dh64 = R.residual_binarize_backward(*args, compute_dtype=torch.float64)
    assert_float_close(dg.cpu(), rdg, dg64, "dg")
    assert_float_close(dh.cpu(), rdh, dh64, "dh")
    # without dW (the kernel's store-free path), the same dg, dh bit for bit
    sdg, sdh = rabit.scale_grads(*(t.to(DEV) for t in (grad, g, h, packed)))
    assert torch.equal(sdg, dg) and torch.equal(sdh, dh)


def test_backward_deterministic_and_half_scales():
    w, g, h = (t.to(DEV) for t in random_layer(300, 520, 3, torch.bfloat16))
    g, h = g.half(), h.half()
    grad = torch.randn(300, 520, device=DEV).bfloat16()
    _, packed = rabit.residual_binarize(w, g, h)
    a = rabit.residual_binarize_backward(grad, w, g, h, packed, "clipped", 1.5)
    b = rabit.residual_binarize_backward(grad, w, g, h, packed, "clipped", 1.5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert a[1].dtype == torch.float16 and a[2].dtype == torch.float16


# ---------------------------------------------------------------- pack / unpack
@pytest.mark.parametrize("shape", SHAPES + EXTRA_SHAPES, ids=shape_id)
def test_pack_unpack_vs_cpu(shape):
    signs = torch.randn(2, *shape)
    signs[0, 0, 0] = 0.0
    signs[1, -1, -1] = -0.0
    p_c = rabit.pack_signs(signs)
    p_g = rabit.pack_signs(signs.to(DEV))
    assert torch.equal(p_g.cpu(), p_c)
    for dt in FLOAT_DTYPES:
        assert torch.equal(rabit.unpack_signs(p_g, shape[1], dt).cpu(), rabit.unpack_signs(p_c, shape[1], dt))
    junk = p_c.clone()
    junk[..., -1] |= -(2 ** 31)  # padding bits set: readers must ignore them
    assert torch.equal(rabit.unpack_signs(junk.to(DEV), shape[1]).cpu(), rabit.unpack_signs(junk, shape[1]))
    assert torch.equal(rabit.pack_signs(signs.to(DEV).to(torch.int8)).cpu(), rabit.pack_signs(signs.to(torch.int8)))


# ---------------------------------------------------------------- packed_linear
def _abs_terms(x, g, h, bias):
    t = sum(g[k].abs().double()[None, :] * (x.abs().double() @ h[k].abs().double())[:, None]
            for k in range(g.shape[0]))
    return t + (bias.abs().double() if bias is not None else 0)


PL_SHAPES = [(1, 1), (3, 33), (7, 31), (13, 95), (31, 127), (64, 129), (33, 257), (100, 1000), (45, 4099),
             (130, 512), (17, 2080)]


# the decode kernels of fp16/bf16 x (M <= 16), forced with RABIT_CUDA_DECODE: the default dispatch picks one of
# these at each M (test_decode_dispatch); b1 gives i8's bits (the bit-for-bit test below); simt runs only where
# M <= CUDA_SIMT_MAX_M and in <= CUDA_SIMT_MAX_IN (elsewhere forcing it leaves the default, test_simt_forced_...)
HALF_DECODE_KERNELS = ("i8", "f16", "simt")


def _decode_kernel_applies(kernel, m, in_features):
    return kernel != "simt" or (m <= CUDA_SIMT_MAX_M and in_features <= CUDA_SIMT_MAX_IN)


def _default_decode_kernel(m, in_features, out):
    """The decode kernel packed_linear takes by default for fp16/bf16 x [m, in] (m <= 16) and out rows (b1: i8's
    bits)."""
    narrow = in_features <= CUDA_SIMT_DEFAULT_MAX_IN and out * in_features <= CUDA_SIMT_DEFAULT_MAX_WEIGHTS
    if narrow and m <= CUDA_SIMT_DEFAULT_MAX_M and _decode_kernel_applies("simt", m, in_features):
        return "simt"
    return "f16" if m >= CUDA_F16_DECODE_MIN_M else "i8"


def _wgmma_runs():
    """The wgmma prefill kernel is built (sm_90a) and this GPU can run it (compute capability 9.0)."""
    return bool(rabit._C.WITH_SM90A) and torch.cuda.get_device_capability() == (9, 0)


def _prefill_kernels():
    """The prefill kernels of fp16/bf16 x (M > 16), forced with RABIT_CUDA_PREFILL (test_prefill_dispatch)."""
    return ("mma", "wgmma") if _wgmma_runs() else ("mma",)


def _half_kernels(m, in_features):
    """(env var, kernel) pairs of the CUDA kernels that may run packed_linear for fp16/bf16 x at this M."""
    if m <= 16:
        return [("RABIT_CUDA_DECODE", k) for k in HALF_DECODE_KERNELS if _decode_kernel_applies(k, m, in_features)]
    # wgmma takes rows of 16-byte-aligned x only (in % 8 == 0)
    return [("RABIT_CUDA_PREFILL", k) for k in _prefill_kernels() if k == "mma" or in_features % 8 == 0]


@pytest.mark.parametrize("shape", PL_SHAPES, ids=shape_id)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8, 16, 17, 64, 200])
@pytest.mark.parametrize("xdtype", FLOAT_DTYPES, ids=dtype_id)
def test_packed_linear_vs_reference(shape, m, xdtype, monkeypatch):
    out, in_features = shape
    k = 1 + (m + out) % 4
    w, g, h = random_layer(out, in_features, k)
    _, packed = rabit.residual_binarize(w, g, h)
    x = torch.randn(m, in_features).to(xdtype)
    kernels = _half_kernels(m, in_features) if xdtype != torch.float32 else [(None, None)]
    for scales, (var, kernel) in itertools.product((torch.float32, torch.float16, torch.bfloat16), kernels):
        gs, hs = g.to(scales), h.to(scales)
        bias = torch.randn(out).to(scales) if (m + len(str(scales))) % 2 else None
        if kernel:
            monkeypatch.setenv(var, kernel)
        _poison()
        y = rabit.packed_linear(x.to(DEV), packed.to(DEV), gs.to(DEV), hs.to(DEV),
                                None if bias is None else bias.to(DEV))
        if kernel:
            monkeypatch.delenv(var)
        assert y.dtype == xdtype and y.shape == (m, out)
        y = y.cpu()
        assert torch.isfinite(y).all()
        args = (x, packed, gs, hs, bias)
        y64 = R.packed_linear(*args, compute_dtype=torch.float64)
        if kernel == "f16":
            # fp16 decode kernel: x*h rounded once to fp16 (per 512-column group, power-of-two scaled)
            assert_float_close(y, R.packed_linear(*args, xh_fp16=True), y64, f"packed_linear f16 m={m}",
                               _abs_terms(x, gs, hs, bias), k * in_features)
        elif xdtype == torch.float32 or m <= 16:
            # integer decode kernels (and float32 x): float32-level accuracy, the rule of tests/test_ops.py
            assert_float_close(y, R.packed_linear(*args), y64, f"packed_linear m={m}",
                               _abs_terms(x, gs, hs, bias), k * in_features)
        else:
            # prefill kernels: a dense tensor-core GEMM on Ŵ held in x's dtype; as accurate as the dense layer
            signs = R.unpack_signs(packed, in_features)
            what_low = R.dequantize(signs, gs, hs).to(xdtype)
            ref_low = x.float() @ what_low.float().T
            if bias is not None:
                ref_low = ref_low + bias.float()
            assert_float_close(y, ref_low.to(xdtype), y64, f"packed_linear prefill m={m}",
                               _abs_terms(x, gs, hs, bias), k * in_features)


def _wide_range_layer(m, xdtype, seed=0):
    """A 300 x 1500 layer and x [m, 1500] that probe the decode kernels' per-group scaling: outliers, one
    |x*h| above fp16's largest value (65504), a small-valued stretch across a group boundary and, in bf16, a row
    of values far below fp16's range (an unscaled fp16 rounding would make that row's output 0)."""
    torch.manual_seed(seed)
    out, in_features = 300, 1500
    w, g, h = random_layer(out, in_features, 2)
    h[:, 5] = 1.1
    _, packed = rabit.residual_binarize(w, g, h)
    g = g * 0.1  # keeps y inside fp16's range despite the 6e4 input
    x = torch.randn(m, in_features)
    x[:, ::97] *= 3e3    # outliers
    x[0, 5] = 6e4        # x*h = 6.6e4 > 65504
    x[m // 2, 600:1100] *= 1e-4  # a small-valued stretch, across a group boundary
    if m >= 3 and xdtype == torch.bfloat16:
        x[m - 2] *= 1e-8  # a whole row of tiny values (fp16 x could not hold them)
    return x.to(xdtype), packed, g, h


# b1 applies to m <= 2 only (m = 4 would run another kernel), simt to m <= 4
@pytest.mark.parametrize("kernel, m", [("b1", 1), ("b1", 2), ("i8", 1), ("i8", 2), ("i8", 4), ("i8", 16),
                                       ("f16", 1), ("f16", 3), ("f16", 9), ("f16", 16),
                                       ("simt", 1), ("simt", 3), ("simt", 4)],
                         ids=lambda v: f"m{v}" if isinstance(v, int) else v)
@pytest.mark.parametrize("xdtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_packed_linear_decode_range_and_nonfinite(xdtype, m, kernel, monkeypatch):
    """The decode kernels scale x*h per 512-column group by a power of two of the group's max: the integer ones
    quantize to 2^-31 of it (outliers and tiny values side by side stay float32-accurate), the fp16 one rounds to
    fp16 at most 2^15 (as rabit.reference.round_activations_f16: no overflow, no underflow of a tiny row); the
    CUDA-core one (simt) sums float32 products. Checked for the whole output and for each row alone. A NaN/Inf input
    makes its output row NaN and leaves the other rows unchanged."""
    monkeypatch.setenv("RABIT_CUDA_DECODE", kernel)
    x, packed, g, h = _wide_range_layer(m, xdtype)
    args = (x, packed, g, h, None)
    y = rabit.packed_linear(x.to(DEV), packed.to(DEV), g.to(DEV), h.to(DEV)).cpu()
    assert torch.isfinite(y).all()
    ref = R.packed_linear(*args, xh_fp16=kernel == "f16")
    y64 = R.packed_linear(*args, compute_dtype=torch.float64)
    terms = _abs_terms(x, g, h, None)
    assert_float_close(y, ref, y64, f"{kernel} decode, wide range", terms, 2 * x.shape[1])
    for r in range(m):
        assert_float_close(y[r:r + 1], ref[r:r + 1], y64[r:r + 1], f"{kernel} decode, wide range, row {r}",
                           terms[r:r + 1], 2 * x.shape[1])
    bad_row = m // 2
    others = [r for r in range(m) if r != bad_row]
    for bad in (float("nan"), float("inf")):
        xb = x.clone()
        xb[bad_row, 777] = bad
        yb = rabit.packed_linear(xb.to(DEV), packed.to(DEV), g.to(DEV), h.to(DEV)).cpu()
        assert torch.isnan(yb[bad_row]).all()
        assert torch.equal(yb[others], y[others])


# beyond PL_SHAPES: more than 8 groups of 512 columns (warps with several groups, a partial last one)
@pytest.mark.parametrize("shape", PL_SHAPES + [(300, 1500), (1000, 4099), (257, 5000), (4096, 4096)], ids=shape_id)
@pytest.mark.parametrize("m", [1, 2], ids=lambda m: f"m{m}")
@pytest.mark.parametrize("xdtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_binary_and_int8_decode_kernels_agree_bit_for_bit(shape, m, xdtype, monkeypatch):
    """RABIT_CUDA_DECODE=b1 / b1p / i8 forces the 1-bit MMA kernel / its persistent schedule (M = 1; the 1-bit kernel
    at M = 2) / the int8 one (M <= 2). All sum the same exact integers and recombine them the same way, so their outputs
    must be identical, bit for bit."""
    out, in_features = shape
    for k in (1, 2, 3, 4):
        w, g, h = random_layer(out, in_features, k)
        _, packed = rabit.residual_binarize(w, g, h)
        x = torch.randn(m, in_features)
        x[:, ::97] *= 3e3
        bias = torch.randn(out, device=DEV) if k % 2 else None
        args = (x.to(xdtype).to(DEV), packed.to(DEV), g.to(DEV), h.to(DEV), bias)
        ys = {}
        for kernel in ("b1", "b1p", "i8"):
            monkeypatch.setenv("RABIT_CUDA_DECODE", kernel)
            _poison()
            ys[kernel] = rabit.packed_linear(*args)
        for kernel in ("b1", "b1p"):
            assert torch.equal(ys[kernel], ys["i8"]), (kernel, k, (ys[kernel].float() - ys["i8"].float()).abs().max())


@pytest.mark.parametrize("xdtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_decode_dispatch(xdtype, monkeypatch):
    """At every M <= 16 the default dispatch gives, bit for bit, the output of the forced kernel that the tests'
    CUDA_F16_DECODE_MIN_M and CUDA_SIMT_* say it takes (and that the accuracy tests above hold to its reference):
    fp16 from that M on, the CUDA-core kernel for small narrow layers below it, else int8 (or the 1-bit kernel, whose
    bits are int8's)."""
    # 1536 / 1537: the widest default simt layer and the narrowest it leaves to int8; 2048 / 2049: where forcing it
    # applies; 2048 x 1536 / 2049 x 1536: the largest default simt layer and one row more; 8200: long enough rows for
    # b1 at m = 1
    for out, in_features in [(300, 1500), (40, 1536), (40, 1537), (40, 2048), (40, 2049), (2048, 1536), (2049, 1536),
                             (64, 8200)]:
        w, g, h = random_layer(out, in_features, 2)
        _, packed = rabit.residual_binarize(w, g, h)
        args = [t.to(DEV) for t in (packed, g.half(), h.half())]
        forcing_works = set()  # each pair of forced kernels must differ somewhere, or the env var was ignored
        for m in range(1, 17):
            x = torch.randn(m, in_features, device=DEV).to(xdtype)
            y = rabit.packed_linear(x, *args)
            forced = {}
            for kernel in HALF_DECODE_KERNELS:
                if _decode_kernel_applies(kernel, m, in_features):
                    monkeypatch.setenv("RABIT_CUDA_DECODE", kernel)
                    forced[kernel] = rabit.packed_linear(x, *args)
            monkeypatch.delenv("RABIT_CUDA_DECODE")
            expect = _default_decode_kernel(m, in_features, out)
            assert torch.equal(y, forced[expect]), (out, in_features, m, expect)
            forcing_works |= {k for k in forced if k != "f16" and not torch.equal(forced[k], forced["f16"])}
        # i8 and simt are both float32-accurate, so their fp16/bf16 outputs may be equal here: the next test tells
        # them apart
        assert forcing_works == ({"i8", "simt"} if in_features <= CUDA_SIMT_MAX_IN else {"i8"}), \
            (out, in_features, forcing_works)


def _probe_x(in_features, m=1):
    """x [m, in] (in >= 512) that tells the CUDA-core kernel from the int8 one for certain: 8192 at columns 0 and 2,
    small values (|v| <= 2^-18) at columns 100..511, zeros elsewhere. With _probe_layer's weights (g = h = 1, K = 1)
    the two 8192s cancel in the rows whose signs at columns 0 and 2 differ; there the int8 kernel, whose quantum is
    2^-31 of the 512-column group's maximum (2^-16), outputs exactly 0, and the CUDA-core kernel the sum of the small
    terms."""
    x = torch.zeros(1, in_features)
    x[0, 0] = x[0, 2] = 8192.0
    x[0, 100:512] = torch.randn(412, generator=torch.Generator().manual_seed(5)).clamp(-4, 4) * 2.0**-20
    return x.repeat(m, 1)


def _probe_layer(out, in_features, seed=5):
    """packed, g, h of a K = 1 layer with g = h = 1 (y = B x), and the rows where _probe_x's 8192s cancel."""
    torch.manual_seed(seed)
    w, g, h = random_layer(out, in_features, 1)
    g, h = torch.ones_like(g), torch.ones_like(h)
    _, packed = rabit.residual_binarize(w, g, h)
    signs = R.unpack_signs(packed, in_features)[0]
    rows = signs[:, 0] != signs[:, 2]
    assert rows.any() and not rows.all()
    return packed, g, h, rows


def _runs_simt(y, rows):
    """Whether packed_linear's output y of _probe_x shows the CUDA-core kernel: a non-zero output in a row where the
    8192s cancel (the int8 kernel gives exactly 0 in all of them)."""
    return bool((y.cpu()[:, rows] != 0).any())


@pytest.mark.parametrize("xdtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_simt_sums_float32_products_where_int8_quantizes(xdtype, monkeypatch):
    """In _probe_x's cancelling rows the int8 kernel's output is exactly 0 and the CUDA-core kernel's the sum of the
    small terms (against float64). So a forced simt runs a kernel of its own, and it does not quantize x*h."""
    packed, g, h, rows = _probe_layer(64, 512)
    assert 10 < rows.sum() < 64 - 10
    x = _probe_x(512).to(xdtype)
    y64 = R.packed_linear(x, packed, g, h, compute_dtype=torch.float64)[0, rows]
    ys = {}
    for kernel in ("i8", "simt"):
        monkeypatch.setenv("RABIT_CUDA_DECODE", kernel)
        ys[kernel] = rabit.packed_linear(x.to(DEV), packed.to(DEV), g.half().to(DEV), h.half().to(DEV)).cpu()[0, rows]
    assert torch.equal(ys["i8"], torch.zeros_like(ys["i8"]))
    assert y64.abs().max() > 2.0**-18  # the small terms do not all vanish
    assert torch.allclose(ys["simt"].double(), y64, rtol=1e-2, atol=2.0**-24), (ys["simt"], y64)


# the bounds of the default (in 1536 / 1537, out x in 3 x 2^20 / one row more) and of forcing it (in 2048 / 2049)
@pytest.mark.parametrize("shape", [(40, 1536), (40, 1537), (40, 2048), (40, 2049), (2048, 1536), (2049, 1536)],
                         ids=shape_id)
@pytest.mark.parametrize("m", [1, 4], ids=lambda m: f"m{m}")
def test_decode_dispatch_takes_simt_exactly_within_its_bounds(shape, m, monkeypatch):
    """The default dispatch takes the CUDA-core kernel exactly where _default_decode_kernel says, and
    RABIT_CUDA_DECODE=simt exactly where _decode_kernel_applies says: told apart from int8 by _probe_x (the accuracy
    tests compare outputs, in which the two float32-accurate kernels can round alike). The probe does not tell the
    fp16 kernel from the CUDA-core one (its fp16 subnormals keep the small terms): where the default is fp16, its
    output is the forced fp16 kernel's, bit for bit."""
    out, in_features = shape
    packed, g, h, rows = _probe_layer(out, in_features)
    args = [t.to(DEV) for t in (_probe_x(in_features, m).half(), packed, g.half(), h.half())]
    expect = _default_decode_kernel(m, in_features, out)
    y = rabit.packed_linear(*args)
    if expect == "f16":
        monkeypatch.setenv("RABIT_CUDA_DECODE", "f16")
        assert torch.equal(y, rabit.packed_linear(*args))
    else:
        assert _runs_simt(y, rows) == (expect == "simt")
    monkeypatch.setenv("RABIT_CUDA_DECODE", "simt")
    if _decode_kernel_applies("simt", m, in_features):
        assert _runs_simt(rabit.packed_linear(*args), rows)
    else:  # the default kernel runs (fp16 at m = 4: the probe cannot tell it from simt)
        assert torch.equal(rabit.packed_linear(*args), y)


# row lengths of each way the CUDA-core kernel lays out a block (32 rows a block up to 512 columns, 16 up to 1024, 8
# beyond; the first two build x*h per warp, the last per block), with partial last words and a single word
@pytest.mark.parametrize("in_features", [20, 33, 512, 513, 576, 1000, 1024, 1025, 1536, 2048], ids=lambda n: f"in{n}")
@pytest.mark.parametrize("m", [1, 2, 4], ids=lambda m: f"m{m}")
def test_simt_nonfinite_input_makes_its_row_nan_at_every_block_layout(m, in_features, monkeypatch):
    """A NaN, +Inf or -Inf in x, at the first, a middle or the last column, makes that row of the CUDA-core
    kernel's output NaN (every row of it, so Inf never comes out as Inf; a zero g and the bias do not stop it) and
    leaves the other rows bit for bit. The kernel stores a non-finite x*h as NaN and lets the sums carry it: this
    checks that every warp's words are covered, whichever warp builds them."""
    assert _decode_kernel_applies("simt", m, in_features)  # so forcing it runs it (test_decode_dispatch_takes_...)
    monkeypatch.setenv("RABIT_CUDA_DECODE", "simt")
    torch.manual_seed(in_features * 10 + m)
    out = 37  # partial last block at every layout
    w, g, h = random_layer(out, in_features, 2)
    _, packed = rabit.residual_binarize(w, g, h)
    g[1, 3] = 0.0  # a zero scale: 0 * NaN is still NaN
    args = (x := torch.randn(m, in_features).half(), packed, g.half(), h.half(), torch.randn(out).half())
    dev = [t.to(DEV) for t in args[1:]]
    y = rabit.packed_linear(x.to(DEV), *dev).cpu()
    assert torch.isfinite(y).all()
    y64 = R.packed_linear(*args, compute_dtype=torch.float64)
    assert_float_close(y, R.packed_linear(*args), y64, f"simt {m}x{in_features}", _abs_terms(*args[:1], *args[2:]),
                       2 * in_features)
    bad_row = m - 1
    others = list(range(bad_row))
    for col in sorted({0, in_features // 2, in_features - 1}):
        for bad in (float("nan"), float("inf"), float("-inf")):
            xb = x.clone()
            xb[bad_row, col] = bad
            yb = rabit.packed_linear(xb.to(DEV), *dev).cpu()
            assert torch.isnan(yb[bad_row]).all(), (col, bad, yb[bad_row])
            assert torch.equal(yb[others], y[others]), (col, bad)


@pytest.mark.parametrize("m, in_features", [(5, 1000), (16, 300), (1, 2049), (4, 4096)])
def test_simt_forced_where_it_does_not_apply_runs_the_default(m, in_features, monkeypatch):
    """RABIT_CUDA_DECODE=simt beyond M <= CUDA_SIMT_MAX_M or in <= CUDA_SIMT_MAX_IN runs the default kernel (as b1
    does beyond M = 2): bit for bit the unforced output."""
    w, g, h = random_layer(70, in_features, 2)
    _, packed = rabit.residual_binarize(w, g, h)
    args = [t.to(DEV) for t in (torch.randn(m, in_features).half(), packed, g.half(), h.half())]
    y = rabit.packed_linear(*args)
    monkeypatch.setenv("RABIT_CUDA_DECODE", "simt")
    assert torch.equal(rabit.packed_linear(*args), y)


PREFILL_SHAPES = [(130, 512), (17, 2080), (100, 1000), (257, 64), (300, 136), (64, 4104), (9, 8)]


@pytest.mark.parametrize("shape", PREFILL_SHAPES, ids=shape_id)
@pytest.mark.parametrize("m", [17, 128, 129, 300])
@pytest.mark.parametrize("xdtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_prefill_kernels_form_what_exactly(shape, m, xdtype, monkeypatch):
    """Each x row a one-hot vector: y[m] must be column j(m) of Ŵ rounded to x's dtype (+ bias), bit for bit, since
    the kernels form Ŵ exactly as rabit.reference.dequantize does and every other product is 0. This pins the
    weight-fragment layout, the swizzled x tiles and the row/column/token edges of both prefill kernels."""
    out, in_features = shape
    k = 1 + (m + out) % 4
    w, g, h = random_layer(out, in_features, k)
    _, packed = rabit.residual_binarize(w, g, h)
    what = R.dequantize(R.unpack_signs(packed, in_features), g, h).to(xdtype)
    cols = (torch.arange(m) * 7 + 3) % in_features
    x = torch.zeros(m, in_features)
    x[torch.arange(m), cols] = 1.0
    bias = torch.randn(out) if m % 2 else None
    expect = what[:, cols].T.float() + (bias if bias is not None else 0.0)
    # the wgmma kernel also with its k-split over a cluster forced to 1, 3 and 8 blocks (at most one k-block each
    # where `in` is short; every partial sum is 0 but one, so this pins which block takes which k-blocks)
    runs = [(var, kernel, None) for var, kernel in _half_kernels(m, in_features)]
    runs += [(var, kernel, s) for var, kernel, _ in runs if kernel == "wgmma" for s in ("1", "3", "8")]
    for var, kernel, splits in runs:
        monkeypatch.setenv(var, kernel)
        if splits:
            monkeypatch.setenv("RABIT_CUDA_PREFILL_SPLITS", splits)
        _poison()
        y = rabit.packed_linear(x.to(xdtype).to(DEV), packed.to(DEV), g.to(DEV), h.to(DEV),
                                None if bias is None else bias.to(DEV))
        monkeypatch.delenv(var)
        monkeypatch.delenv("RABIT_CUDA_PREFILL_SPLITS", raising=False)
        assert torch.equal(y.cpu(), expect.to(xdtype)), (kernel, splits,
                                                          (y.cpu().float() - expect).abs().max().item())


@pytest.mark.parametrize("xdtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_prefill_dispatch(xdtype, monkeypatch):
    """The default prefill kernel is wgmma where it runs (sm_90a build, compute capability 9.0, 16-byte-aligned x
    rows), else mma.sync, bit for bit; without the k-split the two agree bit for bit; the split is deterministic; bad
    settings are errors."""
    out, in_features, m = 200, 2080, 150
    w, g, h = random_layer(out, in_features, 2)
    _, packed = rabit.residual_binarize(w, g, h)
    args = [t.to(DEV) for t in (packed, g.half(), h.half())]
    x = torch.randn(m, in_features, device=DEV).to(xdtype)
    # the same values at an address 2 bytes past a 16-byte boundary: the wgmma kernel's 16-byte copies cannot read it
    x_off = torch.empty(m * in_features + 1, device=DEV, dtype=xdtype)[1:].view(m, in_features)
    x_off.copy_(x)
    forced = {}
    for kernel in _prefill_kernels():
        monkeypatch.setenv("RABIT_CUDA_PREFILL", kernel)
        forced[kernel] = rabit.packed_linear(x, *args)
    monkeypatch.setenv("RABIT_CUDA_PREFILL", "mma")
    forced_off = rabit.packed_linear(x_off, *args)
    monkeypatch.delenv("RABIT_CUDA_PREFILL")
    assert torch.equal(rabit.packed_linear(x, *args), forced["wgmma" if _wgmma_runs() else "mma"]), "aligned x"
    assert torch.equal(rabit.packed_linear(x_off, *args), forced_off), "misaligned x"
    if _wgmma_runs():
        # the same Ŵ and the same x, summed in float32 in the same 16-column steps of the tensor cores: without the
        # k-split the two kernels agree bit for bit on H100 and H200 (2026-11-26)
        monkeypatch.setenv("RABIT_CUDA_PREFILL", "wgmma")
        monkeypatch.setenv("RABIT_CUDA_PREFILL_SPLITS", "1")
        assert torch.equal(rabit.packed_linear(x, *args), forced["mma"])
        # this small layer (2 output tiles) takes the k-split by default, a large one does not; the plan is what
        # runs (the default equals the forced split, bit for bit), and the partial sums add in a fixed order
        monkeypatch.delenv("RABIT_CUDA_PREFILL")
        monkeypatch.delenv("RABIT_CUDA_PREFILL_SPLITS")
        kernel, splits = rabit._C.cuda_prefill_plan(m, out, in_features)
        assert kernel == "wgmma" and splits > 1, (kernel, splits)
        assert rabit._C.cuda_prefill_plan(2048, 4096, 4096) == ("wgmma", 1)
        assert torch.equal(rabit.packed_linear(x, *args), forced["wgmma"])
        monkeypatch.setenv("RABIT_CUDA_PREFILL_SPLITS", str(splits))
        assert torch.equal(rabit.packed_linear(x, *args), forced["wgmma"])
        for bad in ("0", "9", "two", "3x"):
            monkeypatch.setenv("RABIT_CUDA_PREFILL_SPLITS", bad)
            with pytest.raises(RuntimeError, match="RABIT_CUDA_PREFILL_SPLITS must be"):
                rabit.packed_linear(x, *args)
            with pytest.raises(ValueError, match="RABIT_CUDA_PREFILL_SPLITS must be"):
                rabit._C.cuda_prefill_plan(m, out, in_features)
        monkeypatch.delenv("RABIT_CUDA_PREFILL_SPLITS")
        monkeypatch.setenv("RABIT_CUDA_PREFILL", "wgmma")
        with pytest.raises(RuntimeError, match="RABIT_CUDA_PREFILL=wgmma"):
            rabit.packed_linear(x_off, *args)
    else:
        assert rabit._C.cuda_prefill_plan(m, out, in_features) == ("mma", 1)
    monkeypatch.setenv("RABIT_CUDA_PREFILL", "fast")
    with pytest.raises(RuntimeError, match="RABIT_CUDA_PREFILL must be mma or wgmma"):
        rabit.packed_linear(x, *args)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_prefill_bits_by_tma_is_bit_for_bit(k, monkeypatch):
    """Where a layer's bit rows are a multiple of 16 bytes (in_features a multiple of 128, or nearly: 32-bit words a
    multiple of 4) and there is no k-split, the wgmma prefill kernel loads h and the bit words by TMA, an even
    k-block's stage taking the bits of the k-block pair; elsewhere by cp.async. Both give the mma.sync kernel's outputs bit for bit (no k-split):
    several row blocks, odd rows, a partial last k-block, an odd number of k-blocks (the last pair half empty)."""
    if not _wgmma_runs():
        pytest.skip("the wgmma prefill kernel does not run here (sm_90a build and a compute-capability 9.0 GPU)")
    monkeypatch.setenv("RABIT_CUDA_PREFILL_SPLITS", "1")
    # (out, in): TMA at 1000 (32 words), 4096, 640 (10 k-blocks) and 1984 (31 k-blocks); cp.async at 2080 (65 words)
    for out, in_features in [(300, 1000), (129, 4096), (64, 640), (200, 1984), (200, 2080)]:
        w, g, h = random_layer(out, in_features, k)
        _, packed = rabit.residual_binarize(w, g, h)
        args = [t.to(DEV) for t in (packed, g.half(), h.half())]
        for m, xdtype in [(17, torch.float16), (129, torch.bfloat16), (300, torch.float16)]:
            x = torch.randn(m, in_features, device=DEV).to(xdtype)
            ys = {}
            for kernel in ("mma", "wgmma"):
                monkeypatch.setenv("RABIT_CUDA_PREFILL", kernel)
                _poison()
                ys[kernel] = rabit.packed_linear(x, *args)
            assert torch.equal(ys["wgmma"], ys["mma"]), (out, in_features, m)


def test_packed_linear_large_and_graph_capture():
    torch.manual_seed(0)
    out, in_features = 4096, 4096
    w, g, h = (t.to(DEV) for t in random_layer(out, in_features, 2, torch.float32))
    what, packed = rabit.residual_binarize(w, g, h)
    what_c, packed_c = rabit.residual_binarize(w.cpu(), g.cpu(), h.cpu())
    assert torch.equal(packed.cpu(), packed_c) and torch.equal(what.cpu(), what_c)
    grad = torch.randn_like(w).half()
    dw, dg, dh = rabit.residual_binarize_backward(grad, w, g, h, packed)
    _, dg64, dh64 = R.residual_binarize_backward(grad.cpu(), w.cpu(), g.cpu(), h.cpu(), packed_c,
                                                 compute_dtype=torch.float64)
    _, rdg, rdh = R.residual_binarize_backward(grad.cpu(), w.cpu(), g.cpu(), h.cpu(), packed_c)
    assert torch.equal(dw, grad.float())
    assert_float_close(dg.cpu(), rdg, dg64, "dg 4096^2")
    assert_float_close(dh.cpu(), rdh, dh64, "dh 4096^2")
    gs, hs = g.half(), h.half()
    for m in (1, 4, 16, 64, 300):
        x = torch.randn(m, in_features, device=DEV).half()
        y = rabit.packed_linear(x, packed, gs, hs)
        y64 = R.packed_linear(x.cpu(), packed_c, gs.cpu(), hs.cpu(), compute_dtype=torch.float64)
        tol = 4e-3 if m > 16 else 1e-3
        assert ((y.cpu().double() - y64).norm() / y64.norm()).item() < tol
    # CUDA-graph capture of the decode kernels (no synchronisation inside; M = 1 and 16 take different ones), of the
    # prefill (M = 300: on H100/H200 the wgmma kernel, its tensor map a kernel argument) and of the QAT forward
    xs = [torch.randn(m, in_features, device=DEV).half() for m in (1, 16, 300)]
    y0 = [rabit.packed_linear(x, packed, gs, hs) for x in xs]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            yg = [rabit.packed_linear(x, packed, gs, hs) for x in xs]
            wg, pg = rabit.residual_binarize(w, g, h)
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(yg, y0)) and torch.equal(pg, packed) and torch.equal(wg, what)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("kernel", ["i8", "f16", "b1", "b1p", "simt"])
def test_packed_linear_group_kernels_are_packed_linear(k, kernel, monkeypatch):
    """Each decode kernel run over a group of layers (one launch: layer offsets, per-layer pointers and fragment paths)
    gives each layer's packed_linear output bit for bit; also under CUDA-graph capture."""
    monkeypatch.setenv("RABIT_CUDA_DECODE", kernel)
    layers = [(48, 1100), (17, 1100), (64, 1100), (5, 1100)]  # 4 layers: one launch; odd rows: partial tiles
    args = []
    for i, (out, in_features) in enumerate(layers):
        w, g, h = (t.to(DEV) for t in random_layer(out, in_features, k))
        _, packed = rabit.residual_binarize(w, g, h)
        args.append((packed, g.half(), h.half(), torch.randn(out, device=DEV)))
    lists = [list(t) for t in zip(*args)]
    for m in {"b1": (1, 2), "b1p": (1, 2), "simt": (1, 2, 3, 4)}.get(kernel, (1, 2, 3, 5, 9, 16)):
        x = torch.randn(m, 1100, device=DEV).half()
        for bias in (lists[3], None):
            _poison()
            ys = rabit.packed_linear_group(x, *lists[:3], bias)
            for i, (y, a) in enumerate(zip(ys, args)):
                assert torch.equal(y, rabit.packed_linear(x, *a[:3], a[3] if bias else None)), f"m={m} layer {i}"
    x = torch.randn(1, 1100, device=DEV).half()
    y0 = rabit.packed_linear_group(x, *lists)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            yg = rabit.packed_linear_group(x, *lists)
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(yg, y0))


def test_packed_linear_group_of_layers_taking_different_decode_kernels():
    """A group whose layers take different default decode kernels (a layer too large for the CUDA-core kernel between
    small ones) runs them one by one: each layer's packed_linear output, bit for bit, from its own kernel (told apart
    by _probe_x; the first layer takes simt, so one launch for all would run the large one in simt too)."""
    layers = [(64, 1536), (2049, 1536), (300, 1536)]
    probes = [_probe_layer(o, i, seed=l) for l, (o, i) in enumerate(layers)]
    args = [(packed.to(DEV), g.half().to(DEV), h.half().to(DEV)) for packed, g, h, _ in probes]
    for m, middle in ((1, "i8"), (2, "f16")):  # the CUDA-core kernel by default up to CUDA_SIMT_DEFAULT_MAX_M
        kernels = [_default_decode_kernel(m, i, o) for o, i in layers]
        assert kernels == ["simt", middle, "simt"]
        x = _probe_x(1536, m).half().to(DEV)
        ys = rabit.packed_linear_group(x, *[list(t) for t in zip(*args)])
        assert all(torch.equal(y, rabit.packed_linear(x, *a)) for y, a in zip(ys, args))
        # the probe tells simt from int8, not from fp16 (test_decode_dispatch_takes_simt_exactly_within_its_bounds)
        assert [_runs_simt(y, p[3]) for y, p, k in zip(ys, probes, kernels) if k != "f16"] == \
            [k == "simt" for k in kernels if k != "f16"]


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("xdtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_packed_linear_fused_runs_the_fp16_kernel_with_the_glue(m, xdtype, monkeypatch):
    """The fp16 decode kernel takes the glue (RABIT_CUDA_DECODE=f16, any M <= 4; by default from M = 2 on wide
    layers): the norm (its sums of u^2 written by one prologue block per row), the SwiGLU input and the residual, for
    a group launched together and for each layer alone (bit for bit), within the bound of
    rabit.reference.packed_linear_fused with h * u rounded to fp16; and not the int8 kernel's output (the variable
    was not ignored)."""
    torch.manual_seed(m)
    in_features = 1100  # 3 groups of 512, the last partial
    layers = [(48, in_features), (17, in_features), (64, in_features)]
    args = []
    for out, _ in layers:
        w, g, h = (t.to(DEV) for t in random_layer(out, in_features, 2))
        _, packed = rabit.residual_binarize(w, g, h)
        args.append((packed, g.half(), h.half(), torch.randn(out, device=DEV).half()))
    x = torch.randn(m, in_features, device=DEV).to(xdtype)
    up = torch.randn(m, in_features, device=DEV).to(xdtype)
    cases = {"norm": (args, dict(norm_weight=(torch.rand(in_features, device=DEV) + 0.5).to(xdtype), eps=1e-5)),
             "swiglu+residual": (args[:1], dict(up=up, residual=torch.randn(m, 48, device=DEV).to(xdtype))),
             "all": (args[:1], dict(norm_weight=(torch.rand(in_features, device=DEV) + 0.5).to(xdtype), eps=1e-5,
                                    up=up, residual=torch.randn(m, 48, device=DEV).to(xdtype)))}
    for name, (la, kw) in cases.items():
        lists = [list(t) for t in zip(*la)]
        runs = {}
        for kernel in ("f16", "i8"):
            monkeypatch.setenv("RABIT_CUDA_DECODE", kernel)
            _poison()
            runs[kernel] = (rabit.packed_linear_fused(x, *lists, **kw),
                            [rabit.packed_linear_fused(x, [p], [g], [h], [b], **kw)[0] for p, g, h, b in la])
        (group, alone), (group_i8, _) = runs["f16"], runs["i8"]
        assert all(torch.equal(a, b) for a, b in zip(group, alone)), name
        assert any(not torch.equal(a, b) for a, b in zip(group, group_i8)), name
        cpu = {k: v.cpu() if torch.is_tensor(v) else v for k, v in kw.items()}
        ref_args = (x.cpu(), [t.cpu() for t in lists[0]], [t.cpu() for t in lists[1]], [t.cpu() for t in lists[2]],
                    [t.cpu() for t in lists[3]])
        low = R.packed_linear_fused(*ref_args, **cpu, xh_fp16=True)
        ref = R.packed_linear_fused(*ref_args, **cpu, compute_dtype=torch.float64)
        for i, y in enumerate(group):
            assert y.dtype == xdtype and y.shape == (m, la[i][0].shape[1])
            assert_float_close(y.cpu(), low[i], ref[i], f"fused f16 {name} m={m} layer {i}", None, 1)


def _cuda_kernels_run(fn):
    """The names of the CUDA kernels that fn() launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return " ".join(e.key for e in prof.key_averages())


# (out, in, K, m, layers) and whether the persistent 1-bit kernel applies: M = 1 and the fragments of every (512-column
# group, path of all layers), 2 KB each, in one block's shared memory (small here, 512 KB at 32768 x K = 4: beyond any
# GPU's, so the 1-bit kernel runs)
B1P_CASES = [((300, 1500, 2, 1, 1), True), ((33, 4099, 3, 1, 3), True), ((4096, 4096, 2, 1, 1), True),
             ((300, 1500, 2, 2, 1), False), ((64, 32768, 4, 1, 1), False)]


@pytest.mark.parametrize("case, applies", B1P_CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else
                         ("applies" if v else "falls-back"))
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_persistent_binary_kernel_runs_where_it_applies(case, applies, fused, monkeypatch):
    """RABIT_CUDA_DECODE=b1p runs gemv_b1p_kernel exactly where it applies (the profiler's kernel names) and the 1-bit
    kernel elsewhere; either way the outputs equal the int8 kernel's bit for bit, with the fused glue too (norm and
    SwiGLU input on a group, plus the residual on one layer): gemv_b1p_kernel's epilogue is store_rows' arithmetic."""
    out, in_features, k, m, n = case
    args = []
    for i in range(n):
        w, g, h = (t.to(DEV) for t in random_layer(out + i, in_features, k))
        _, packed = rabit.residual_binarize(w, g, h)
        args.append((packed, g.half(), h.half(), torch.randn(out + i, device=DEV).half()))
    lists = [list(t) for t in zip(*args)]
    x = torch.randn(m, in_features, device=DEV).half()
    x[:, ::97] *= 3e3
    kw = {}
    if fused:
        kw = dict(norm_weight=torch.rand(in_features, device=DEV).half() + 0.5, eps=1e-5,
                  up=torch.randn(m, in_features, device=DEV).half())
        if n == 1:
            kw["residual"] = torch.randn(m, out, device=DEV).half()

    def call():
        return rabit.packed_linear_fused(x, *lists, **kw) if fused else rabit.packed_linear_group(x, *lists)

    ys = {}
    for kernel in ("b1p", "i8"):
        monkeypatch.setenv("RABIT_CUDA_DECODE", kernel)
        _poison()
        ys[kernel] = call()
    monkeypatch.setenv("RABIT_CUDA_DECODE", "b1p")
    names = _cuda_kernels_run(call)
    assert ("gemv_b1p_kernel" in names) == applies, names
    assert ("gemv_b1_kernel" in names) == (not applies), names
    for i, (a, b) in enumerate(zip(ys["b1p"], ys["i8"])):
        assert torch.equal(a, b), (i, (a.float() - b.float()).abs().max().item())


@pytest.mark.parametrize("k", [2, 4])
def test_persistent_binary_kernel_is_the_default_for_enough_tiles(k):
    """By default M = 1 takes the persistent 1-bit kernel where two of its blocks fit an SM (K <= 3) and the launch has
    at least 1.2 16-row tiles for each (decode_b1p_default), alone or as a layer group, and the int8 kernel just
    below that (in = 2048: neither the CUDA-core kernel's default, in <= 1536, nor the 1-bit one's, in > 7680)."""
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    need = -(-12 * sms // 5) * 16  # rows: ceil(1.2 tiles x 2 blocks x SMs) tiles of 16
    x = torch.randn(1, 2048, device=DEV).half()
    for rows, split in ((need, False), (need, True), (need - 16, False), (need - 16, True)):
        outs = [rows // 2, rows - rows // 2] if split else [rows]
        layers = []
        for out in outs:
            w, g, h = (t.to(DEV) for t in random_layer(out, 2048, k))
            layers.append((rabit.residual_binarize(w, g, h)[1], g.half(), h.half()))
        lists = [list(t) for t in zip(*layers)]
        names = _cuda_kernels_run(lambda: rabit.packed_linear_group(x, *lists))
        persistent = k <= 3 and rows >= need
        assert ("gemv_b1p_kernel" in names) == persistent, (rows, split, names)
        assert ("gemv_i8_kernel" in names) == (not persistent), (rows, split, names)


def test_side_stream_and_second_device_guard():
    w, g, h = (t.to(DEV) for t in random_layer(50, 300, 2))
    ref = rabit.residual_binarize(w, g, h)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = rabit.residual_binarize(w, g, h)
        y = rabit.packed_linear(torch.randn(3, 300, device=DEV), out[1], g, h)
    torch.cuda.synchronize()
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1]) and y.shape == (3, 50)


def test_device_mismatch_is_an_error():
    w, g, h = random_layer(4, 10, 2)
    _, packed = rabit.residual_binarize(w, g, h)
    with pytest.raises(ValueError, match="move both to one device"):
        rabit.packed_linear(torch.randn(1, 10, device=DEV), packed, g, h)


def test_opcheck_cuda_paths():
    w, g, h = (t.to(DEV) for t in random_layer(40, 100, 3))
    _, packed = rabit.residual_binarize(w, g, h)
    pl = torch.ops.rabit.packed_linear.default
    samples = [
        (pl, (torch.randn(1, 100, device=DEV).half(), packed, g.half(), h.half(), None)),
        (pl, (torch.randn(8, 100, device=DEV).bfloat16(), packed, g.bfloat16(), h, torch.randn(40, device=DEV))),
        (pl, (torch.randn(40, 100, device=DEV).half(), packed, g, h.half(), torch.randn(40, device=DEV).half())),
        (pl, (torch.randn(33, 100, device=DEV), packed, g, h, None)),
        (torch.ops.rabit.residual_binarize.default, (w.half(), g, h, torch.bfloat16, "clipped", 1.0)),
        (torch.ops.rabit.residual_binarize_backward.default,
         (torch.randn(40, 100, device=DEV), w, g, h, packed, "tanh", 0.5)),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args)


# ---------------------------------------------------------------- qat_linear's backward on two streams
def _qat_grads(x, w, g, h, bias, dy, ste, min_weights, monkeypatch, graph=False):
    """Gradients of rabit.qat_linear with the two-stream backward for layers of >= min_weights weights."""
    from rabit import _ops
    monkeypatch.setattr(_ops, "OVERLAP_MIN_WEIGHTS", min_weights)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, g, h, bias)]

    def step():
        for t in leaves:
            t.grad = None
        rabit.qat_linear(*leaves, ste, 1.5, check_finite=False).backward(dy)
        return [t.grad for t in leaves]

    if not graph:
        return [t.clone() for t in step()]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graph wants
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        grads = step()
    for t in grads:
        t.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    return [t.clone() for t in grads]


@pytest.mark.parametrize("shape,lead", [((300, 517), (7,)), ((1024, 4096), (3, 50)), ((4099, 1031), (64,))])
@pytest.mark.parametrize("xdtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("ste", ["identity", "clipped"])  # dŴ in float32 + scale_grads; dŴ in x's dtype + backward
def test_qat_linear_two_stream_backward_is_the_serial_one(shape, lead, xdtype, ste, monkeypatch):
    """The two-stream schedule runs the same kernels on the same inputs: gradients bit for bit those of the
    serial one, eagerly and inside CUDA-graph capture (where the side stream must fork from and join the
    capturing stream)."""
    from rabit import _ops
    out, in_features = shape
    w, g, h = random_layer(out, in_features, 2, torch.float32, DEV)
    x = torch.randn(*lead, in_features, device=DEV).to(xdtype)
    bias = torch.randn(out, device=DEV).to(xdtype)
    dy = torch.randn(*lead, out, device=DEV).to(xdtype)
    calls = []
    real = _ops._overlapped_backward
    monkeypatch.setattr(_ops, "_overlapped_backward", lambda *a: calls.append(1) or real(*a))
    serial = _qat_grads(x, w, g, h, bias, dy, ste, 1 << 62, monkeypatch)
    assert not calls
    two = _qat_grads(x, w, g, h, bias, dy, ste, 0, monkeypatch)
    assert calls, "the two-stream backward did not run"
    for name, a, b in zip(["x", "weight", "g", "h", "bias"], two, serial):
        assert torch.equal(a, b), f"grad of {name} differs between the two-stream and the serial backward"
    # in a graph against the serial schedule in a graph (cuBLAS may pick other algorithms under capture)
    serial = _qat_grads(x, w, g, h, bias, dy, ste, 1 << 62, monkeypatch, graph=True)
    two = _qat_grads(x, w, g, h, bias, dy, ste, 0, monkeypatch, graph=True)
    for name, a, b in zip(["x", "weight", "g", "h", "bias"], two, serial):
        assert torch.equal(a, b), f"grad of {name} differs between the two schedules in a CUDA graph"


# ------------------------------------------------------------------ the int8 activation class on CUDA
def _i8_terms(x, packed, g, h, bias=None):
    """Σ_k |g_k| Σ_c |S_c Q_c| (+ |bias|): a bound on the magnitudes the kernel's float32 sums round."""
    qs = R.dequantize_int8_activations_cuda(*R.int8_activations_cuda(x, h)).abs().sum(-1)  # [K, M]
    terms = (g.double().abs()[:, None, :] * qs[:, :, None]).sum(0)  # [M, out]
    return terms + (0 if bias is None else bias.double().abs()) + 1e-6


@pytest.mark.parametrize("shape", [(300, 1500), (4096, 4096), (64, 11008), (33, 4099), (1000, 600), (7, 45)],
                         ids=shape_id)
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("xdtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_packed_linear_i8_is_the_int8_activation_class(shape, k, xdtype):
    """rabit.packed_linear_i8 on CUDA runs the persistent 1-bit kernel on 8 bit planes of int8 activations (a scale per
    sub-group of 128 columns): within the
    float32 sums and output rounding of rabit.reference.packed_linear_i8_cuda, not the float32-level output; a NaN or
    Inf input makes its row NaN; several rows run one launch each, each row as alone; i8_layout is the packed words."""
    out, in_features = shape
    torch.manual_seed(out * 10 + k)
    w, g, h = random_layer(out, in_features, k)
    _, packed = rabit.residual_binarize(w, g, h)
    x = torch.randn(3, in_features)
    x[:, ::97] *= 30
    x[:, 700:900] *= 1e-3
    if in_features >= 1536:
        x[:, 1024:1536] = 0  # an all-zero group: amax 0, S 0
    x = x.to(xdtype)
    bias = torch.randn(out) if k % 2 else None
    layout = rabit.i8_layout(packed.to(DEV), in_features)
    assert torch.equal(layout.cpu(), packed) and layout.data_ptr() != 0
    args = (x.to(DEV), layout, g.to(DEV), h.to(DEV), None if bias is None else bias.to(DEV))
    exact = rabit.packed_linear(*args)
    _poison()
    y = rabit.packed_linear_i8(*args)
    ref = R.packed_linear_i8_cuda(x, packed, g, h, bias)
    err = (y.cpu().double() - ref).abs()
    # the output's rounding to x's dtype (2^-11 relative in fp16, 2^-8 in bf16) and the float32 sums of the terms
    bound = ref.abs() * (2.0 ** -11 if xdtype == torch.float16 else 2.0 ** -8) + _i8_terms(x, packed, g, h, bias) * 1e-5
    assert torch.isfinite(y).all() and (err <= bound).all(), (err / bound).max()
    assert not torch.equal(y, exact)
    assert ((exact.cpu().double() - ref).abs() > bound).any()  # the bound tells the class from the exact output
    assert torch.equal(y[1:2], rabit.packed_linear_i8(args[0][1:2], *args[1:]))
    names = _cuda_kernels_run(lambda: rabit.packed_linear_i8(args[0][:1], *args[1:]))
    assert "gemv_b1p_kernel" in names and "gemv_b1_prep_kernel" in names, names
    for bad in (float("nan"), float("inf")):
        xb = x.clone()
        xb[1, in_features // 2] = bad
        yb = rabit.packed_linear_i8(xb.to(DEV), *args[1:])
        assert torch.isnan(yb[1]).all() and torch.equal(yb[0], y[0])


def test_packed_linear_fused_i8_groups_and_glue_equal_single_layers():
    """rabit.packed_linear_fused_i8 on CUDA: a layer group (one launch) gives each layer's own output bit for bit, with
    the fused norm and SwiGLU input too, within rounding of the class's reference glue; errors for M > 1 and float32."""
    layers = []
    for out in (48, 17, 640):
        w, g, h = (t.to(DEV) for t in random_layer(out, 1100, 2))
        layers.append((rabit.residual_binarize(w, g, h)[1], g.half(), h.half(), torch.randn(out, device=DEV).half()))
    lists = [list(t) for t in zip(*layers)]
    x = torch.randn(1, 1100, device=DEV).half()
    nw = torch.rand(1100, device=DEV).half() + 0.5
    up = torch.randn(1, 1100, device=DEV).half()
    kw = dict(norm_weight=nw, eps=1e-5, up=up)
    ys = rabit.packed_linear_fused_i8(x, *lists, **kw)
    assert all(torch.equal(y, rabit.packed_linear_fused_i8(x, [p], [g], [h], [b], **kw)[0]) for y, (p, g, h, b) in
               zip(ys, layers))
    assert "gemv_b1p_kernel" in _cuda_kernels_run(lambda: rabit.packed_linear_fused_i8(x, *lists, **kw))
    assert not torch.equal(ys[2], rabit.packed_linear_fused(x, *lists, **kw)[2])
    plain = rabit.packed_linear_fused_i8(x, *lists)
    assert all(torch.equal(y, rabit.packed_linear_i8(x, p, g, h, b)) for y, (p, g, h, b) in zip(plain, layers))
    cpu = [[t.cpu() for t in lst] for lst in lists]
    refs = R.packed_linear_fused(x.cpu(), *cpu, norm_weight=nw.cpu(), eps=1e-5, up=up.cpu(),
                                 compute_dtype=torch.float64, int8_cuda=True)
    for y, ref in zip(ys, refs):
        # 1e-3 of the row's scale: expf may differ from torch.exp by an ulp, which can move a Q by one step
        err = (y.cpu().double() - ref).abs()
        assert (err <= ref.abs() * 2.0 ** -11 + ref.abs().max() * 1e-3 + 1e-3).all(), err.max()
    res = torch.randn(1, 48, device=DEV).half()
    yr = rabit.packed_linear_fused_i8(x, [layers[0][0]], [layers[0][1]], [layers[0][2]], [layers[0][3]],
                                      residual=res)[0]
    assert torch.allclose(yr.float(), plain[0].float() + res.float(), atol=2e-2, rtol=2e-3)
    with pytest.raises(ValueError, match=r"takes one row of x \(decoding at batch 1\), got x \[2, 1100\]"):
        rabit.packed_linear_fused_i8(torch.randn(2, 1100, device=DEV).half(), *lists)
    with pytest.raises(TypeError, match="the CUDA kernels take float16 or bfloat16 x, got float32"):
        rabit.packed_linear_fused_i8(x.float(), *lists)
    with pytest.raises(TypeError, match="int8 activation class takes float16 or bfloat16 x, got float32"):
        rabit.packed_linear_i8(x.float(), *layers[0])
    with pytest.raises(ValueError, match="rabit.i8_layout: packed rows hold 35 words but in_features=1000 needs 32"):
        rabit.i8_layout(layers[0][0], 1000)


def test_packed_linear_i8_tiny_inputs_and_too_wide_layers():
    """The CUDA int8 class takes |x·h| below 2^-120 as zero (S = 0, the output is the bias), as its reference; a layer
    whose fragments exceed a block's shared memory is refused by name, and StaticDecoder's check agrees."""
    from rabit._torch_api import _C

    w, g, h = (t.to(DEV) for t in random_layer(40, 700, 2))
    _, packed = rabit.residual_binarize(w, g, h)
    bias = torch.randn(40, device=DEV).half()
    x = torch.full((1, 700), 2.0 ** -14, device=DEV).half() * 1e-3  # subnormal fp16
    x[0, 600:] = 1.0  # the second group is normal
    hs = h.clone()
    hs[:, :512] = 2.0 ** -110  # |x·h| < 2^-120 in the first group: taken as zero
    y = rabit.packed_linear_i8(x, packed, g, hs, bias)
    ref = R.packed_linear_i8_cuda(x.cpu(), packed.cpu(), g.cpu(), hs.cpu(), bias.cpu())
    assert torch.allclose(y.cpu().double(), ref, rtol=2e-3, atol=2e-3)
    q, s = R.int8_activations_cuda(x.cpu(), hs.cpu())
    assert (s[:, 0, 0] == 0).all() and (q[:, 0, :512] == 0).all()
    wide = 64 * 1024  # 128 groups x 4 paths x 512 bytes: more than any GPU's shared memory a block
    assert _C.cuda_int8_applies(4096, 2) and not _C.cuda_int8_applies(wide, 4)
    pk = torch.zeros(4, 16, wide // 32, dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="has int8 activation fragments larger than a block's shared memory"):
        rabit.packed_linear_i8(torch.randn(1, wide, device=DEV).half(), pk, torch.ones(4, 16, device=DEV),
                               torch.ones(4, wide, device=DEV))
