"""Export / reload of packed RaBiT models: files, exactness, sizes, HF round trip, errors, CLI."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import rabit
from rabit import export
from rabit.cli import main as cli_main
from rabit.models import load_stories260k
from rabit.nn import PackedRaBiTLinear
from rabit.runtime import LlamaRuntime
from rabit.runtime.format import ExportFormatError, quantized_layer_bytes

from helpers import save_word_tokenizer, tiny_hf_dir  # noqa: E402

PROMPT = "Once upon a time"



@pytest.fixture(scope="module")
def qat():
    """stories260K with every decoder linear in QAT form (lm_head, tied to the embedding, stays FP)."""
    model, tok = load_stories260k()
    rabit.quantize_(model, rabit.RabitConfig(), progress=False)
    return model, tok


@pytest.fixture(scope="module")
def packed(qat):
    return rabit.convert_(copy.deepcopy(qat[0]))


@pytest.fixture(scope="module")
def exported(packed, qat, tmp_path_factory):
    d = tmp_path_factory.mktemp("export") / "stories-rabit"
    export.save_pretrained(packed, d, tokenizer=qat[1])
    return d


@pytest.fixture(scope="module")
def ids(qat):
    return torch.tensor([qat[1].encode(PROMPT + ", there was a little girl")])


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


# -- what is written ----------------------------------------------------------------------------


def test_directory_contents_and_config(exported, packed):
    files = sorted(p.name for p in exported.iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors", "tok512.bin"]
    assert not any(p.name.startswith(".") for p in exported.parent.iterdir()), "temporary dir left behind"
    cfg = json.loads((exported / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "rabit" and qc["format_version"] == 1 == rabit.FORMAT_VERSION
    assert qc["k"] == 2 and qc["scale_dtype"] == "float16" and qc["bits_order"] == "lsb-first"
    assert qc["modules_to_not_convert"] == ["lm_head"]
    want = [n for n, m in packed.named_modules() if isinstance(m, PackedRaBiTLinear)]
    assert qc["quantized_modules"] == want and len(want) == 35
    assert qc["tokenizer"] == {"format": "llama2c", "file": "tok512.bin", "bos_id": 1, "eos_id": 2}
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["tie_word_embeddings"] is True


def test_weights_file_layout(exported):
    with safe_open(str(exported / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        meta = f.metadata()
        assert meta["format"] == "pt" and meta["format_version"] == "1"
        q = "model.layers.0.mlp.down_proj"  # in = 172: not a multiple of 32 (padding bits)
        assert f.get_slice(f"{q}.packed").get_dtype() == "I32"
        assert f.get_slice(f"{q}.packed").get_shape() == [2, 64, 6]
        assert f.get_slice(f"{q}.g").get_dtype() == "F16" and f.get_slice(f"{q}.h").get_shape() == [2, 172]
        last = f.get_tensor(f"{q}.packed")[..., -1].to(torch.int64) & 0xFFFFFFFF
        assert not bool((last >> (172 % 32)).any()), "padding bits must be written as 0"
    assert "model.embed_tokens.weight" in names
    assert "lm_head.weight" not in names  # tied: stored once
    assert not any(n.endswith(".weight") and "proj" in n for n in names)  # no dense copy of packed layers


def test_no_pickle_anywhere(exported):
    for p in exported.iterdir():
        head = p.read_bytes()[:2]
        assert head != b"\x80\x04" and head != b"\x80\x02", f"{p.name} looks like a pickle"
        assert p.suffix not in (".pt", ".pth", ".pkl", ".ckpt")


# -- round trip ---------------------------------------------------------------------------------


def test_reload_equals_convert_exactly(exported, packed, ids):
    reloaded = export.from_pretrained(exported)
    assert isinstance(reloaded.model.layers[0].self_attn.q_proj, PackedRaBiTLinear)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert not reloaded.training
    assert torch.equal(logits(reloaded, ids), logits(packed, ids))


def test_reload_matches_qat_with_fp16_scales(qat, ids, tmp_path):
    """Tight check. Export keeps scales in fp16; give the QAT model the same fp16-rounded scales and the
    reloaded packed model must reproduce it up to float32 summation order (the QAT forward builds Ŵ densely
    and runs F.linear, the packed kernel computes Σ_k g_k(B_k(h_k x))): bound 1e-4·max|logits|."""
    model = copy.deepcopy(qat[0])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, rabit.RaBiTLinear):
                m.g.copy_(m.g.half().float())
                m.h.copy_(m.h.half().float())
    want = logits(model, ids)
    export.save_pretrained(rabit.convert_(model), tmp_path / "m")
    got = logits(export.from_pretrained(tmp_path / "m"), ids)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_reload_vs_qat_within_fp16_scale_bound(qat, exported, ids):
    """Loose check against the QAT model itself (float32 scales). Rounding g and h to fp16 perturbs every
    Ŵ entry by a relative ≤ 2·2⁻¹¹ = 2⁻¹⁰; to first order each of the 4·L sequential linear stages (q/k/v,
    o, gate/up, down per layer) adds at most that relative error, so max|Δlogits| ≤ 4·L·2⁻¹⁰·max|logits|
    (L=5: ≈2% of the logit scale; observed ≈0.07%)."""
    want = logits(qat[0], ids)
    got = logits(export.from_pretrained(exported), ids)
    n_layers = qat[0].config.num_hidden_layers
    assert (got - want).abs().max() <= 4 * n_layers * 2**-10 * want.abs().max()
    assert (got - want).abs().max() > 0  # the scales really are rounded (the test can tell)


def test_generate_on_reloaded_model(exported, packed, qat):
    reloaded, tok = export.load_pretrained(exported)
    x = torch.tensor([tok.encode(PROMPT)])
    kw = dict(max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(x))
    out = reloaded.generate(x, **kw)
    assert out.shape == (1, x.shape[1] + 12)
    assert torch.equal(out, packed.generate(x, **kw))
    assert isinstance(tok.decode(out[0]), str)


def test_load_tokenizer_llama2c(exported, qat):
    tok = export.load_tokenizer(exported)
    assert tok.encode("Hello there, Lily!") == qat[1].encode("Hello there, Lily!")


def test_transformers_auto_model_loads_export(exported, packed, ids):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(exported))
    layers = [n for n, x in m.named_modules() if isinstance(x, PackedRaBiTLinear)]
    assert len(layers) == 35
    assert m.model.layers[0].mlp.up_proj.g.dtype == torch.float16  # scales not cast to the model dtype
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert torch.equal(logits(m, ids), logits(packed, ids))


@pytest.mark.parametrize("damage", ["module_left_out_of_config", "scale_missing_from_file"])
def test_transformers_auto_model_refuses_a_damaged_export(exported, tmp_path, damage):
    """transformers only warns about missing tensors: a layer left out of quantized_modules came up as a randomly
    initialised nn.Linear, and a missing scale was reported as NaN. Both are now named as rabit's loader names them."""
    from transformers import AutoModelForCausalLM

    d = tmp_path / "damaged"
    shutil.copytree(exported, d)
    if damage == "module_left_out_of_config":
        cfg = json.loads((d / "config.json").read_text())
        gone = cfg["quantization_config"]["quantized_modules"].pop()
        (d / "config.json").write_text(json.dumps(cfg))
        want = rf"tensor '{gone}.weight' is missing"
    else:
        tensors = load_file(str(d / "model.safetensors"))
        del tensors["model.layers.0.self_attn.q_proj.g"]
        save_file(tensors, str(d / "model.safetensors"))
        want = r"tensor 'model.layers.0.self_attn.q_proj.g' is missing"
    with pytest.raises(export.ExportFormatError, match=want):
        export.from_pretrained(d)
    with pytest.raises(export.ExportFormatError, match=want):
        AutoModelForCausalLM.from_pretrained(str(d))


