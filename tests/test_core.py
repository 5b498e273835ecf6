"""rabit._core (CPython + NumPy C API, no torch) against the torch ops: same kernels, same bits."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import rabit
from rabit import _core

from rabit import reference as R

from helpers import SHAPES, abs_terms, assert_float_close, random_layer, shape_id


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_core_matches_torch_ops(shape, k):
    w, g, h = random_layer(*shape, k)
    what_t, packed_t = rabit.residual_binarize(w, g, h)
    what_n, packed_n = _core.residual_binarize(w.numpy(), g.numpy(), h.numpy())
    assert packed_n.dtype == np.uint32 and packed_n.shape == tuple(packed_t.shape)
    assert np.array_equal(packed_n.view(np.int32), packed_t.numpy())
    assert np.array_equal(what_n, what_t.numpy())
    x = torch.randn(3, shape[1])
    bias = torch.randn(shape[0])
    y_t = rabit.packed_linear(x, packed_t, g, h, bias)
    y_n = _core.packed_linear(x.numpy(), packed_n, g.numpy(), h.numpy(), bias.numpy())
    assert np.array_equal(y_n, y_t.numpy())  # same C kernel, same summation order
    y1 = _core.packed_linear(x[0].numpy(), packed_n, g.numpy(), h.numpy())
    assert y1.shape == (shape[0],) and np.array_equal(y1, rabit.packed_linear(x[:1], packed_t, g, h)[0].numpy())
    signs = rabit.unpack_signs(packed_t, shape[1])
    assert np.array_equal(_core.pack_signs(signs.numpy()).view(np.int32), packed_t.numpy())
    assert np.array_equal(_core.unpack_signs(packed_n, shape[1]), signs.numpy())
    assert np.array_equal(_core.dequantize(packed_n, g.numpy(), h.numpy()), what_n)  # the forward's Ŵ


@pytest.mark.parametrize("m", [1, 5, 40])
def test_core_gemm_path_matches_torch_gemm_path(m):
    """The NumPy module's GEMM path (Ŵ tiles into NumPy's matrix product) and the torch binding's (ATen's GEMM),
    forced at every M, both against the reference by the 2x rule; 1-D x too. Three tiles of 26 rows (in = 40000),
    the last partial."""
    w, g, h = random_layer(60, 40000, 2)
    _, packed = rabit.residual_binarize(w, g, h)
    packed_n = packed.numpy().view(np.uint32)
    x = torch.randn(m, 40000)
    bias = torch.randn(60)
    try:
        _core.set_cpu_kernel("gemm")
        rabit.set_cpu_kernel("gemm")
        assert _core.cpu_kernel() == "gemm"
        y_t = rabit.packed_linear(x, packed, g, h, bias)
        y_n = _core.packed_linear(x.numpy(), packed_n, g.numpy(), h.numpy(), bias.numpy())
        y1 = _core.packed_linear(x[0].numpy(), packed_n, g.numpy(), h.numpy())
    finally:
        _core.set_cpu_kernel("auto")
        rabit.set_cpu_kernel("auto")
    for y, xs, b in ((y_t, x, bias), (torch.from_numpy(y_n), x, bias), (torch.from_numpy(y1)[None], x[:1], None)):
        args = (xs, packed, g, h, b)
        assert_float_close(y, R.packed_linear(*args), R.packed_linear(*args, compute_dtype=torch.float64),
                           "packed_linear (gemm)", abs_terms(xs, g, h, b), 2 * 40000)


def test_core_rejects_wrong_dtype_and_shape():
    w = np.random.randn(4, 10).astype(np.float32)
    g, h = np.ones((2, 4), np.float32), np.ones((2, 10), np.float32)
    with pytest.raises(TypeError, match="expected weight to have dtype f4, got f8"):
        _core.residual_binarize(w.astype(np.float64), g, h)
    with pytest.raises(TypeError, match="expected weight to be a numpy array"):
        _core.residual_binarize(w.tolist(), g, h)
    with pytest.raises(ValueError, match="expected a 2-D weight, got 1-D"):
        _core.residual_binarize(w[0], g, h)
    with pytest.raises(ValueError, match="the layer needs g"):
        _core.residual_binarize(w, g[:, :3], h)
    for name, bad in (("g", (g * np.float32("nan"), h)), ("h", (g, h * np.float32("inf")))):
        with pytest.raises(ValueError, match=f"residual_binarize: {name} contains NaN or Inf"):
            _core.residual_binarize(w, *bad)  # as the torch op does, instead of an all-NaN result
    w[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        _core.residual_binarize(w, g, h)
    _, packed = _core.residual_binarize(np.ones((4, 10), np.float32), g, h)
    with pytest.raises(TypeError, match="packed to have dtype u4"):
        _core.packed_linear(np.ones(10, np.float32), packed.astype(np.int64), g, h)
    with pytest.raises(ValueError, match="bias has 3 elements"):
        _core.packed_linear(np.ones(10, np.float32), packed, g, h, np.ones(3, np.float32))
    # x's width against h's: named as x (the packed words fit any width of 1..32 columns a word)
    with pytest.raises(ValueError, match=r"x has 12 columns but h is \[2, 10\]; x must be \[M, in\] or \[in\] with "
                                         r"the layer's in=10"):
        _core.packed_linear(np.ones((3, 12), np.float32), packed, g, h)
    with pytest.raises(ValueError, match="in_features=40 needs 2"):
        _core.unpack_signs(packed, 40)
    with pytest.raises(ValueError, match=r"packed is \[2, 4, 1\] but g, h need \[2, 4, 2\]"):
        _core.dequantize(packed, g, np.ones((2, 40), np.float32))
    with pytest.raises(TypeError, match="expected g to have dtype f4, got f2"):
        _core.dequantize(packed, g.astype(np.float16), h)


def test_core_accepts_non_contiguous_views():
    w = np.random.randn(10, 6).astype(np.float32).T  # a transposed view
    g, h = np.ones((2, 6), np.float32), np.ones((2, 10), np.float32)
    what, _ = _core.residual_binarize(w, g, h)
    what_c, _ = _core.residual_binarize(np.ascontiguousarray(w), g, h)
    assert np.array_equal(what, what_c)


def test_core_format_constants_match_header_and_torch():
    assert _core.FORMAT_VERSION == rabit.FORMAT_VERSION == rabit.reference.FORMAT_VERSION
    assert _core.WORD_BITS == rabit.reference.WORD_BITS == 32
    assert _core.SOURCE_HASH == rabit._C.SOURCE_HASH


def test_core_imports_without_torch(tmp_path):
    # importing torch is made to fail; rabit._core must still load and compute
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from rabit import _core\n"
        "w = np.random.randn(5, 40).astype(np.float32); g = np.ones((2, 5), np.float32); h = np.ones((2, 40), np.float32)\n"
        "what, packed = _core.residual_binarize(w, g, h)\n"
        "y = _core.packed_linear(np.ones(40, np.float32), packed, g, h)\n"
        "assert y.shape == (5,) and 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "import rabit\n"
        "try:\n    rabit.quantize_\nexcept ImportError as e:\n    print('OK', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("OK rabit.quantize_ needs PyTorch")


# (B, H, Hkv, D, S, pos): grouped heads, odd cache sizes, pos at both ends
ATTENTION_CASES = [(1, 4, 4, 8, 5, 0), (2, 9, 3, 64, 40, 39), (3, 8, 2, 6, 17, 9), (1, 14, 2, 64, 130, 64),
                   (2, 6, 1, 2, 3, 1),
                   (1, 9, 3, 64, 300, 250)]  # enough work for the kernel's threads (B * H * (pos + 1) * D >= 65536)


def attention_inputs(B, H, Hkv, D, S, gen):
    def r(*shape):
        return torch.randn(*shape, generator=gen)
    ang = torch.rand(S + 3, D // 2, generator=gen) * 6.3
    ang = torch.cat([ang, ang], -1)
    return r(B, H, D), r(B, Hkv, D), r(B, Hkv, D), r(B, Hkv, S, D), r(B, Hkv, S, D), ang.cos(), ang.sin()


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "B{}-H{}-Hkv{}-D{}-S{}-p{}".format(*c))
def test_core_decode_attention_matches_torch_op(case):
    B, H, Hkv, D, S, pos = case
    seed = int(torch.randint(0, 2**31, ()))  # a fresh seed per run, named in any failure
    q, k, v, kc, vc, cos, sin = attention_inputs(B, H, Hkv, D, S, torch.Generator().manual_seed(seed))
    kc_n, vc_n = kc.numpy().copy(), vc.numpy().copy()
    with torch.no_grad():
        want = rabit.decode_attention(q, k, v, kc, vc, cos, sin, torch.tensor([pos]), 0.3)
    got = _core.decode_attention(q.numpy(), k.numpy(), v.numpy(), kc_n, vc_n, cos.numpy(), sin.numpy(), pos, 0.3)
    # the same C kernel: the same bits, and the caches written in place the same way
    assert got.dtype == np.float32 and np.array_equal(got, want.numpy()), f"seed {seed}"
    assert np.array_equal(kc_n, kc.numpy()) and np.array_equal(vc_n, vc.numpy()), f"seed {seed}"
    default = _core.decode_attention(q.numpy(), k.numpy(), v.numpy(), kc_n, vc_n, cos.numpy(), sin.numpy(), pos)
    with torch.no_grad():
        want = rabit.decode_attention(q, k, v, kc, vc, cos, sin, torch.tensor([pos]))  # scale D^-0.5
    assert np.array_equal(default, want.numpy()), f"seed {seed}"
    # big-endian inputs are read as numbers (converted), not as native bytes
    swapped = _core.decode_attention(q.numpy().astype(">f4"), k.numpy().astype(">f4"), v.numpy(), kc_n.copy(),
                                     vc_n.copy(), cos.numpy().astype(">f4"), sin.numpy(), pos)
    assert np.array_equal(swapped, default), f"seed {seed}"


def test_core_decode_attention_rejects_bad_input():
    gen = torch.Generator().manual_seed(0)
    q, k, v, kc, vc, cos, sin = (t.numpy() for t in attention_inputs(1, 4, 2, 8, 6, gen))
    kc, vc = kc.copy(), vc.copy()
    with pytest.raises(TypeError, match="expected q to have dtype f4, got f8"):
        _core.decode_attention(q.astype(np.float64), k, v, kc, vc, cos, sin, 0)
    with pytest.raises(ValueError, match="outside the cache's 6 positions"):
        _core.decode_attention(q, k, v, kc, vc, cos, sin, 6)
    with pytest.raises(ValueError, match="outside the cache"):
        _core.decode_attention(q, k, v, kc, vc, cos, sin, -1)
    with pytest.raises(ValueError, match="written in place"):
        _core.decode_attention(q, k, v, kc[:, :, ::2], vc[:, :, ::2], cos, sin, 0)  # a strided view
    ro = kc.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="written in place"):
        _core.decode_attention(q, k, v, ro, vc, cos, sin, 0)
    with pytest.raises(ValueError, match="native byte order"):
        _core.decode_attention(q, k, v, kc.astype(">f4"), vc, cos, sin, 0)
    with pytest.raises(ValueError, match="shares memory"):
        _core.decode_attention(q, k, v, kc, kc, cos, sin, 0)
    with pytest.raises(ValueError, match="shares memory"):
        _core.decode_attention(kc[0, 0, :4].reshape(1, 4, 8), k, v, kc, vc, cos, sin, 0)  # q a view of k_cache
    with pytest.raises(TypeError, match="scale must be a number or None"):
        _core.decode_attention(q, k, v, kc, vc, cos, sin, 0, "0.3")
    with pytest.raises(ValueError, match="scale must be finite in float32 and > 0, got 1e[+]300"):
        _core.decode_attention(q, k, v, kc, vc, cos, sin, 0, 1e300)
    for bad in (0.0, -0.5):  # as the torch op, which rejects them
        with pytest.raises(ValueError, match="scale must be finite in float32 and > 0"):
            _core.decode_attention(q, k, v, kc, vc, cos, sin, 0, bad)
    with pytest.raises(ValueError, match="not a multiple of k's 3 KV heads"):
        _core.decode_attention(q, np.zeros((1, 3, 8), np.float32), np.zeros((1, 3, 8), np.float32),
                               np.zeros((1, 3, 6, 8), np.float32), np.zeros((1, 3, 6, 8), np.float32), cos, sin, 0)
    with pytest.raises(ValueError, match=r"rotary tables, got cos \[4, 8\]"):
        _core.decode_attention(q, k, v, kc, vc, cos[:4], sin, 0)
    with pytest.raises(ValueError, match="caches must be"):
        _core.decode_attention(q, k, v, kc, vc[:, :, :5].copy(), cos, sin, 0)
    with pytest.raises(ValueError, match="head dimension must be even"):
        _core.decode_attention(q[..., :7].copy(), k[..., :7].copy(), v[..., :7].copy(), kc[..., :7].copy(),
                               vc[..., :7].copy(), cos[:, :7].copy(), sin[:, :7].copy(), 0)


def test_core_decode_attention_does_not_depend_on_the_thread_count(tmp_path):
    """The kernel splits (row, KV head) pairs over OpenMP threads, each pair whole on one thread: 1 and 3 threads
    (OMP_NUM_THREADS, read by the OpenMP runtime at start-up, hence one process each) give the same bytes."""
    code = (
        "import hashlib, sys\n"
        "import numpy as np\n"
        "from rabit import _core\n"
        "r = np.random.default_rng(3)\n"
        "f = lambda *s: r.standard_normal(s).astype(np.float32)\n"
        "B, H, Hkv, D, S, pos = 2, 9, 3, 64, 300, 250\n"  # 6 pairs and enough work for the threads
        "kc, vc = f(B, Hkv, S, D), f(B, Hkv, S, D)\n"
        "ang = np.concatenate([r.random((S, D // 2))] * 2, -1).astype(np.float32) * 6.3\n"
        "out = _core.decode_attention(f(B, H, D), f(B, Hkv, D), f(B, Hkv, D), kc, vc, np.cos(ang), np.sin(ang), pos)\n"
        "print(hashlib.sha256(out.tobytes() + kc.tobytes() + vc.tobytes()).hexdigest())\n"
    )
    digests = []
    for threads in ("1", "3"):
        env = {**os.environ, "OMP_NUM_THREADS": threads}
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
        assert r.returncode == 0, r.stderr
        digests.append(r.stdout.strip())
    assert digests[0] == digests[1] and len(digests[0]) == 64


# the int8 classes (opt-in): the NumPy entry points run the torch ops' kernels, so their outputs are the same bits
I8_SHAPES = [(1, 1), (7, 31), (16, 64), (13, 95), (33, 257), (40, 300), (96, 576)]


@pytest.mark.parametrize("shape", I8_SHAPES, ids=shape_id)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_core_int8_entry_points_match_torch_ops(shape, k):
    torch.manual_seed(hash((shape, k)) % 2**31)
    out, in_ = shape
    w, g, h = random_layer(out, in_, k)
    _, packed = rabit.residual_binarize(w, g, h)
    layout_t = rabit.i8_layout(packed, in_)
    layout_n = _core.i8_layout(packed.numpy().view(np.uint32), in_)
    assert layout_n.dtype == np.uint8 and np.array_equal(layout_n, layout_t.numpy())
    for m in (1, 2, 5):
        x = torch.randn(m, in_)
        bias = torch.randn(out)
        y_t = rabit.packed_linear_i8(x, layout_t, g, h, bias)
        y_n = _core.packed_linear_i8(x.numpy(), layout_n, g.numpy(), h.numpy(), bias.numpy())
        assert np.array_equal(y_n, y_t.numpy())
    y1 = _core.packed_linear_i8(x[0].numpy(), layout_n, g.numpy(), h.numpy())
    assert y1.shape == (out,) and np.array_equal(y1, rabit.packed_linear_i8(x[:1], layout_t, g, h)[0].numpy())
    # the int8 head on the same shape (a dense weight)
    q_t, s_t = rabit.int8_weight(w)
    q_n, s_n = _core.int8_weight(w.numpy())
    assert q_n.dtype == np.int8 and s_n.dtype == np.float32
    assert np.array_equal(q_n, q_t.numpy()) and np.array_equal(s_n, s_t.numpy())
    for m in (1, 3):
        x = torch.randn(m, in_)
        y_t = rabit.int8_linear(x, q_t, s_t, out, bias)
        y_n = _core.int8_linear(x.numpy(), q_n, s_n, out, bias.numpy())
        assert np.array_equal(y_n, y_t.numpy())
    y1 = _core.int8_linear(x[0].numpy(), q_n, s_n, out)
    assert y1.shape == (out,) and np.array_equal(y1, rabit.int8_linear(x[:1], q_t, s_t, out)[0].numpy())


def test_core_int8_entry_points_reject_bad_input():
    w, g, h = random_layer(20, 70, 2)
    _, packed = rabit.residual_binarize(w, g, h)
    p, gn, hn = packed.numpy().view(np.uint32), g.numpy(), h.numpy()
    layout = _core.i8_layout(p, 70)
    x = np.random.randn(2, 70).astype(np.float32)
    with pytest.raises(ValueError, match=r"in_features must be in \[1, \d+\], got 0"):
        _core.i8_layout(p, 0)
    with pytest.raises(ValueError, match=r"in_features must be in \[1, \d+\], got 9223372036854775807"):
        _core.i8_layout(p, sys.maxsize)  # refused before the word count's arithmetic could overflow
    with pytest.raises(ValueError, match=r"expected packed \[K, out, 7\] \(in=200\).*got \[2, 20, 3\]"):
        _core.i8_layout(p, 200)
    with pytest.raises(TypeError, match="packed to have dtype u4"):
        _core.i8_layout(p.astype(np.int64), 70)
    with pytest.raises(ValueError, match="expected layout to be"):
        _core.packed_linear_i8(x, layout[:-1], gn, hn)
    with pytest.raises(TypeError, match="layout to have dtype u1"):
        _core.packed_linear_i8(x, layout.view(np.int8), gn, hn)
    with pytest.raises(ValueError, match="x has 69 columns"):
        _core.packed_linear_i8(x[:, :69], layout, gn, hn)
    with pytest.raises(ValueError, match="bias has 19 elements but out=20"):
        _core.packed_linear_i8(x, layout, gn, hn, np.zeros(19, np.float32))
    with pytest.raises(TypeError, match="x to have dtype f4"):
        _core.packed_linear_i8(x.astype(np.float64), layout, gn, hn)
    q, s = _core.int8_weight(w.numpy())
    with pytest.raises(ValueError, match="NaN or Inf"):
        _core.int8_weight(np.full((3, 5), np.nan, np.float32))
    with pytest.raises(ValueError, match="non-empty weight"):
        _core.int8_weight(np.zeros((0, 5), np.float32))
    with pytest.raises(ValueError, match=r"out_features must be in \[1, \d+\], got 0"):
        _core.int8_linear(x, q, s, 0)
    with pytest.raises(ValueError, match=r"out_features must be in \[1, \d+\], got 9223372036854775807"):
        _core.int8_linear(x, q, s, sys.maxsize)
    with pytest.raises(ValueError, match=r"expected qweight int8 \[2, 3, 8, 32\]"):
        _core.int8_linear(x, q, s, 9)  # 9 rows are 2 groups of 8; q holds 3
    with pytest.raises(ValueError, match=r"expected qweight int8 \[3, 2, 8, 32\]"):
        _core.int8_linear(x[:, :40], q, s, 20)  # 40 columns are 2 blocks of 32; q holds 3
    with pytest.raises(TypeError, match="scales to have dtype f4"):
        _core.int8_linear(x, q, s.astype(np.float64), 20)
