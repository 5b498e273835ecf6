"""rabit.packed_linear_i8 (CPU, int8 tables) against rabit.reference.packed_linear_i8 bit for bit, its scalar and AVX2
kernels against each other, its accuracy class against a float64 oracle, and its errors."""
import pytest
import torch

import rabit
from rabit import reference as R

from helpers import FLOAT_DTYPES, dtype_id, outputs_by_cpu_kernel, random_layer

# partial 16-row blocks, partial 128-column blocks, in not a multiple of 4 or 32, one column, K = 1..4
I8_SHAPES = [(1, 1, 2), (3, 5, 1), (16, 128, 2), (17, 129, 2), (33, 100, 3), (40, 257, 4), (64, 576, 2),
             (31, 1000, 2), (130, 513, 1), (48, 1536, 2)]


def _layer(out, in_features, k, seed):
    torch.manual_seed(seed)
    w, g, h = random_layer(out, in_features, k)
    _, packed = rabit.residual_binarize(w, g, h)
    return packed, g.half(), h.half()


@pytest.mark.parametrize("m", [1, 2, 5])
@pytest.mark.parametrize("xdtype", FLOAT_DTYPES, ids=dtype_id)
def test_packed_linear_i8_equals_reference_bit_for_bit(m, xdtype):
    seed = torch.randint(0, 2**31 - 1, ()).item()  # fresh each run; printed on failure
    for i, (out, in_features, k) in enumerate(I8_SHAPES):
        packed, g, h = _layer(out, in_features, k, seed + i)
        layout = rabit.i8_layout(packed, in_features)
        assert layout.dtype == torch.uint8 and layout.numel() == rabit._ops.i8_layout_bytes(k, out, in_features)
        x = (torch.randn(m, in_features) * 3).to(xdtype)
        bias = torch.randn(out) if i % 2 else None
        want = R.packed_linear_i8(x, packed, g, h, bias)
        for kernel, y in outputs_by_cpu_kernel(lambda: rabit.packed_linear_i8(x, layout, g, h, bias)).items():
            assert y.dtype == xdtype and y.shape == (m, out)
            assert torch.equal(y, want), (seed, kernel, out, in_features, k, (y.float() - want.float()).abs().max())


def test_packed_linear_i8_scales_of_float32_and_bf16():
    packed, g, h = _layer(70, 300, 2, 1)
    layout = rabit.i8_layout(packed, 300)
    x = torch.randn(2, 300)
    for gd, hd in [(torch.float32, torch.float32), (torch.bfloat16, torch.float16)]:
        assert torch.equal(rabit.packed_linear_i8(x, layout, g.to(gd), h.to(hd)),
                           R.packed_linear_i8(x, packed, g.to(gd), h.to(hd)))


def test_packed_linear_i8_accuracy_is_the_int8_class():
    """Relative error of the whole output against float64: ~1e-2 at 576-4096 columns (int8 tables, a scale per 128
    columns), far above packed_linear's float32 level; a broken lookup or scale gives O(1)."""
    torch.manual_seed(0)
    for out, in_features in [(256, 576), (128, 1536), (64, 4096)]:
        packed, g, h = _layer(out, in_features, 2, in_features)
        x = torch.randn(4, in_features)
        y = rabit.packed_linear_i8(x, rabit.i8_layout(packed, in_features), g, h)
        oracle = R.packed_linear(x.double(), packed, g, h, compute_dtype=torch.float64)
        err = ((y.double() - oracle).norm() / oracle.norm()).item()
        f32 = rabit.packed_linear(x, packed, g, h)
        err32 = ((f32.double() - oracle).norm() / oracle.norm()).item()
        assert 1e-3 < err < 2e-2, (out, in_features, err)
        assert err32 < 1e-5


def test_packed_linear_i8_zero_and_non_finite_rows():
    packed, g, h = _layer(40, 300, 2, 3)
    layout = rabit.i8_layout(packed, 300)
    x = torch.randn(3, 300)
    x[0] = 0
    x[1, 7] = float("nan")
    x[2, 299] = float("inf")
    y = rabit.packed_linear_i8(x, layout, g, h, torch.ones(40))
    assert torch.equal(y[0], torch.ones(40))  # zero activations: the bias alone
    assert y[1].isnan().all() and y[2].isnan().all()  # the reference's too (NaN scales)
    assert R.packed_linear_i8(x, packed, g, h, torch.ones(40))[1:].isnan().all()


def test_packed_linear_i8_tiny_blocks_count_as_zero():
    """A block whose largest table entry is below 2^-120 (127 / mx would overflow float32) is taken as zero, in the
    kernels and the reference alike (before: the kernels' int8 casts of Inf and NaN disagreed with each other)."""
    packed, g, h = _layer(20, 300, 2, 6)
    layout = rabit.i8_layout(packed, 300)
    x = torch.randn(3, 300)
    x[0] = 1e-38
    x[1, :128] = 1e-38  # the first block tiny, the others normal
    bias = torch.randn(20)
    want = R.packed_linear_i8(x, packed, g, h, bias)
    assert torch.equal(want[0], bias) and want.isfinite().all()
    for kernel, y in outputs_by_cpu_kernel(lambda: rabit.packed_linear_i8(x, layout, g, h, bias)).items():
        assert torch.equal(y, want), kernel


