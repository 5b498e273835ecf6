"""Tests of rabit.data: teacher sampling, token storage, the cache, and the text-file loader."""

import logging
import os

import numpy as np
import pytest
import torch

from rabit import data as D

from helpers import TINY_VOCAB as VOCAB  # noqa: E402
from helpers import tiny_llama  # noqa: E402


class CharTokenizer:
    """llama2.c-style interface: encode(text, bos=True) -> ids; one id per character."""

    def encode(self, text, bos=True):
        return ([1] if bos else []) + [3 + ord(c) % (VOCAB - 3) for c in text]


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------


def test_generate_shape_bos_range_and_determinism():
    m = tiny_llama()
    a = D.generate_teacher_data(m, n_seqs=5, seq_len=12, batch_size=2, bos_id=1, seed=3, progress=False)
    b = D.generate_teacher_data(m, n_seqs=5, seq_len=12, batch_size=2, bos_id=1, seed=3, progress=False)
    c = D.generate_teacher_data(m, n_seqs=5, seq_len=12, batch_size=2, bos_id=1, seed=4, progress=False)
    assert a.shape == (5, 12) and a.dtype == torch.long
    assert (a[:, 0] == 1).all()
    assert int(a.min()) >= 0 and int(a.max()) < VOCAB
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # a random init has a near-uniform next-token distribution: samples must not collapse
    assert len(torch.unique(a[:, 1:])) > 10


def test_greedy_sampling_matches_full_forward():
    """top_k=1 sampling through the KV cache must equal argmax of an uncached full forward."""
    m = tiny_llama(1)
    ids = D.generate_teacher_data(m, n_seqs=3, seq_len=16, batch_size=3, bos_id=1, top_k=1, progress=False)
    with torch.no_grad():
        logits = m(input_ids=ids[:, :-1], use_cache=False).logits
    assert torch.equal(logits.argmax(-1), ids[:, 1:])


def test_sampling_follows_teacher_distribution():
    """Token 1 after BOS is drawn from softmax(teacher logits | BOS): compare frequencies."""
    m = tiny_llama(2)
    n = 4000
    ids = D.generate_teacher_data(m, n_seqs=n, seq_len=2, batch_size=n, bos_id=1, temperature=0.5, progress=False)
    with torch.no_grad():
        p = torch.softmax(m(input_ids=torch.tensor([[1]])).logits[0, -1] / 0.5, -1)
    freq = torch.bincount(ids[:, 1], minlength=VOCAB).double() / n
    tv = 0.5 * (freq - p.double()).abs().sum().item()
    assert tv < 0.08, f"total variation {tv:.3f} between sampled and teacher distribution"


def test_top_k_restricts_support():
    m = tiny_llama(3)
    ids = D.generate_teacher_data(m, n_seqs=200, seq_len=2, batch_size=200, bos_id=1, top_k=3, progress=False)
    with torch.no_grad():
        top3 = set(m(input_ids=torch.tensor([[1]])).logits[0, -1].topk(3).indices.tolist())
    assert set(ids[:, 1].tolist()) <= top3


@pytest.mark.parametrize("kw, match", [
    ({"n_seqs": 0}, "n_seqs"),
    ({"seq_len": 1}, "seq_len"),
    ({"temperature": 0.0}, "temperature"),
    ({"top_k": 0}, "top_k"),
    ({"seq_len": 100}, "max_position_embeddings"),
    ({"bos_id": VOCAB}, "bos_id"),
])
def test_generate_rejects_bad_arguments(kw, match):
    args = {"n_seqs": 2, "seq_len": 8, "batch_size": 2, "bos_id": 1, "progress": False}
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        D.generate_teacher_data(tiny_llama(), **args)


