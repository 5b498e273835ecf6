"""rabit._core (CPython + NumPy C API, no torch) against the torch ops: same kernels, same bits."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import rabit
from rabit import _core

from helpers import SHAPES, random_layer, shape_id


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
    w[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        _core.residual_binarize(w, g, h)
    _, packed = _core.residual_binarize(np.ones((4, 10), np.float32), g, h)
    with pytest.raises(TypeError, match="packed to have dtype u4"):
        _core.packed_linear(np.ones(10, np.float32), packed.astype(np.int64), g, h)
    with pytest.raises(ValueError, match="bias has 3 elements"):
        _core.packed_linear(np.ones(10, np.float32), packed, g, h, np.ones(3, np.float32))
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