def test_registration_is_lazy_and_works_in_a_fresh_process(exported):
    """`import rabit.export` must not import transformers (slow), yet AutoModel must then load exports."""
    script = (
        "import sys\n"
        "import rabit.export\n"
        "assert 'transformers.quantizers.auto' not in sys.modules\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(exported)!r})\n"
        "print(type(m.model.layers[0].mlp.up_proj).__name__)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "PackedRaBiTLinear"


def test_model_save_pretrained_round_trip(packed, ids, tmp_path):
    """HF's own save_pretrained writes the packed buffers as plain tensors once the quantization_config
    is attached; both loaders read the result."""
    from transformers import AutoModelForCausalLM

    m = export.attach_quantization_config(copy.deepcopy(packed))
    m.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert not list((tmp_path / "hf").glob("*.bin"))
    want = logits(packed, ids)
    assert torch.equal(logits(export.from_pretrained(tmp_path / "hf"), ids), want)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")), ids), want)


def test_resave_of_reloaded_model(exported, packed, ids, tmp_path):
    export.save_pretrained(export.from_pretrained(exported), tmp_path / "again")
    assert torch.equal(logits(export.from_pretrained(tmp_path / "again"), ids), logits(packed, ids))


def test_dtype_argument(exported, ids, packed):
    m = export.from_pretrained(exported, dtype=torch.bfloat16)
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16
    assert m.model.layers[0].self_attn.q_proj.g.dtype == torch.float16
    assert torch.isfinite(logits(m, ids)).all()


# -- sizes --------------------------------------------------------------------------------------


def _header_sizes(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()}, 8 + n


def test_packed_layer_bytes_match_formula(exported, packed):
    sizes, _ = _header_sizes(exported / "model.safetensors")
    for name, m in packed.named_modules():
        if isinstance(m, PackedRaBiTLinear):
            got = sum(sizes[f"{name}.{t}"] for t in ("packed", "g", "h"))
            k, out, inp = m.k, m.out_features, m.in_features
            assert got == k * out * math.ceil(inp / 32) * 4 + 2 * k * (out + inp) == quantized_layer_bytes(out, inp, k)


def test_directory_smaller_than_fp16_by_expected_factor(qat, packed, tmp_path):
    fp, _ = load_stories260k()
    n_params = sum(p.numel() for p in fp.parameters())  # tied embedding counted once
    fp16_bytes = 2 * n_params
    layers = [m for m in packed.modules() if isinstance(m, PackedRaBiTLinear)]
    n_quant = sum(m.in_features * m.out_features for m in layers)
    expected = sum(quantized_layer_bytes(m.out_features, m.in_features, m.k) for m in layers) \
        + 2 * (n_params - n_quant)  # every other tensor stored as fp16
    factor = fp16_bytes / expected
    d = export.save_pretrained(packed, tmp_path / "fp16", unquantized_dtype=torch.float16)
    weights = (d / "model.safetensors").stat().st_size
    _, header = _header_sizes(d / "model.safetensors")
    assert weights == expected + header
    total = export.directory_bytes(d)  # no tokenizer here: weights + config.json + generation_config.json
    json_bytes = sum((d / n).stat().st_size for n in ("config.json", "generation_config.json"))
    assert total == expected + header + json_bytes
    # For a 1 MB model the safetensors header and config.json (tensor and module names) are ~10% of the
    # directory; the factor over the tensor bytes is exact above, and the whole directory is within 15% of it.
    assert header + json_bytes < 0.12 * expected
    assert fp16_bytes / total >= 0.85 * factor
    assert 3.0 < factor < 4.0  # stories260K: 226,560 of 260,032 params are in packed layers
    # the same directory still loads, with fp16 embeddings cast to the requested dtype
    assert export.from_pretrained(d).model.embed_tokens.weight.dtype == torch.float16


# -- biases, untied and quantized lm_head, padding ----------------------------------------------


def tiny_llama(tie: bool, bias: bool, hidden: int = 48, inter: int = 100, vocab: int = 96):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=64,
                      tie_word_embeddings=tie, attention_bias=bias, mlp_bias=bias, rope_theta=500.0)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("tie, bias, exclude", [(False, True, ()), (True, False, ("lm_head", "*.o_proj"))])