@pytest.mark.parametrize("dtype", ["bfloat16", torch.float16])
def test_half_precision_sampling_uses_a_copy(dtype):
    """dtype= samples with a converted copy: the teacher keeps its float32 weights, the sample is a valid one, and
    with top_k=1 it is the half-precision model's own greedy continuation."""
    m = tiny_llama(5)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ids = D.generate_teacher_data(m, n_seqs=3, seq_len=10, batch_size=2, bos_id=1, top_k=1, dtype=dtype,
                                  progress=False)
    assert all(v.dtype == torch.float32 and torch.equal(v, before[k]) for k, v in m.state_dict().items())
    half = tiny_llama(5).to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    with torch.no_grad():
        logits = half(input_ids=ids[:, :-1], use_cache=False).logits
    assert torch.equal(logits.argmax(-1), ids[:, 1:])
    same = D.generate_teacher_data(m, n_seqs=3, seq_len=10, batch_size=3, bos_id=1, seed=2, progress=False)
    assert torch.equal(same, D.generate_teacher_data(m, n_seqs=3, seq_len=10, batch_size=3, bos_id=1, seed=2,
                                                     dtype="float32", progress=False))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_sampling_on_cuda(monkeypatch, dtype):
    """On CUDA the half-precision copy samples through StaticDecoder (SDPA, CUDA graph): the teacher stays float32,
    and greedy tokens are the half model's argmax of a full forward up to its rounding (near-ties may go either way
    between the cached and the full forward, so the chosen token's logit is within a rounding step of the max)."""
    m = tiny_llama(7).to("cuda")
    monkeypatch.setattr(D, "decode_loop", None)  # the static path must not fall back to the HF loop
    ids = D.generate_teacher_data(m, n_seqs=6, seq_len=24, batch_size=4, bos_id=1, top_k=1, dtype=dtype,
                                  progress=False)
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert ids.shape == (6, 24) and (ids[:, 0] == 1).all()
    half = tiny_llama(7).to("cuda", dtype)
    with torch.no_grad():
        logits = half(input_ids=ids[:, :-1].cuda()).logits.float()
    chosen = logits.gather(-1, ids[:, 1:, None].cuda())[..., 0]
    step = logits.abs().amax(-1) * (2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10)
    assert (chosen >= logits.amax(-1) - 4 * step).all()
    sampled = D.generate_teacher_data(m, n_seqs=6, seq_len=24, batch_size=4, bos_id=1, seed=3, dtype=dtype,
                                      progress=False)
    assert int(sampled.min()) >= 0 and int(sampled.max()) < VOCAB and len(torch.unique(sampled[:, 1:])) > 10


@pytest.mark.parametrize("dtype", ["float64", "int8", torch.int32, torch.float64])
def test_sampling_dtype_rejects_others(dtype):
    with pytest.raises(ValueError, match="sampling dtype must be"):
        D.generate_teacher_data(tiny_llama(), n_seqs=1, seq_len=4, batch_size=1, bos_id=1, dtype=dtype,
                                progress=False)


def test_generate_leaves_training_mode_alone():
    m = tiny_llama()
    m.train()
    D.generate_teacher_data(m, n_seqs=1, seq_len=4, batch_size=1, bos_id=1, progress=False)
    assert m.training


# ---------------------------------------------------------------------------------------------
# storage
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".npy"])
def test_save_load_roundtrip(tmp_path, suffix):
    ids = torch.randint(0, 50000, (7, 13))
    path = tmp_path / f"ids{suffix}"
    D.save_tokens(path, ids)
    back = D.load_tokens(path)
    assert back.dtype == torch.long and torch.equal(back, ids)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask, "atomic write must not leave mkstemp's 0600"


def test_metadata_roundtrip_and_npy_refuses_metadata(tmp_path):
    ids = torch.arange(12).reshape(3, 4)
    D.save_tokens(tmp_path / "a.safetensors", ids, metadata={"seed": 5})
    assert D.read_token_metadata(tmp_path / "a.safetensors")["seed"] == "5"
    with pytest.raises(ValueError, match="metadata"):
        D.save_tokens(tmp_path / "a.npy", ids, metadata={"seed": 5})
    with pytest.raises(ValueError, match="suffix"):
        D.save_tokens(tmp_path / "a.pt", ids)
    with pytest.raises(TypeError, match="integer"):
        D.save_tokens(tmp_path / "b.safetensors", ids.float())


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "ids.safetensors"
    old = torch.arange(6).reshape(2, 3)
    D.save_tokens(path, old)

    def failing_write(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        D.atomic_write(path, failing_write)
    assert torch.equal(D.load_tokens(path), old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.safetensors"], "temporary file left behind"


def test_load_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        D.load_tokens(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, b"\xff" * 40])
def test_a_truncated_or_corrupt_token_file_is_named(tmp_path, content):
    path = tmp_path / "teacher_data.safetensors"
    path.write_bytes(content)
    for read in (D.load_tokens, D.read_token_metadata):
        with pytest.raises(ValueError, match="teacher_data.safetensors' is not a readable safetensors file.*delete it"):
            read(path)


@pytest.mark.parametrize("content", [b"garbage", b"\x93NUMPY\x01\x00", b""])
def test_a_corrupt_npy_token_file_is_named_without_pickle_advice(tmp_path, content):
    path = tmp_path / "ids.npy"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"ids.npy' is not a readable .npy array.*delete it") as e:
        D.load_tokens(path)
    assert "pickle" not in str(e.value)


