"""Shapes, dtypes and error rules shared by the op tests."""

import os

import torch

# (out, in): odd sizes, in not a multiple of 32, out=1, in=1, and exact word multiples
SHAPES = [(1, 1), (1, 33), (3, 1), (2, 5), (7, 31), (5, 32), (9, 33), (16, 64), (13, 95), (31, 127), (64, 129),
          (33, 257)]
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def shape_id(s):
    return f"{s[0]}x{s[1]}"


def dtype_id(d):
    return str(d).replace("torch.", "")


def random_layer(out, in_features, k, dtype=torch.float32, device="cpu"):
    """A latent weight with scales of a realistic size (≈ what the init produces)."""
    w = torch.randn(out, in_features, device=device).to(dtype)
    g = (torch.rand(k, out, device=device) + 0.2) * 0.6 ** torch.arange(k, device=device)[:, None]
    h = torch.rand(k, in_features, device=device) + 0.2
    return w, g, h


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_float_close(kernel, ref_low, ref64, what="", terms_abs=None, n_terms=1):
    """Kernel error against a float64 reference must be at most 2x the error of the plain-PyTorch
    reference computed in the same low precision (the flash-attention rule), plus a float32 floor so
    that a reference that happens to be exact does not demand the impossible: 2 eps of the result,
    or, for a sum of n_terms terms whose absolute values add up to terms_abs, the usual
    eps * sqrt(n) * Σ|terms| rounding bound of float32 summation."""
    eps = torch.finfo(torch.float32).eps
    ref_norm = ref64.double().norm().clamp_min(1e-30)
    floor = 2 * eps
    if terms_abs is not None:
        floor = max(floor, (eps * n_terms**0.5 * terms_abs.double().norm() / ref_norm).item())
    k_err, r_err = rel_err(kernel, ref64), rel_err(ref_low, ref64)
    assert k_err <= 2 * r_err + floor, (f"{what}: kernel rel err {k_err:.3g} > 2 x reference rel err {r_err:.3g} "
                                        f"+ float32 floor {floor:.3g}")


def abs_terms(x, g, h, bias):
    """Σ over the summed terms' absolute values of a packed linear: Σ_k |g_k| (|x| · |h_k|) + |bias|."""
    t = sum(g[k].abs().double()[None, :] * (x.abs().double() @ h[k].abs().double())[:, None]
            for k in range(g.shape[0]))
    return t + (bias.abs().double() if bias is not None else 0)


# From this many rows of fp16/bf16 x on (up to 16) the CUDA decode dispatch takes the fp16 kernel, which rounds x*h
# once to fp16, for every layer the CUDA-core kernel does not take (kF16MinM in kernels/cuda/packed_linear.cu;
# tests/test_cuda.py checks the dispatch against it)
CUDA_F16_DECODE_MIN_M = 2
# The CUDA-core kernel (float32-accurate) runs for M <= CUDA_SIMT_MAX_M and in <= CUDA_SIMT_MAX_IN when forced
# (kSimtMaxM, kSimtMaxIn in kernels/cuda/rabit_cuda.cuh), and by default for M <= CUDA_SIMT_DEFAULT_MAX_M,
# in <= CUDA_SIMT_DEFAULT_MAX_IN and out * in <= CUDA_SIMT_DEFAULT_MAX_WEIGHTS as well (kSimtDefault* in
# kernels/cuda/packed_linear.cu), on GPUs whose shared memory per block holds the kernel's (every K and M on
# A100/H100/H200; not K = M = 4 at the widest rows on GPUs with 99 KB, which take another kernel there: these mirrors
# do not model that)
CUDA_SIMT_MAX_IN = 2048
CUDA_SIMT_MAX_M = 4
CUDA_SIMT_DEFAULT_MAX_M = 2
CUDA_SIMT_DEFAULT_MAX_IN = 1536
CUDA_SIMT_DEFAULT_MAX_WEIGHTS = 3 << 20


def cuda_rounds_xh_to_fp16(device, xdtype, m):
    """Whether packed_linear on this device, dtype and batch runs the fp16 decode kernel (RABIT_CUDA_DECODE, when
    set, forces a decode kernel at every M <= 16: f16, or i8 / b1 / simt, whose results are float32-level; b1 and
    simt only where they apply, the default elsewhere, which is fp16 from CUDA_F16_DECODE_MIN_M on). It does not model
    the CUDA-core kernel that small narrow layers take at M <= CUDA_SIMT_DEFAULT_MAX_M by default: True there too
    (from CUDA_F16_DECODE_MIN_M), which holds that kernel (float32-accurate) to the looser bound of the fp16
    reference."""
    if not str(device).startswith("cuda") or xdtype == torch.float32 or m > 16:
        return False
    forced = os.environ.get("RABIT_CUDA_DECODE")
    if forced in ("i8", "f16") or (forced in ("b1", "b1p") and m <= 2):  # b1 and b1p apply to M <= 2 only
        return forced == "f16"
    return m >= CUDA_F16_DECODE_MIN_M


TINY_VOCAB = 48


def tiny_llama(seed: int = 0):
    """A 2-layer GQA Llama with a 48-token vocabulary, for tests that need any causal LM."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def save_word_tokenizer(d, vocab_size: int = TINY_VOCAB):
    """A word-level tokenizer ("<unk>", "w1", "w2", ...) saved into the Hugging Face model directory d."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                            unk_token="<unk>").save_pretrained(d)


def tiny_hf_dir(d, tokenizer: bool = True):
    """tiny_llama saved as a Hugging Face model directory, with a word-level tokenizer of its vocabulary unless
    told not to; returns d."""
    tiny_llama().save_pretrained(d)
    if tokenizer:
        save_word_tokenizer(d)
    return d


def tanh_ste_dw_bound(grad, dw_ref):
    """How far a kernel's dW with the tanh STE may lie from dw_ref: libm tanhf and PyTorch's vectorised tanh (or
    CUDA's) may differ in the last bit; the factor 1 - t^2 lies in [0, 1], so its error is a few float32 eps absolute,
    i.e. a few eps of |G| in dW, plus one rounding of dW to its dtype: one unit in the last place, which below the
    dtype's smallest normal is the fixed subnormal spacing (a float16 dW of 2.6e-5 differed by 2^-24 = 6e-8, more
    than eps * |dW|, with RABIT_TEST_SEED=501432293)."""
    fi = torch.finfo(dw_ref.dtype)
    ulp = torch.clamp(fi.eps * dw_ref.float().abs(), min=fi.smallest_normal * fi.eps)
    return 4 * torch.finfo(torch.float32).eps * grad.cpu().float().abs() + ulp


def outputs_by_cpu_kernel(fn):
    """{kernel: fn()} with the CPU kernel forced to "ref" (scalar) and, where this CPU runs it, "avx2", then back to
    "auto": what the int8 kernels' bit-for-bit tests compare."""
    import rabit

    out = {}
    for name in ("ref", "avx2"):
        try:
            rabit.set_cpu_kernel(name)
        except RuntimeError:  # this CPU cannot run it
            continue
        try:
            out[name] = fn()
        finally:
            rabit.set_cpu_kernel("auto")
    return out
