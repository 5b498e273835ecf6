"""rabit.decode_attention (one decoding step: rotary, cache write, attention over positions 0..pos) against
rabit.reference.decode_attention on the CPU and, where there is one, the GPU: the caches must match bit for bit, the
output follows the 2x rule against a float64 oracle; plus input errors and the CUDA kernel's limits."""

import pytest
import torch

import rabit
from rabit import reference as R

from conftest import available_devices
from helpers import FLOAT_DTYPES, assert_float_close, dtype_id

DEVICES = available_devices()


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def rotary_tables(S, D, dtype, device):
    """cos, sin [S, D] as HF builds them (angles repeated over the two halves), in dtype."""
    ang = torch.rand(S, D // 2, device=device) * 6.3
    ang = torch.cat([ang, ang], -1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def make_case(B, H, Hkv, D, S, dtype, device, strided=False):
    """q [B, H, D], k, v [B, Hkv, D] (strided: views into wider rows, as a stacked projection's outputs are), random
    caches [B, Hkv, S, D] and rotary tables."""
    def heads(n):
        if not strided:
            return torch.randn(B, n, D, device=device).to(dtype)
        wide = torch.randn(B, n * D + 24, device=device).to(dtype)
        return wide[:, 8:8 + n * D].view(B, n, D)
    q, k, v = heads(H), heads(Hkv), heads(Hkv)
    kc = torch.randn(B, Hkv, S, D, device=device).to(dtype)
    vc = torch.randn(B, Hkv, S, D, device=device).to(dtype)
    cos, sin = rotary_tables(S, D, dtype, device)
    return q, k, v, kc, vc, cos, sin


def oracle64(q, kc, vc, cos, sin, pos, scale):
    """The output in float64 from the caches the op wrote and rope(q) as the spec rounds it."""
    B, H, D = q.shape
    Hkv = kc.shape[1]
    qr = R.rope(q, cos[pos], sin[pos]).double().reshape(B, Hkv, H // Hkv, D)
    keys, vals = kc[:, :, : pos + 1].double(), vc[:, :, : pos + 1].double()
    w = torch.softmax((qr @ keys.transpose(-1, -2)) * scale, dim=-1)
    return (w @ vals).reshape(B, H, D)


def check_against_reference(B, H, Hkv, D, S, pos, dtype, device, strided=False):
    q, k, v, kc, vc, cos, sin = make_case(B, H, Hkv, D, S, dtype, device, strided)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    p = torch.tensor([pos], device=device)
    with torch.no_grad():
        out = rabit.decode_attention(q, k, v, kc, vc, cos, sin, p)
        ref = R.decode_attention(q, k, v, kc_ref, vc_ref, cos, sin, p, D ** -0.5)
    what = f"B={B} H={H} Hkv={Hkv} D={D} S={S} pos={pos} {dtype}"
    assert out.shape == (B, H, D) and out.dtype == dtype and out.is_contiguous()
    assert torch.equal(kc, kc_ref), f"{what}: k cache differs from the reference"
    assert torch.equal(vc, vc_ref), f"{what}: v cache differs from the reference"
    assert_float_close(out, ref, oracle64(q, kc_ref, vc_ref, cos, sin, pos, D ** -0.5), what)


# (B, H, Hkv, D, S, pos): one chunk and several (the CUDA kernel splits the cache in chunks of 64 positions),
# pos at a chunk's first and last position, position 0, grouped-query heads 1..8, head dims 8..256
CASES = [
    (1, 4, 4, 8, 5, 0),
    (1, 1, 1, 16, 3, 2),
    (2, 9, 3, 64, 40, 17),
    (1, 9, 3, 64, 300, 299),
    (3, 8, 2, 32, 129, 127),
    (2, 8, 2, 32, 260, 128),
    (1, 32, 32, 128, 385, 200),
    (2, 32, 8, 128, 257, 256),
    (1, 14, 2, 64, 700, 513),
    (1, 16, 2, 80, 150, 149),
    (2, 8, 8, 256, 140, 139),
    # many (row, KV head) pairs: on CUDA a block loops over several chunks (a running max), with and without a combine
    (4, 32, 32, 32, 700, 650),
    (16, 40, 40, 32, 300, 299),
    (16, 40, 40, 32, 300, 70),
    (1, 8, 2, 64, 2048, 1999),  # batch 1, long cache: on sm_90 a cluster of 8 blocks of 4 chunks each
    (1, 4, 2, 16, 64, 63),  # the last position of the first chunk
    (2, 4, 2, 16, 130, 64),  # the first position of the second chunk
]


def case_id(c):
    return "B{}-H{}-Hkv{}-D{}-S{}-p{}".format(*c)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_decode_attention_matches_reference(case, dtype, device):
    B, H, Hkv, D, S, pos = case
    if device == "cuda" and dtype == torch.float32 and D > 128:
        pytest.skip("the CUDA kernel takes float32 head dimensions up to 128 (tested below)")
    check_against_reference(B, H, Hkv, D, S, pos, dtype, device)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_decode_attention_strided_projections_and_random_sizes(dtype, device):
    # q, k, v as views into wider rows (the stacked FP projections' outputs), and fresh random sizes
    check_against_reference(2, 6, 3, 64, 200, 150, dtype, device, strided=True)
    for _ in range(3):
        Hkv = int(torch.randint(1, 5, ()))
        G = int(torch.randint(1, 9, ()))
        D = 8 * int(torch.randint(1, 17 if dtype == torch.float32 else 33, ()))
        S = int(torch.randint(1, 600, ()))
        pos = int(torch.randint(0, S, ()))
        check_against_reference(int(torch.randint(1, 4, ())), Hkv * G, Hkv, D, S, pos, dtype, device)


def test_decode_attention_head_dims_not_multiples_of_8_on_cpu():
    # the CPU kernel takes any even head dimension
    for D in (2, 6, 10, 34):
        check_against_reference(2, 6, 2, D, 20, 11, torch.float32, "cpu")
        check_against_reference(1, 4, 4, D, 9, 8, torch.float16, "cpu")


def test_decode_attention_steps_match_full_attention(device):
    # decoding token by token through the cache gives causal attention over the whole sequence
    B, H, Hkv, D, T = 2, 6, 2, 32, 37
    q = torch.randn(B, T, H, D, device=device)
    k = torch.randn(B, T, Hkv, D, device=device)
    v = torch.randn(B, T, Hkv, D, device=device)
    cos, sin = rotary_tables(T, D, torch.float32, device)
    kc = torch.zeros(B, Hkv, T, D, device=device)
    vc = torch.zeros_like(kc)
    with torch.no_grad():
        outs = [rabit.decode_attention(q[:, t], k[:, t], v[:, t], kc, vc, cos, sin, torch.tensor([t], device=device))
                for t in range(T)]
    out = torch.stack(outs, 1)  # [B, T, H, D]
    qr = R.rope(q, cos[None, :, None], sin[None, :, None]).transpose(1, 2)
    kr = R.rope(k, cos[None, :, None], sin[None, :, None]).transpose(1, 2)
    want = torch.nn.functional.scaled_dot_product_attention(qr, kr, v.transpose(1, 2), is_causal=True,
                                                            enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(kc, kr)


def test_decode_attention_nan_propagates(device):
    q, k, v, kc, vc, cos, sin = make_case(1, 4, 2, 16, 10, torch.float32, device)
    kc[0, 1, 3, 5] = float("nan")  # KV head 1 sees a NaN key; head 0 does not
    with torch.no_grad():
        out = rabit.decode_attention(q, k, v, kc, vc, cos, sin, torch.tensor([6], device=device))
    assert torch.isfinite(out[0, :2]).all()
    assert torch.isnan(out[0, 2:]).all()


def test_decode_attention_errors(device):
    q, k, v, kc, vc, cos, sin = make_case(1, 4, 2, 16, 10, torch.float32, device)
    p = torch.tensor([3], device=device)
    op = rabit.decode_attention
    with torch.no_grad():
        with pytest.raises(ValueError, match="expected a 3-D q"):
            op(q[None], k, v, kc, vc, cos, sin, p)
        with pytest.raises(ValueError, match="not a multiple of k's 3 KV heads"):
            op(q, torch.randn(1, 3, 16, device=device), torch.randn(1, 3, 16, device=device), kc, vc, cos, sin, p)
        with pytest.raises(TypeError, match="must share one dtype"):
            op(q, k, v, kc.half(), vc, cos, sin, p)
        with pytest.raises(ValueError, match="caches must be"):
            op(q, k, v, kc[:, :1], vc[:, :1], cos, sin, p)
        with pytest.raises(ValueError, match="cos and sin must be"):
            op(q, k, v, kc, vc, cos[:5], sin[:5], p)
        with pytest.raises(ValueError, match="head dimension must be even"):
            op(q[..., :15], k[..., :15], v[..., :15], kc[..., :15].contiguous(), vc[..., :15].contiguous(),
               cos[:, :15].contiguous(), sin[:, :15].contiguous(), p)
        with pytest.raises(TypeError, match="1-element int64"):
            op(q, k, v, kc, vc, cos, sin, p.int())
        with pytest.raises(ValueError, match="dense last dimension"):
            op(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, kc, vc, cos, sin, p)
        with pytest.raises(ValueError, match="expected kc to be contiguous|expected k_cache to be contiguous"):
            op(q, k, v, kc.transpose(2, 3).contiguous().transpose(2, 3), vc, cos, sin, p)
        with pytest.raises(ValueError, match="scale must be finite"):
            op(q, k, v, kc, vc, cos, sin, p, scale=0.0)
    with pytest.raises(RuntimeError, match="has no backward"):
        op(q.requires_grad_(), k, v, kc, vc, cos, sin, p)


def test_decode_attention_refuses_caches_that_share_memory(device):
    q, k, v, kc, vc, cos, sin = make_case(1, 4, 2, 16, 10, torch.float32, device)
    p = torch.tensor([3], device=device)
    with torch.no_grad():
        with pytest.raises(ValueError, match="k_cache shares memory with v_cache"):
            rabit.decode_attention(q, k, v, kc, kc, cos, sin, p)
        with pytest.raises(ValueError, match="k shares memory with k_cache"):
            rabit.decode_attention(q, kc[:, :, 0], v, kc, vc, cos, sin, p)


def test_reference_rejects_pos_outside_cache():
    # the spec, which use_reference_kernels registers as the op: a negative pos must not wrap around
    q, k, v, kc, vc, cos, sin = make_case(1, 4, 2, 16, 10, torch.float32, "cpu")
    before = kc.clone()
    for bad in (-1, 10):
        with pytest.raises(ValueError, match=f"pos={bad} is outside the cache's 10 positions"):
            R.decode_attention(q, k, v, kc, vc, cos, sin, torch.tensor([bad]), 0.25)
    assert torch.equal(kc, before)


def test_decode_attention_cpu_rejects_pos_outside_cache():
    q, k, v, kc, vc, cos, sin = make_case(1, 4, 2, 16, 10, torch.float32, "cpu")
    before = kc.clone()
    with torch.no_grad(), pytest.raises(ValueError, match="pos=10 is outside the cache's 10 positions"):
        rabit.decode_attention(q, k, v, kc, vc, cos, sin, torch.tensor([10]))
    assert torch.equal(kc, before)


@pytest.mark.cuda
def test_decode_attention_device_mismatch_is_named():
    q, k, v, kc, vc, cos, sin = make_case(1, 4, 2, 16, 10, torch.float16, "cuda")
    with torch.no_grad(), pytest.raises(ValueError, match="on q's device"):
        rabit.decode_attention(q, k, v, kc, vc, cos, sin, torch.tensor([3]))


# ---------------------------------------------------------------- CUDA only
cuda = pytest.mark.cuda


@cuda
def test_cuda_pos_outside_cache_gives_nan_and_leaves_caches():
    q, k, v, kc, vc, cos, sin = make_case(2, 4, 2, 16, 10, torch.float16, "cuda")
    before_k, before_v = kc.clone(), vc.clone()
    for bad in (10, -1):
        with torch.no_grad():
            out = rabit.decode_attention(q, k, v, kc, vc, cos, sin, torch.tensor([bad], device="cuda"))
        assert torch.isnan(out).all()
        assert torch.equal(kc, before_k) and torch.equal(vc, before_v)


@cuda
@pytest.mark.parametrize("dtype,G,D,why", [
    (torch.float16, 9, 64, "more than 8 query heads"),
    (torch.bfloat16, 1, 68, "not a multiple of 8"),
    (torch.float16, 1, 264, "above 256"),
    (torch.float32, 1, 256, "float32 head dimension above 128"),
])
def test_cuda_unsupported_shapes_are_named(dtype, G, D, why):
    q, k, v, kc, vc, cos, sin = make_case(1, G, 1, D, 8, dtype, "cuda")
    with torch.no_grad(), pytest.raises(ValueError, match=why):
        rabit.decode_attention(q, k, v, kc, vc, cos, sin, torch.tensor([3], device="cuda"))


# On sm_90 the blocks of a (row, KV head) combine their parts in a thread-block cluster when there are few such
# pairs, else (and on sm_80) through device memory and a counter; RABIT_CUDA_ATTENTION_COMBINE forces either, so the
# H100 tests both at every shape.
COMBINE = ["cluster", "counter"]


@cuda
@pytest.mark.parametrize("combine", COMBINE)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cuda_both_combines_match_reference(case, combine, monkeypatch):
    monkeypatch.setenv("RABIT_CUDA_ATTENTION_COMBINE", combine)
    B, H, Hkv, D, S, pos = case
    check_against_reference(B, H, Hkv, D, S, pos, torch.float16, "cuda")
    check_against_reference(B, H, Hkv, D, S, pos, torch.bfloat16, "cuda")
    check_against_reference(B, H, Hkv, min(D, 128), S, pos, torch.float32, "cuda")


@cuda
@pytest.mark.parametrize("combine", COMBINE)
def test_cuda_nan_propagates_through_the_combine(combine, monkeypatch):
    # a NaN key in one block's chunk reaches the output through either combine; a huge but finite key in another
    # block's chunk (scores of -inf after float32 overflow) leaves the output finite
    monkeypatch.setenv("RABIT_CUDA_ATTENTION_COMBINE", combine)
    q, k, v, kc, vc, cos, sin = make_case(1, 4, 2, 64, 2000, torch.float32, "cuda")
    kc[0, 1, 700, 5] = float("nan")  # KV head 1 only
    with torch.no_grad():
        out = rabit.decode_attention(q, k, v, kc, vc, cos, sin, torch.tensor([1900], device="cuda"))
    assert torch.isfinite(out[0, :2]).all() and torch.isnan(out[0, 2:]).all()


@cuda
def test_cuda_combine_setting_is_checked(monkeypatch):
    q, k, v, kc, vc, cos, sin = make_case(1, 4, 2, 16, 300, torch.float16, "cuda")
    monkeypatch.setenv("RABIT_CUDA_ATTENTION_COMBINE", "atomics")
    with torch.no_grad(), pytest.raises(ValueError, match="must be counter or cluster"):
        rabit.decode_attention(q, k, v, kc, vc, cos, sin, torch.tensor([200], device="cuda"))


@cuda
@pytest.mark.parametrize("combine", COMBINE)
@pytest.mark.parametrize("B,H,Hkv", [(2, 8, 2), (8, 32, 32)], ids=["chunk-per-block", "chunks-per-block"])
def test_cuda_graph_replays_at_the_current_position(B, H, Hkv, combine, monkeypatch):
    monkeypatch.setenv("RABIT_CUDA_ATTENTION_COMBINE", combine)
    # pos is read on the device: one captured call serves every position; the blocks in use follow pos
    D, S = 64, 400
    q, k, v, kc, vc, cos, sin = make_case(B, H, Hkv, D, S, torch.float16, "cuda")
    kc_ref, vc_ref = kc.clone(), vc.clone()
    pos = torch.zeros(1, dtype=torch.long, device="cuda")
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            rabit.decode_attention(q, k, v, kc.clone(), vc.clone(), cos, sin, pos)  # warm-up
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = rabit.decode_attention(q, k, v, kc, vc, cos, sin, pos)
        for p in (0, 1, 127, 128, 255, 256, 399):
            pos.fill_(p)
            graph.replay()
            ref = R.decode_attention(q, k, v, kc_ref, vc_ref, cos, sin, pos, D ** -0.5)
            assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref), f"pos={p}"
            assert_float_close(out, ref, oracle64(q, kc_ref, vc_ref, cos, sin, p, D ** -0.5), f"pos={p}")


def test_decode_attention_cpu_scalar_and_avx2_give_the_same_bits():
    """The CPU kernel's scalar loops (forced "ref") and its AVX2 ones: the same float32 operations in the same order,
    so the same outputs and caches bit for bit (head widths with and without a tail of 16, positions across chunks of
    64, every dtype)."""
    from helpers import outputs_by_cpu_kernel

    for (B, H, Hkv, D, S, pos), dtype in zip([(1, 9, 3, 64, 300, 200), (2, 6, 2, 34, 90, 70), (1, 4, 4, 10, 20, 5)],
                                             FLOAT_DTYPES):
        q, k, v, kc, vc, cos, sin = make_case(B, H, Hkv, D, S, dtype, "cpu")

        def run():
            kc2, vc2 = kc.clone(), vc.clone()
            out = rabit.decode_attention(q, k, v, kc2, vc2, cos, sin, torch.tensor([pos]))
            return out, kc2, vc2

        runs = list(outputs_by_cpu_kernel(run).values())
        for other in runs[1:]:
            assert all(torch.equal(a, b) for a, b in zip(runs[0], other)), (B, H, Hkv, D, S, pos, dtype)