def test_packed_linear_fused_i8_is_the_fused_glue_around_packed_linear_i8():
    """Without glue (float32 x, no norm, up or residual) the fused op is packed_linear_i8 bit for bit; with the glue
    it is reference.packed_linear_fused(int8_tables=True) within a few table steps (the glue's C loops and the
    reference's torch ops can round u apart in the last bit, which may move an int8 entry by one), far inside the int8
    error itself (~1e-2)."""
    layers = [_layer(out, 300, 2, 7 + out) for out in (48, 17)]
    layouts = [rabit.i8_layout(p, 300) for p, _, _ in layers]
    packed, g, h = ([layer[i] for layer in layers] for i in range(3))
    x = torch.randn(3, 300)
    with torch.inference_mode():
        ys = rabit.packed_linear_fused_i8(x, layouts, g, h)
        assert all(torch.equal(y, rabit.packed_linear_i8(x, lay, gl, hl)) for y, lay, gl, hl in zip(ys, layouts, g, h))
        xb = x.bfloat16()
        kw = dict(norm_weight=torch.rand(300) + 0.5, eps=1e-5)
        for case in (kw, dict(up=torch.randn(3, 300).bfloat16())):
            n = 1 if "up" in case else 2
            res = dict(residual=torch.randn(3, 48).bfloat16()) if n == 1 else {}
            ys = rabit.packed_linear_fused_i8(xb, layouts[:n], g[:n], h[:n], **case, **res)
            want = R.packed_linear_fused(xb, packed[:n], g[:n], h[:n], **case, **res, int8_tables=True)
            for y, w in zip(ys, want):
                assert ((y.float() - w.float()).norm() / w.float().norm()).item() < 3e-3, case.keys()


def test_packed_linear_i8_errors():
    packed, g, h = _layer(20, 100, 2, 4)
    layout = rabit.i8_layout(packed, 100)
    x = torch.randn(2, 100)
    with pytest.raises(ValueError, match="layout to be a contiguous uint8 vector of"):
        rabit.packed_linear_i8(x, layout[:-1], g, h)
    with pytest.raises(ValueError, match=r"x must be \[M, in\] with the layer's in=100"):
        rabit.packed_linear_i8(torch.randn(2, 99), layout, g, h)
    with pytest.raises(ValueError, match="expected a 2-D x"):
        rabit.packed_linear_i8(torch.randn(100), layout, g, h)
    with pytest.raises(ValueError, match="bias has 3 elements but out=20"):
        rabit.packed_linear_i8(x, layout, g, h, torch.randn(3))
    with pytest.raises(ValueError, match=r"packed is \[2, 20, 4\] but K=2, out=20, in=200"):
        rabit.i8_layout(packed, 200)
    if torch.cuda.is_available():  # a CPU layout is not the CUDA class's (the packed words)
        with pytest.raises(ValueError, match="rabit.packed_linear_i8: expected a 3-D packed"):
            rabit.packed_linear_i8(x.cuda().half(), layout.cuda(), g.cuda(), h.cuda())


def test_reference_of_the_cuda_int8_class():
    """rabit.reference.packed_linear_i8_cuda (the CUDA kernel's spec): where h ⊙ x holds integers with a maximum of
    127 in every sub-group the quantization is exact and so is the output; a scale per sub-group of 128 columns
    (blocks of 32, every fourth, of a 512-column group), so an outlier coarsens its own sub-group's steps only; NaN /
    Inf make their row NaN."""
    torch.manual_seed(0)
    out, in_features, K = 9, 1100, 2
    w, g, _ = random_layer(out, in_features, K)
    h = torch.ones(K, in_features)
    _, packed = rabit.residual_binarize(w, g, h)
    x = torch.randint(-127, 128, (2, in_features)).float()
    sub0 = [c for c in range(in_features) if c % 32 == 0]  # the first column of each block of 32
    x[:, sub0] = 127.0  # every sub-group's amax is 127: S = 1, Q = x
    exact = R.packed_linear(x.double(), packed, g, h, compute_dtype=torch.float64)
    assert torch.allclose(R.packed_linear_i8_cuda(x, packed, g, h), exact, rtol=1e-12, atol=1e-9)
    q, scale = R.int8_activations_cuda(x, h)
    assert q.shape == (K, 2, 1536) and scale.shape == (K, 2, 3, 4) and torch.equal(q[0, :, :in_features], x)
    xs = torch.randn(2, in_features)
    want = R.packed_linear(xs.double(), packed, g, h, compute_dtype=torch.float64)
    got = R.packed_linear_i8_cuda(xs, packed, g, h)
    assert 1e-3 < ((got - want).norm() / want.norm()).item() < 2e-2
    _, s0 = R.int8_activations_cuda(xs, h)
    xo = xs.clone()
    xo[:, 40] = 1e3  # an outlier in sub-group 1 of group 0 (column 40: its second block of 32)
    _, s1 = R.int8_activations_cuda(xo, h)
    assert torch.allclose(s1[:, :, 0, 1], torch.full_like(s1[:, :, 0, 1], 1e3 / 127))
    s1[:, :, 0, 1] = s0[:, :, 0, 1]
    assert torch.equal(s0, s1)  # the other sub-groups' scales are untouched (sub-group 0 too: columns 0-31, 128-159, ...)
    xb = xs.clone()
    xb[1, 700] = float("nan")
    yb = R.packed_linear_i8_cuda(xb, packed, g, h, torch.ones(out))
    assert torch.isnan(yb[1]).all() and torch.allclose(yb[0], got[0] + 1)