def test_an_npy_token_file_of_floats_is_refused(tmp_path):
    path = tmp_path / "ids.npy"
    np.save(path, np.array([[1.7, 2.2]]))
    with pytest.raises(ValueError, match="holds float64 values, not integer token ids"):
        D.load_tokens(path)


def test_a_truncated_checkpoint_is_named(tmp_path):
    from rabit.train import read_checkpoint

    path = tmp_path / "checkpoint.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # a header cut short
    with pytest.raises(ValueError, match="checkpoint .*checkpoint.safetensors' is not a readable.*train from the start"):
        read_checkpoint(path)


def test_generate_with_a_prefix_starts_every_row_with_it():
    m = tiny_llama()
    prefix = [7, 9, 11]
    a = D.generate_teacher_data(m, n_seqs=4, seq_len=12, batch_size=3, bos_id=1, seed=3, progress=False, prefix=prefix)
    plain = D.generate_teacher_data(m, n_seqs=4, seq_len=12, batch_size=3, bos_id=1, seed=3, progress=False)
    assert a.shape == (4, 12)
    assert (a[:, :4] == torch.tensor([1, *prefix])).all()
    assert not torch.equal(a[:, 4:], plain[:, 4:])  # the teacher samples given the prefix
    assert len(torch.unique(a[:, 4:])) > 5
    with pytest.raises(ValueError, match="does not combine with start='random-token'"):
        D.generate_teacher_data(m, 2, 12, 2, 1, start="random-token", prefix=prefix, progress=False)
    with pytest.raises(ValueError, match="vocabulary"):
        D.generate_teacher_data(m, 2, 12, 2, 1, prefix=[VOCAB], progress=False)
    with pytest.raises(ValueError, match="leaves no sampled token"):
        D.generate_teacher_data(m, 2, 4, 2, 1, prefix=prefix, progress=False)


# ---------------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------------


def test_cache_generates_once_then_reuses(tmp_path, monkeypatch, caplog):
    m = tiny_llama()
    calls = []
    real = D.generate_teacher_data

    def counting(*a, **k):
        calls.append(k.get("seed"))
        return real(*a, **k)

    monkeypatch.setattr(D, "generate_teacher_data", counting)
    path = tmp_path / "cache.safetensors"
    kw = {"n_seqs": 4, "seq_len": 8, "batch_size": 2, "bos_id": 1, "model_name": "tiny", "progress": False}
    first = D.cached_teacher_data(path, m, seed=0, **kw)
    second = D.cached_teacher_data(path, m, seed=0, **kw)
    assert calls == [0] and torch.equal(first, second)

    with caplog.at_level(logging.WARNING, logger="rabit.data"):
        third = D.cached_teacher_data(path, m, seed=1, **kw)
    assert calls == [0, 1]
    assert "seed" in caplog.text and "regenerating" in caplog.text
    assert not torch.equal(third, first)
    assert D.read_token_metadata(path)["seed"] == "1"

    kw2 = dict(kw, model_name="other")
    D.cached_teacher_data(path, m, seed=1, **kw2)
    assert calls == [0, 1, 1], "a different model name must invalidate the cache"

    D.cached_teacher_data(path, m, seed=1, start="random-token", greedy_tokens=2, **kw2)
    assert calls == [0, 1, 1, 1], "another start must invalidate the cache"
    meta = D.read_token_metadata(path)
    assert (meta["start"], meta["greedy_tokens"]) == ("random-token", "2")
    D.cached_teacher_data(path, m, seed=1, start="random-token", greedy_tokens=2, **kw2)
    assert len(calls) == 4
    assert meta["dtype"] == "float32"  # None: the model's own
    D.cached_teacher_data(path, m, seed=1, start="random-token", greedy_tokens=2, dtype="float32", **kw2)
    assert len(calls) == 4, "the model's own dtype named explicitly is the same cache"
    D.cached_teacher_data(path, m, seed=1, start="random-token", greedy_tokens=2, dtype="bfloat16", **kw2)
    assert len(calls) == 5 and D.read_token_metadata(path)["dtype"] == "bfloat16"
    D.cached_teacher_data(path, m, seed=1, dtype="bfloat16", prefix=[5, 6], **kw2)
    assert len(calls) == 6, "a prefix must invalidate the cache"
    assert D.read_token_metadata(path)["prefix"] == "5 6"
    D.cached_teacher_data(path, m, seed=1, dtype="bfloat16", prefix=(5, 6), **kw2)
    assert len(calls) == 6