def test_tiny_models_round_trip(tie, bias, exclude, tmp_path):
    m = tiny_llama(tie, bias)
    rabit.quantize_(m, rabit.RabitConfig(exclude=exclude), progress=False)
    p = rabit.convert_(m)
    d = export.save_pretrained(p, tmp_path / "t")
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    assert ("lm_head" in qc["quantized_modules"]) == (not exclude)
    x = torch.randint(0, 96, (2, 9))
    assert torch.equal(logits(export.from_pretrained(d), x), logits(p, x))


# -- export-side errors -------------------------------------------------------------------------


def test_save_rejects_unpacked_or_plain_models(qat, tmp_path):
    with pytest.raises(ValueError, match="rabit.convert_"):
        export.save_pretrained(qat[0], tmp_path / "a")
    fp, _ = load_stories260k()
    with pytest.raises(ValueError, match="no PackedRaBiTLinear"):
        export.save_pretrained(fp, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("dtype", [torch.int8, torch.float64])
def test_dtypes_the_packed_layers_cannot_run_are_refused_at_export(packed, qat, tmp_path, dtype):
    """int8 scales were all zeros and float64 activations reach the packed ops, which take neither: refused at
    convert_ / save_pretrained instead of at the first forward after loading."""
    with pytest.raises(TypeError, match=f"unquantized_dtype must be None, .* got {dtype}"):
        export.save_pretrained(packed, tmp_path / "x", unquantized_dtype=dtype)
    assert not (tmp_path / "x").exists()
    with pytest.raises(TypeError, match=f"scale_dtype must be one of .* got {dtype}"):
        rabit.convert_(copy.deepcopy(qat[0]), dtype)


def test_save_rejects_nonfinite_scales(packed, tmp_path):
    p = copy.deepcopy(packed)
    p.model.layers[1].mlp.gate_proj.h[0, 3] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.gate_proj\.h"):
        export.save_pretrained(p, tmp_path / "x")


def test_save_refuses_to_clobber_then_overwrites(packed, tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    (d / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="overwrite"):
        export.save_pretrained(packed, d)
    assert (d / "keep.txt").is_file()
    export.save_pretrained(packed, d, overwrite=True)
    assert not (d / "keep.txt").exists() and (d / "model.safetensors").is_file()


def test_save_under_a_file_is_named(packed, tmp_path):
    (tmp_path / "a_file").write_text("keep me")
    with pytest.raises(FileExistsError, match="a_file' is a file or lies under one; pass a directory"):
        export.save_pretrained(packed, tmp_path / "a_file" / "sub")
    assert (tmp_path / "a_file").read_text() == "keep me"


def test_exported_files_get_the_umask_permissions(packed, qat, tmp_path):
    """Every exported file is readable as a plain open() would leave it (safetensors writes its file 0600)."""
    old = os.umask(0o022)
    try:
        export.save_pretrained(packed, tmp_path / "out", tokenizer=qat[1])
    finally:
        os.umask(old)
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "out").iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes


def test_crash_mid_write_leaves_nothing_half_written(packed, tmp_path, monkeypatch):
    import safetensors.torch as st

    def boom(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        export.save_pretrained(packed, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []  # no final dir, no temporary dir
    monkeypatch.undo()
    export.save_pretrained(packed, tmp_path / "old")
    before = (tmp_path / "old" / "model.safetensors").read_bytes()
    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        export.save_pretrained(packed, tmp_path / "old", overwrite=True)
    assert (tmp_path / "old" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


# -- load-side errors (both loaders: torch and the NumPy runtime) ----------------------------------

LOADERS = {"torch": export.from_pretrained, "numpy": LlamaRuntime.load}


@pytest.fixture
def broken(exported, tmp_path):
    d = tmp_path / "broken"
    shutil.copytree(exported, d)
    return d


def _edit_config(d, fn):
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(d, fn):
    t = load_file(str(d / "model.safetensors"))
    fn(t)
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})


Q = "model.layers.2.self_attn.k_proj"
CASES = {
    "missing dir": (lambda d: shutil.rmtree(d), FileNotFoundError, "does not exist"),
    "missing config": (lambda d: (d / "config.json").unlink(), FileNotFoundError, "config.json"),
    "missing weights": (lambda d: (d / "model.safetensors").unlink(), FileNotFoundError, "model.safetensors"),
    "bad json": (lambda d: (d / "config.json").write_text("{not json"), ExportFormatError, "not valid JSON"),
    "truncated": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-100]),
                  ExportFormatError, "truncated"),
    "garbage header": (lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:8] + b"\xff" * 64 + (d / "model.safetensors").read_bytes()[72:]),
        ExportFormatError, "corrupted"),
    "trailing bytes": (lambda d: open(d / "model.safetensors", "ab").write(b"xx"), ExportFormatError, "trailing"),
    "no format_version": (lambda d: _edit_config(d, lambda c: c["quantization_config"].pop("format_version")),
                          ExportFormatError, "no format_version"),
    "wrong format_version": (lambda d: _edit_config(d, lambda c: c["quantization_config"].update(format_version=2)),
                             ExportFormatError, "format_version 2 is not supported"),
    "not rabit": (lambda d: _edit_config(d, lambda c: c["quantization_config"].update(quant_method="gptq")),
                  ExportFormatError, "'gptq'"),
    "no quantization_config": (lambda d: _edit_config(d, lambda c: c.pop("quantization_config")),
                               ExportFormatError, "no quantization_config"),
    "unknown module": (lambda d: _edit_config(d, lambda c: c["quantization_config"]["quantized_modules"].append(
        "model.layers.9.mlp.up_proj")), ExportFormatError, "model.layers.9.mlp.up_proj"),
    "missing tensor": (lambda d: _edit_tensors(d, lambda t: t.pop(f"{Q}.h")), ExportFormatError, f"{Q}.h"),
    "wrong shape": (lambda d: _edit_tensors(
        d, lambda t: t.update({f"{Q}.packed": t[f"{Q}.packed"][:, :-1].contiguous()})),
                    ExportFormatError, rf"{Q}\.packed.*shape"),
    "wrong dtype": (lambda d: _edit_tensors(d, lambda t: t.update({f"{Q}.g": t[f"{Q}.g"].float()})),
                    ExportFormatError, rf"{Q}\.g.*float32"),
    "nan scale": (lambda d: _edit_tensors(d, lambda t: t[f"{Q}.g"].__setitem__((1, 0), float("nan"))),
                  ExportFormatError, rf"scale '{Q}\.g'.*NaN"),
    "inf scale": (lambda d: _edit_tensors(d, lambda t: t[f"{Q}.h"].__setitem__((0, 5), float("inf"))),
                  ExportFormatError, rf"scale '{Q}\.h'"),
    "extra tensor": (lambda d: _edit_tensors(d, lambda t: t.update(stray=torch.zeros(3))), ExportFormatError,
                     "unexpected tensors"),
    "bool k": (lambda d: _edit_config(d, lambda c: c["quantization_config"].update(k=True)), ExportFormatError,
               "k=True; expected an integer"),
    # the tokenizer is read from the model directory only, never from a path a config names
    "tokenizer path": (lambda d: _edit_config(d, lambda c: c["quantization_config"].update(
        tokenizer={"format": "llama2c", "file": "../config.json"})), ExportFormatError,
                       r"tokenizer file '\.\./config\.json'; expected the name of a file in the model directory"),
    "tokenizer file not a name": (lambda d: _edit_config(d, lambda c: c["quantization_config"].update(
        tokenizer={"format": "llama2c", "file": 5})), ExportFormatError, "tokenizer file 5"),
    "tokenizer file missing": (lambda d: _edit_config(d, lambda c: c["quantization_config"].update(
        tokenizer={"format": "llama2c"})), ExportFormatError, "tokenizer file None"),
}


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("case", CASES)
def test_load_errors_name_the_problem(broken, case, loader):
    breakit, exc, pattern = CASES[case]
    breakit(broken)
    with pytest.raises(exc, match=pattern):
        LOADERS[loader](broken)


