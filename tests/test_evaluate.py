"""Tests of rabit.evaluate: perplexity protocol, teacher agreement, speed and size accounting."""

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from rabit import evaluate as E

from helpers import TINY_VOCAB as VOCAB  # noqa: E402
from helpers import tiny_llama  # noqa: E402


class BigramLM(nn.Module):
    """logits[b, t] = table[ids[b, t]]: a model whose every probability is known by hand."""

    def __init__(self, vocab: int, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=gen, dtype=torch.float64) * 2)

    def forward(self, input_ids, use_cache=False, **_):
        class Out:
            pass

        o = Out()
        o.logits = self.table[input_ids]
        return o


def hand_nll(table: torch.Tensor, windows: list[list[int]]) -> tuple[float, int]:
    total, count = 0.0, 0
    for w in windows:
        for a, b in itertools.pairwise(w):
            row = table[a].tolist()
            m = max(row)
            logz = m + math.log(sum(math.exp(v - m) for v in row))
            total += logz - row[b]
            count += 1
    return total, count


class CharTokenizer:
    def encode(self, text, bos=True):
        return ([1] if bos else []) + [3 + ord(c) % (VOCAB - 3) for c in text]


# ---------------------------------------------------------------------------------------------
# perplexity
# ---------------------------------------------------------------------------------------------


def test_perplexity_of_a_stream_matches_hand_computation():
    model = BigramLM(VOCAB)
    stream = torch.randint(0, VOCAB, (23,), generator=torch.Generator().manual_seed(1))
    r = E.perplexity(model, stream, ctx=5, batch_size=3, progress=False)
    windows = [stream[i * 5 : (i + 1) * 5].tolist() for i in range(4)]  # 23 // 5 = 4, tail of 3 dropped
    nll, count = hand_nll(model.table.detach(), windows)
    assert (r.windows, r.tokens, r.ctx) == (4, 16, 5)
    assert r.nll == pytest.approx(nll / count, rel=1e-9)
    assert float(r) == pytest.approx(math.exp(nll / count), rel=1e-9)


def test_perplexity_of_rows_never_crosses_rows():
    model = BigramLM(VOCAB, seed=2)
    rows = torch.randint(0, VOCAB, (3, 8), generator=torch.Generator().manual_seed(3))
    r = E.perplexity(model, rows, progress=False)  # ctx defaults to the row length
    nll, count = hand_nll(model.table.detach(), rows.tolist())
    assert (r.windows, r.tokens) == (3, 21)
    assert r.ppl == pytest.approx(math.exp(nll / count), rel=1e-9)
    r4 = E.perplexity(model, rows, ctx=4, batch_size=2, progress=False)
    nll4, count4 = hand_nll(model.table.detach(), [row[i : i + 4] for row in rows.tolist() for i in (0, 4)])
    assert (r4.windows, r4.tokens) == (6, 18)
    assert r4.ppl == pytest.approx(math.exp(nll4 / count4), rel=1e-9)


def test_perplexity_splits_the_nll_by_window_position(monkeypatch):
    """nll_by_position[lo-hi] is the hand-computed mean NLL of the tokens at positions lo..hi-1 of the windows."""
    monkeypatch.setattr(E, "POSITION_EDGES", (1, 3, 4, 64))
    model = BigramLM(VOCAB, seed=5)
    stream = torch.randint(0, VOCAB, (41,), generator=torch.Generator().manual_seed(6))
    r = E.perplexity(model, stream, ctx=7, batch_size=4, progress=False)
    windows = [stream[i * 7 : (i + 1) * 7].tolist() for i in range(5)]
    table = model.table.detach()
    want = {}
    for lo, hi in ((1, 3), (3, 4), (4, 7)):  # 64 lies beyond the window: its last bucket ends at ctx
        nll, count = hand_nll(table, [[w[j - 1], w[j]] for w in windows for j in range(lo, hi)])
        want[f"{lo}-{hi}"] = nll / count
    assert r.nll_by_position.keys() == want.keys()
    for k, v in want.items():
        assert r.nll_by_position[k] == pytest.approx(v, rel=1e-9), k
    # the buckets weighted by their sizes give the overall mean
    sizes = {"1-3": 2, "3-4": 1, "4-7": 3}
    assert sum(sizes[k] * v for k, v in r.nll_by_position.items()) / 6 == pytest.approx(r.nll, rel=1e-9)


def test_perplexity_of_a_llama_equals_its_own_loss():
    """Cross-check against transformers' own next-token loss on one window."""
    m = tiny_llama()
    x = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hf_loss = m(input_ids=x, labels=x).loss.item()
    assert E.perplexity(m, x, progress=False).ppl == pytest.approx(math.exp(hf_loss), rel=1e-5)


@pytest.mark.parametrize("ids, ctx, err", [
    (torch.zeros(3, dtype=torch.long), 5, ValueError),  # shorter than one window
    (torch.zeros(10, dtype=torch.long), 1, ValueError),  # ctx < 2
    (torch.zeros(2, 2, 2, dtype=torch.long), 2, ValueError),
    (torch.zeros(10), 5, TypeError),
])
def test_perplexity_rejects_bad_input(ids, ctx, err):
    with pytest.raises(err):
        E.perplexity(BigramLM(VOCAB), ids, ctx=ctx, progress=False)