def test_cache_of_more_sequences_serves_a_smaller_request(tmp_path, monkeypatch):
    """Row r's draws depend on (seed, r) alone: the first n rows of a larger cached sample are the n-row sample."""
    m = tiny_llama(4)
    path = tmp_path / "big.safetensors"
    kw = {"seq_len": 8, "batch_size": 2, "bos_id": 1, "model_name": "tiny", "progress": False, "seed": 5}
    big = D.cached_teacher_data(path, m, n_seqs=6, **kw)
    fresh = D.generate_teacher_data(m, 4, 8, 2, 1, seed=5, progress=False)
    assert torch.equal(big[:4], fresh)

    def sampled(*a, **k):
        raise AssertionError("a prefix of the cache must not be sampled again")

    monkeypatch.setattr(D, "generate_teacher_data", sampled)
    assert torch.equal(D.cached_teacher_data(path, m, n_seqs=4, **kw), fresh)
    assert D.read_token_metadata(path)["n_seqs"] == "6"  # the larger cache stays
    with pytest.raises(AssertionError, match="must not be sampled"):  # more rows, or another seed: a new sample
        D.cached_teacher_data(path, m, n_seqs=7, **kw)
    with pytest.raises(AssertionError, match="must not be sampled"):
        D.cached_teacher_data(path, m, n_seqs=4, **dict(kw, seed=6))


def test_cache_written_before_the_start_option_is_a_bos_cache(tmp_path, monkeypatch):
    """Caches from before `start` / `greedy_tokens` hold BOS-started samples: reused for start='bos', regenerated
    for a random start."""
    m = tiny_llama()
    path = tmp_path / "old.safetensors"
    kw = {"n_seqs": 3, "seq_len": 8, "batch_size": 3, "bos_id": 1, "model_name": "tiny", "progress": False, "seed": 0}
    ids = D.cached_teacher_data(path, m, **kw)
    meta = {k: v for k, v in D.read_token_metadata(path).items()
            if k not in ("start", "greedy_tokens", "dtype", "prefix")}
    D.save_tokens(path, ids, metadata=meta)
    class Sampled(Exception):
        pass

    def sampled(*a, **k):
        raise Sampled

    monkeypatch.setattr(D, "generate_teacher_data", sampled)  # reuse must not sample
    assert torch.equal(D.cached_teacher_data(path, m, **kw), ids)
    with pytest.raises(Sampled):  # a random start is not in the old cache: it samples
        D.cached_teacher_data(path, m, start="random-token", **kw)
    with pytest.raises(Sampled):  # old caches were sampled in float32
        D.cached_teacher_data(path, m, dtype="bfloat16", **kw)


# ---------------------------------------------------------------------------------------------
# text files
# ---------------------------------------------------------------------------------------------


def test_tokens_from_text_file(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("abcdefghij" * 3, encoding="utf-8")  # 30 chars + BOS = 31 ids
    ids = D.tokens_from_text_file(p, CharTokenizer(), seq_len=10)
    assert ids.shape == (3, 10)
    expected = torch.tensor(CharTokenizer().encode("abcdefghij" * 3)[:30])
    assert torch.equal(ids.reshape(-1), expected)


def test_tokens_from_text_file_errors(tmp_path):
    tok = CharTokenizer()
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"ok\xb1\xff" * 10)
    with pytest.raises(ValueError, match="model.bin' is not UTF-8 text .*byte 2"):
        D.tokens_from_text_file(binary, tok, 8)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        D.tokens_from_text_file(tmp_path / "missing.txt", tok, 8)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        D.tokens_from_text_file(empty, tok, 8)
    short = tmp_path / "short.txt"
    short.write_text("abc", encoding="utf-8")
    with pytest.raises(ValueError, match="fewer than one row"):
        D.tokens_from_text_file(short, tok, 8)
    with pytest.raises(ValueError, match="seq_len"):
        D.tokens_from_text_file(short, tok, 1)


def test_storage_is_not_pickle(tmp_path):
    """.npy files are loaded with allow_pickle=False: an object array must be refused."""
    p = tmp_path / "evil.npy"
    np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        D.load_tokens(p)