def test_load_refuses_float64(broken):
    # float64 activations would reach the packed layers, which take float32, float16 and bfloat16
    with pytest.raises(TypeError, match="load as float32, float16 or bfloat16, not torch.float64"):
        export.from_pretrained(broken, dtype=torch.float64)
    _edit_config(broken, lambda c: c.update(dtype="float64"))
    with pytest.raises(TypeError, match="not torch.float64; pass dtype=torch.float32"):
        export.from_pretrained(broken)
    assert export.from_pretrained(broken, dtype=torch.float32) is not None


def test_transformers_loader_rejects_wrong_version(broken):
    from transformers import AutoModelForCausalLM

    _edit_config(broken, lambda c: c["quantization_config"].update(format_version=2))
    with pytest.raises(ValueError, match="format_version 2"):
        AutoModelForCausalLM.from_pretrained(str(broken))


# -- CLI ----------------------------------------------------------------------------------------


def test_cli_help_lists_options(capsys):
    for cmd, flags in {"export": ["--checkpoint", "--out", "--k", "--fp16", "--overwrite", "--json"],
                       "generate": ["--prompt", "--max-new-tokens", "--runtime", "--device", "--compile", "--json"],
                       "eval": ["--ppl", "--tasks", "--limit", "--json"]}.items():
        assert cli_main([cmd, "--help"]) == 0
        out = capsys.readouterr().out
        for f in flags:
            assert f in out, (cmd, f)