def test_perplexity_rejects_a_batch_size_below_one_and_ids_outside_the_vocabulary():
    """batch_size=-1 scored no window and returned a perfect 1.0; ids outside the vocabulary failed in the embedding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    m = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2)).eval()
    ids = torch.randint(0, VOCAB, (4, 9))
    ids[0, 0] = 0
    for bs in (0, -1, 1.5):
        with pytest.raises(ValueError, match=f"batch_size must be an integer >= 1, got {bs}"):
            E.perplexity(m, ids, batch_size=bs, progress=False)
    with pytest.raises(ValueError, match=rf"token ids span \[0, {VOCAB + 3}\] but the model's vocabulary"):
        E.perplexity(m, torch.cat([ids, torch.full((1, 9), VOCAB + 3)]), progress=False)


def test_wikitext_text_joins_rows_and_finds_the_shared_folder(tmp_path, monkeypatch):
    f = tmp_path / "data" / "wikitext-2-raw" / "wiki.test.raw"
    f.parent.mkdir(parents=True)
    f.write_text(" = Title = \n row one\n\n row two\n", encoding="utf-8")
    assert E.wikitext2_text(f) == " = Title = \n\n row one\n\n row two"
    monkeypatch.setenv(E.SHARED_ENV, str(tmp_path))
    assert E.shared_dir() == tmp_path
    assert E.wikitext2_text() == " = Title = \n\n row one\n\n row two"
    monkeypatch.setenv(E.SHARED_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=E.SHARED_ENV):
        E.wikitext2_text()


def test_wikitext_perplexity_tokenizes_once_and_windows(tmp_path):
    f = tmp_path / "wiki.test.raw"
    f.write_text("\n".join(["some row of text"] * 5) + "\n", encoding="utf-8")
    m = tiny_llama()
    tok = CharTokenizer()
    r = E.wikitext2_perplexity(m, tok, ctx=16, path=f, progress=False)
    ids = torch.tensor(tok.encode("\n\n".join(["some row of text"] * 5)))
    ref = E.perplexity(m, ids, ctx=16, progress=False)
    assert (r.windows, r.tokens) == (len(ids) // 16, (len(ids) // 16) * 15)
    assert r.ppl == pytest.approx(ref.ppl, rel=1e-12)


def test_default_shared_folder_has_wikitext():
    """The checkout sits beside ../shared (shared/README.md); the real file must be found."""
    try:
        path = E.shared_dir() / E.WIKITEXT2_RAW_TEST
    except FileNotFoundError:
        pytest.skip("no shared folder beside this checkout and RABIT_SHARED unset")
    text = E.wikitext2_text()
    assert path.is_file() and text.count("\n\n") == 2890  # 2,891 non-empty rows


# ---------------------------------------------------------------------------------------------
# agreement with the teacher
# ---------------------------------------------------------------------------------------------


def test_compare_teacher_with_itself():
    m = tiny_llama()
    ids = torch.randint(0, VOCAB, (5, 12), generator=torch.Generator().manual_seed(5))
    r = E.compare_to_teacher(m, m, ids, batch_size=2)
    assert r["kl"] == pytest.approx(0.0, abs=1e-7)
    assert r["top1_agreement"] == 1.0
    assert r["student_ppl"] == pytest.approx(r["teacher_ppl"], rel=1e-12)
    assert r["teacher_ppl"] == pytest.approx(E.perplexity(m, ids, progress=False).ppl, rel=1e-5)


def test_compare_different_models_matches_hand_kl():
    t, s = BigramLM(VOCAB, seed=0), BigramLM(VOCAB, seed=1)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(6))
    r = E.compare_to_teacher(s, t, ids, batch_size=1)
    lt = torch.log_softmax(t.table.detach()[ids], -1)
    ls = torch.log_softmax(s.table.detach()[ids], -1)
    kl = (lt.exp() * (lt - ls)).sum(-1).mean().item()
    agree = (lt.argmax(-1) == ls.argmax(-1)).double().mean().item()
    assert r["kl"] == pytest.approx(kl, rel=1e-6) and r["kl"] > 0
    assert r["top1_agreement"] == pytest.approx(agree)


# ---------------------------------------------------------------------------------------------
# speed and size
# ---------------------------------------------------------------------------------------------


def test_tokens_per_second_reports_consistent_numbers():
    m = tiny_llama()
    r = E.tokens_per_second(m, torch.tensor([[1, 5], [1, 6]]), new_tokens=8, warmup=1, repeats=2)
    assert r["batch"] == 2 and r["new_tokens"] == 8
    assert r["tokens_per_s"] == pytest.approx(16 / r["seconds"])
    with pytest.raises(ValueError, match="new_tokens"):
        E.tokens_per_second(m, torch.tensor([1]), new_tokens=0)


def test_weight_bytes_counts_linears_and_tied_weights_once():
    m = tiny_llama()
    r = E.weight_bytes(m)
    linears = [mod for name, mod in m.named_modules() if isinstance(mod, nn.Linear) and name != "lm_head"]
    assert r["linear_modules"] == len(linears) == 14
    assert r["linear_bytes"] == sum(mod.weight.numel() * 4 for mod in linears)
    unique = {p.data_ptr(): p.numel() * p.element_size() for p in list(m.parameters()) + list(m.buffers())}
    assert r["total_bytes"] == sum(unique.values())  # the tied embedding/lm_head counts once
    assert r["other_bytes"] == r["total_bytes"] - r["linear_bytes"]


def test_weight_bytes_counts_packed_layers_at_their_real_size():
    from rabit.quantize import RabitConfig, convert_, quantize_

    m = tiny_llama()
    q = copy.deepcopy(m)
    quantize_(q, RabitConfig(), progress=False)
    convert_(q)
    r = E.weight_bytes(q)
    expected = 0
    for mod in q.modules():
        if type(mod).__name__ == "PackedRaBiTLinear":
            expected += sum(b.numel() * b.element_size() for b in mod.buffers())
            assert mod.packed.dtype == torch.int32
    assert r["linear_modules"] == 14 and r["linear_bytes"] == expected
    assert r["linear_bytes"] < E.weight_bytes(m)["linear_bytes"] / 6  # ~2 bits + scales vs 32 bits
