"""rabit.int8_weight / rabit.int8_linear (CPU, llama.cpp's Q8_0 kind, for a packed model's dense LM head) against
rabit.reference bit for bit, the scalar and AVX2 kernels against each other, the accuracy class against float64, the
exact round trip of Q8_0 weights, and the errors."""
import pytest
import torch

import rabit
from rabit import reference as R

from helpers import FLOAT_DTYPES, dtype_id, outputs_by_cpu_kernel

# rows not a multiple of 8, columns not a multiple of 32, one row / column, SmolLM2's head width
SHAPES = [(1, 1), (3, 5), (8, 32), (9, 33), (17, 100), (40, 257), (64, 576), (131, 1000), (250, 64)]


@pytest.mark.parametrize("m", [1, 2, 5])
@pytest.mark.parametrize("xdtype", FLOAT_DTYPES, ids=dtype_id)
def test_int8_linear_equals_reference_bit_for_bit(m, xdtype):
    seed = torch.randint(0, 2**31 - 1, ()).item()  # fresh each run; printed on failure
    for i, (out, in_features) in enumerate(SHAPES):
        torch.manual_seed(seed + i)
        w = (torch.randn(out, in_features) * torch.rand(out, 1) * 0.1).to(FLOAT_DTYPES[i % 3])
        q, s = rabit.int8_weight(w)
        qr, sr = R.int8_weight(w)
        assert torch.equal(q, qr) and torch.equal(s, sr), (seed, out, in_features)
        x = (torch.randn(m, in_features) * 3).to(xdtype)
        bias = torch.randn(out) if i % 2 else None
        want = R.int8_linear(x, q, s, out, bias)
        for kernel, y in outputs_by_cpu_kernel(lambda: rabit.int8_linear(x, q, s, out, bias)).items():
            assert y.dtype == xdtype and y.shape == (m, out)
            assert torch.equal(y, want), (seed, kernel, out, in_features, (y.float() - want.float()).abs().max())


def test_int8_weight_layout_and_q8_0_round_trip():
    """Row o, block b is qweight[o // 8, b, o % 8] with scale scales[o // 8, b, o % 8], zero rows and columns past the
    weight; a weight made of Q8_0 blocks (int8 values times an fp16 scale, one value at +-127 per block, as llama.cpp
    writes them) comes back exactly."""
    torch.manual_seed(0)
    out, in_features = 19, 70
    qv = torch.randint(-127, 128, (out, 3, 32))
    qv[:, :, 5] = 127 * torch.where(torch.rand(out, 3) < 0.5, 1, -1)  # amax = 127 d
    d = (torch.rand(out, 3) * 0.01 + 1e-3).half().float()
    w = (qv * d[..., None]).flatten(1)[:, :in_features]
    q, s = rabit.int8_weight(w)
    assert q.shape == (3, 3, 8, 32) and s.shape == (3, 3, 8)
    for o in (0, 7, 8, 18):
        row = q[o // 8, :, o % 8].flatten()
        assert torch.equal(row[:64], qv[o].flatten()[:64].to(torch.int8))  # blocks 0, 1: whole
        assert torch.equal(s[o // 8, :2, o % 8], d[o, :2])
        assert torch.equal(row[70:], torch.zeros(26, dtype=torch.int8))  # past in
    assert not q[2, :, 3:].any() and not s[2, :, 3:].any()  # rows 19..23 are padding
    back = (q.float() * s[..., None]).transpose(1, 2).flatten(0, 1).flatten(1)[:out, :64]
    assert torch.equal(back, w[:, :64])


def test_int8_linear_accuracy_is_the_int8_class():
    """Relative error of the whole output against float64: ~1e-2 (int8 weights and activations, a scale per 32
    columns); a wrong block, row or scale gives O(1)."""
    torch.manual_seed(1)
    for out, in_features in [(512, 576), (256, 1536), (64, 4096)]:
        w = torch.randn(out, in_features) * 0.05
        x = torch.randn(3, in_features)
        y = rabit.int8_linear(x, *rabit.int8_weight(w), out)
        oracle = x.double() @ w.double().T
        err = ((y.double() - oracle).norm() / oracle.norm()).item()
        assert 1e-3 < err < 2e-2, (out, in_features, err)


def test_int8_linear_non_finite_and_tiny_x():
    """A NaN or Inf in a row of x makes that row's outputs NaN, the other rows finite; a block below 2^-120 counts as
    zero (127 / amax would overflow), in the kernels and the reference alike."""
    torch.manual_seed(2)
    w = torch.randn(20, 70)
    q, s = rabit.int8_weight(w)
    x = torch.randn(3, 70)
    x[0, 5] = float("nan")
    x[2, 40] = float("inf")
    x[1, :32] = 1e-38
    for y in outputs_by_cpu_kernel(lambda: rabit.int8_linear(x, q, s, 20)).values():
        assert y[0].isnan().all() and y[2].isnan().all() and y[1].isfinite().all()
        assert torch.equal(y[1], R.int8_linear(x, q, s, 20)[1])
        zeroed = x[1:2].clone()
        zeroed[:, :32] = 0
        assert torch.equal(y[1], rabit.int8_linear(zeroed, q, s, 20)[0])  # the tiny block adds nothing


def test_int8_errors():
    w = torch.randn(9, 40)
    q, s = rabit.int8_weight(w)
    with pytest.raises(ValueError, match=r"rabit.int8_weight: expected a 2-D weight, got 3-D"):
        rabit.int8_weight(w[None])
    with pytest.raises(ValueError, match=r"rabit.int8_weight: the weight contains NaN or Inf"):
        rabit.int8_weight(torch.tensor([[1.0, float("inf")]]))
    with pytest.raises(ValueError, match=r"expected qweight to be a contiguous int8 \[3, 2, 8, 32\].*x is \[1, 40\]"):
        rabit.int8_linear(torch.randn(1, 40), q, s, 17)  # 17 rows need 3 groups of 8
    with pytest.raises(ValueError, match=r"expected qweight to be a contiguous int8 \[2, 3, 8, 32\]"):
        rabit.int8_linear(torch.randn(1, 70), q, s, 9)  # x too wide for the weight
    with pytest.raises(ValueError, match=r"expected scales to be a contiguous float32 \[2, 2, 8\]"):
        rabit.int8_linear(torch.randn(1, 40), q, s.half(), 9)
    with pytest.raises(ValueError, match=r"bias has 3 elements but out=9"):
        rabit.int8_linear(torch.randn(1, 40), q, s, 9, torch.randn(3))
    with pytest.raises(TypeError, match=r"expected x to be float32, float16 or bfloat16, got Int"):
        rabit.int8_linear(torch.ones(1, 40, dtype=torch.int32), q, s, 9)
    with pytest.raises(ValueError, match=r"out_features must be >= 1"):
        rabit.int8_linear(torch.randn(1, 40), q, s, 0)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"rabit.int8_linear: runs on the CPU only"):
            rabit.int8_linear(torch.randn(1, 40, device="cuda"), q, s, 9)