@pytest.mark.parametrize("argv, code, needle", [
    (["export"], 2, "--out"),
    (["export", "--out", "x", "--k", "7"], 2, "--k"),
    (["generate", "d"], 2, "--prompt"),
    (["generate", "d", "--prompt", "a", "--max-new-tokens", "0"], 2, "--max-new-tokens"),
    (["generate", "d", "--prompt", "a", "--runtime", "jax"], 2, "--runtime"),
    (["eval", "d", "--tasks", "mmlu"], 2, "unknown task"),
    (["eval", "stories260k"], 1, "nothing to evaluate"),
    (["generate", "/nonexistent/dir", "--prompt", "a", "--runtime", "numpy"], 1, "exported rabit directory"),
    (["export", "--out", "OUT", "--checkpoint", "/nonexistent/ckpt"], 1, "checkpoint"),
])
def test_cli_bad_arguments(argv, code, needle, capsys, tmp_path):
    argv = [str(tmp_path / "o") if a == "OUT" else a for a in argv]
    assert cli_main(argv) == code
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("runtime", ["torch", "numpy"])
def test_cli_generate_refuses_to_run_past_the_trained_positions(exported, capsys, runtime):
    """stories260K has 512 positions: both runtimes refuse to go past them (HF would extrapolate RoPE silently)."""
    argv = ["generate", str(exported), "--prompt", PROMPT, "--runtime", runtime, "--max-new-tokens"]
    assert cli_main(argv + ["600"]) == 1
    err = capsys.readouterr().err
    assert "exceed the model's max_position_embeddings 512" in err and "max_new_tokens" in err.replace("-", "_")
    n_prompt = int(re.search(r"(\d+) prompt \+ 600 new tokens", err).group(1))
    assert cli_main(argv + [str(512 - n_prompt), "--json"]) == 0  # exactly the positions there are
    assert json.loads(capsys.readouterr().out)["prompt_tokens"] == n_prompt


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cli_generate_cuda_without_gpu(capsys):
    assert cli_main(["generate", "stories260k", "--prompt", "a", "--device", "cuda"]) == 1
    assert "sees no CUDA GPU" in capsys.readouterr().err


def test_cli_generate_sampling(capsys):
    """--temperature samples (reproducibly from --seed, with top-k's support); greedy without it."""
    def run(*extra):
        assert cli_main(["generate", "stories260k", "--prompt", PROMPT, "--max-new-tokens", "24", "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)

    greedy = run()
    assert greedy["sampling"] is None
    a, b, c = run("--temperature", "1.5", "--seed", "3"), run("--temperature", "1.5", "--seed", "3"), \
        run("--temperature", "1.5", "--seed", "4")
    assert a["text"] == b["text"] and a["text"] != c["text"] and a["text"] != greedy["text"]
    assert a["sampling"] == {"temperature": 1.5, "top_k": None, "seed": 3}
    # top-k 1 is greedy whatever the temperature and seed
    assert run("--temperature", "2", "--top-k", "1", "--seed", "9")["text"] == greedy["text"]


@pytest.mark.parametrize("argv, needle", [
    (["--top-k", "5"], "--top-k needs --temperature"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--temperature", "1", "--runtime", "numpy"], "decodes greedily"),
    (["--compile", "--runtime", "numpy"], "--runtime numpy has no --compile"),
    (["--head-dtype", "float16", "--runtime", "numpy"], "--runtime numpy takes --head-dtype int8 only"),
    (["--head-dtype", "bfloat16", "--runtime", "numpy"], "NumPy has no fast bfloat16 matmul"),
    # the int8 classes run on the NumPy runtime too (tests/test_runtime.py), from an exported directory
    (["--int8-activations", "--runtime", "numpy"], "--runtime numpy needs an exported rabit directory"),
    (["--int8-activations"], "int8_activations=True needs the fused glue, which cannot run here: not every decoder "
                             "linear is a PackedRaBiTLinear"),
])
def test_cli_generate_sampling_errors(argv, needle, capsys):
    assert cli_main(["generate", "stories260k", "--prompt", "a", *argv]) == 1
    assert needle in capsys.readouterr().err


def test_cli_generate_head_dtype(capsys):
    """--head-dtype float16 runs the static decoder with a float16 copy of lm_head: the same number of tokens, the
    logits rounded as an fp16 head's (the text may differ from float32's only at near-ties)."""
    def run(*extra):
        assert cli_main(["generate", "stories260k", "--prompt", PROMPT, "--max-new-tokens", "16", "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)

    f32, f16 = run(), run("--head-dtype", "float16")
    assert f16["new_tokens"] == f32["new_tokens"] == 16 and f16["text"].startswith(PROMPT[:10])
    assert (f32["head_dtype"], f16["head_dtype"]) == (None, "float16")


def test_cli_generate_int8_activations(exported, capsys):
    """--int8-activations decodes an exported (packed) model with int8 activation tables: as many tokens, and the
    result says so."""
    def run(*extra):
        assert cli_main(["generate", str(exported), "--prompt", PROMPT, "--max-new-tokens", "12", "--json",
                         *extra]) == 0
        return json.loads(capsys.readouterr().out)

    f32, i8 = run(), run("--int8-activations")
    assert i8["new_tokens"] == f32["new_tokens"] == 12 and i8["text"].startswith(PROMPT[:10])
    assert (f32["int8_activations"], i8["int8_activations"]) == (False, True)
    fast = run("--int8-activations", "--head-dtype", "int8")  # the fastest CPU setting: int8 layers and head
    assert fast["new_tokens"] == 12 and (fast["int8_activations"], fast["head_dtype"]) == (True, "int8")


@pytest.mark.cuda
def test_cli_generate_int8_activations_on_cuda(exported, capsys):
    """--int8-activations --device cuda decodes with the CUDA int8 class (batch 1, the model in fp16)."""
    if not torch.ops.rabit.packed_linear_i8.default.has_kernel_for_dispatch_key("CUDA"):
        pytest.skip("rabit was built without CUDA kernels")
    assert cli_main(["generate", str(exported), "--prompt", PROMPT, "--max-new-tokens", "12", "--json",
                     "--device", "cuda", "--int8-activations"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 0 < out["new_tokens"] <= 12 and out["int8_activations"] and out["text"].startswith(PROMPT[:10])


def test_cli_generate_compile_needs_the_static_decoder(tmp_path, capsys):
    """--compile fuses the static decoder's glue; a model that runs HF generate instead is refused, not silently
    run without it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32)).save_pretrained(tmp_path)
    save_word_tokenizer(tmp_path, 64)
    assert cli_main(["generate", str(tmp_path), "--prompt", "w1 w2", "--compile"]) == 1
    assert "--compile applies to the static decoder" in capsys.readouterr().err


def test_cli_export_from_qat_checkpoint_and_generate(qat, tmp_path, capsys):
    """QAT a couple of steps with rabit's trainer, export its checkpoint through the CLI, and check the
    export reproduces convert_(student) exactly and generates with both runtimes."""
    from rabit.train import TrainConfig, train

    teacher, tok = load_stories260k()
    student = copy.deepcopy(qat[0])
    data = torch.randint(3, 512, (4, 32))
    train(student, teacher, data, TrainConfig(steps=2, batch_size=2, checkpoint_every=0, log_every=1),
          out_dir=tmp_path / "run", progress=False)
    out = tmp_path / "packed"
    assert cli_main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(out), "--quiet", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    # `rabit train --out DIR` keeps the trainer's output in DIR/train: DIR itself is taken too
    (tmp_path / "experiment").mkdir()
    (tmp_path / "run").rename(tmp_path / "experiment" / "train")
    assert cli_main(["export", "--checkpoint", str(tmp_path / "experiment"), "--out", str(tmp_path / "packed2"),
                     "--quiet", "--json"]) == 0
    capsys.readouterr()
    assert torch.equal(load_file(out / "model.safetensors")["model.layers.0.mlp.up_proj.packed"],
                       load_file(tmp_path / "packed2" / "model.safetensors")["model.layers.0.mlp.up_proj.packed"])
    (tmp_path / "experiment" / "train").rename(tmp_path / "run")
    assert cli_main(["export", "--checkpoint", str(tmp_path / "experiment"), "--out", str(tmp_path / "p3")]) == 1
    err = capsys.readouterr().err
    assert "no QAT checkpoint in" in err and "train" in err and "rabit train --out DIR" in err
    assert info["trained"] and info["quantized_modules"] == 35 and info["k"] == 2
    x = torch.tensor([tok.encode(PROMPT)])
    want = logits(rabit.convert_(copy.deepcopy(student)), x)
    assert torch.equal(logits(export.from_pretrained(out), x), want)
    assert not torch.equal(want, logits(rabit.convert_(copy.deepcopy(qat[0])), x))  # training changed it
    texts = {}
    for rt in ("torch", "numpy"):
        assert cli_main(["generate", str(out), "--prompt", PROMPT, "--max-new-tokens", "8", "--runtime", rt,
                         "--json"]) == 0
        r = json.loads(capsys.readouterr().out)
        assert r["new_tokens"] == 8 and r["text"].startswith(PROMPT)
        texts[rt] = r["text"]
    assert texts["torch"] == texts["numpy"]
    # --compile (torch.compile of the decoder's elementwise glue) gives the same greedy text
    assert cli_main(["generate", str(out), "--prompt", PROMPT, "--max-new-tokens", "8", "--compile", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == texts["torch"]
    # a checkpoint from another configuration is refused with the reason and the fix
    assert cli_main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "k3"), "--k", "3"]) == 1
    assert "has k=2 binary paths per layer, not --k 3; pass --k 2" in capsys.readouterr().err
    assert cli_main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "ex"),
                     "--exclude", "mlp"]) == 1  # replaces the default exclusion of lm_head
    err = capsys.readouterr().err
    assert "does not fit" in err and "missing ['lm_head.g', 'lm_head.h']" in err and "rabit: rabit" not in err
    assert cli_main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "k1"), "--model",
                     str(out)]) == 1  # an exported model is not a base model
    assert "already an exported" in capsys.readouterr().err
    other = tiny_hf_dir(tmp_path / "other")  # 32 wide, stories260K 64
    assert cli_main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "o"), "--model",
                     str(other), "--quiet"]) == 1
    err = capsys.readouterr().err  # load_state_dict's report, whose first line names no tensor
    assert "does not fit" in err and "size mismatch for model.embed_tokens.weight" in err
    # existing output
    assert cli_main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err


def test_export_commands_share_rabit_cli_conventions(exported, capsys):
    """export, eval, generate and quantize run through rabit.cli.main, the one entry point: its errors, its exit
    codes, its --device check."""
    argv = ["generate", str(exported), "--prompt", PROMPT, "--max-new-tokens", "3", "--runtime", "numpy", "--json"]
    assert cli_main(argv) == 0
    assert json.loads(capsys.readouterr().out)["new_tokens"] == 3
    assert cli_main(["eval", str(exported)]) == 1
    assert "nothing to evaluate" in capsys.readouterr().err
    assert cli_main(["quantize", "--out", str(exported)]) == 1  # exists and is not empty
    assert "--overwrite" in capsys.readouterr().err
    r = subprocess.run([sys.executable, "-m", "rabit", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and all(c in r.stdout for c in ("export", "eval", "generate", "quantize"))


def test_cli_quantize_writes_a_loadable_packed_model(tmp_path):
    out = tmp_path / "ptq"
    assert cli_main(["quantize", "--out", str(out), "--calib-seqs", "4", "--seq-len", "32", "--quiet", "--json"]) == 0
    model = export.from_pretrained(out)
    assert sum(isinstance(m, rabit.PackedRaBiTLinear) for m in model.modules()) == 35
    assert cli_main(["quantize", "--out", str(out), "--quiet"]) == 1  # exists and is not empty
