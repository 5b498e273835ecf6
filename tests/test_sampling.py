"""rabit.sampling: counter-based draws (the hash, the uniforms, the token distribution) and their use by the
teacher sampler and the static decoder (same draws in every runtime and at every batch size)."""

import pytest
import torch

from rabit import data as D
from rabit.sampling import mix32, row_keys, sample_next, uniforms
from rabit.static_decode import StaticDecoder

from helpers import TINY_VOCAB as VOCAB  # noqa: E402
from helpers import tiny_llama  # noqa: E402


def _lowbias32(x: int) -> int:
    """The published lowbias32 in plain Python integers (the reference of the tensor version)."""
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def test_mix32_matches_python_reference():
    g = torch.Generator().manual_seed(torch.seed())
    xs = torch.cat([torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1]),
                    torch.randint(0, 2**32, (2000,), generator=g, dtype=torch.int64)])
    got = mix32(xs)
    assert got.tolist() == [_lowbias32(int(x)) for x in xs]


def test_uniforms_are_uniform_and_depend_on_every_coordinate():
    keys = row_keys(7, torch.arange(20000))
    u = uniforms(keys, 5)
    assert u.dtype == torch.float64 and float(u.min()) > 0 and float(u.max()) < 1
    # Kolmogorov-Smirnov distance to U(0, 1): ~0.0096 is the 1 % critical value at n = 20000
    s = u.sort().values
    n = len(s)
    ks = torch.maximum(torch.arange(1, n + 1) / n - s, s - torch.arange(n) / n).abs().max().item()
    assert ks < 0.0096, ks
    assert torch.equal(u, uniforms(keys, torch.tensor([5])))            # an int or a tensor position
    assert not torch.equal(u, uniforms(keys, 6))                         # position
    assert not torch.equal(u, uniforms(row_keys(8, torch.arange(20000)), 5))  # seed
    assert len(torch.unique(u)) > 19990                                  # rows
    # seeds beyond 32 bits are not folded onto small ones
    assert not torch.equal(row_keys(1, torch.arange(4)), row_keys(1 + 2**32, torch.arange(4)))


@pytest.mark.parametrize("seed", [0, 1, 1465, 2**40 + 3])
def test_draws_have_no_structure_in_row_and_position(seed):
    """u(row, position) must not be symmetric in (row, position), nor pinned where they are equal (the unsalted
    hash did both for seed 0: row r drew the smallest uniform at position r, i.e. token 0)."""
    n = 256
    U = torch.stack([uniforms(row_keys(seed, torch.arange(n)), t) for t in range(n)], 1)  # [row, position]
    assert not torch.allclose(U, U.T)
    diag = U.diagonal()
    assert diag.min().item() > 1e-6 and diag.std().item() > 0.2
    assert U.min().item() > 1e-7  # 65k draws: the smallest is ~1.5e-5 on average


def test_row_keys_rejects_bad_input():
    with pytest.raises(ValueError, match="seed"):
        row_keys(-1, torch.arange(3))
    with pytest.raises(ValueError, match="2\\^32"):
        row_keys(0, torch.tensor([2**32]))
    with pytest.raises(ValueError, match="2\\^32"):
        row_keys(0, torch.tensor([-1, 3]))


@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.5, None), (1.0, 3)])
def test_sample_next_follows_the_distribution(temperature, top_k):
    g = torch.Generator().manual_seed(torch.seed())
    logits = torch.randn(1, 11, generator=g) * 2
    n = 20000
    keys = row_keys(int(torch.randint(0, 2**31, (1,), generator=g)), torch.arange(n))
    tok = sample_next(logits.expand(n, -1), keys, 3, temperature, top_k)
    z = logits[0] / temperature
    if top_k is not None:
        z = z.masked_fill(z < z.topk(top_k).values[-1], float("-inf"))
    p = torch.softmax(z, -1).double()
    freq = torch.bincount(tok, minlength=11).double() / n
    assert 0.5 * (freq - p).abs().sum().item() < 0.02
    if top_k is not None:
        assert set(tok.tolist()) <= set(logits[0].topk(top_k).indices.tolist())


def test_hf_loop_and_static_decoder_draw_the_same_tokens():
    m = tiny_llama(4)
    prompt = torch.full((3, 1), 1)
    keys = row_keys(11, torch.arange(3))
    ref = D.decode_loop(m, prompt, 30, lambda logits, pos: sample_next(logits, keys, pos, 0.8, 20))
    dec = StaticDecoder(m, batch_size=3, max_len=31, temperature=0.8, top_k=20)
    assert torch.equal(dec.generate(prompt, 30, seed=11), ref)
    assert not torch.equal(dec.generate(prompt, 30, seed=12), ref)


def test_teacher_data_from_the_static_decoder_has_the_hf_loops_tokens(monkeypatch):
    """On CUDA, Llama-family teachers are sampled by StaticDecoder (faster there), elsewhere by the HF loop; the
    draws are the same, so on the CPU in float32 the tokens are too, a partial last batch included."""
    m = tiny_llama(6)
    assert not D._static_sampler_applies(m, 20)  # the CPU keeps the HF loop
    keys = row_keys(3, torch.arange(7))
    ref = D.decode_loop(m, torch.full((7, 1), 1), 19, lambda logits, pos: sample_next(logits, keys, pos, 0.9, 10))
    monkeypatch.setattr(D, "_static_sampler_applies", lambda model, seq_len: True)
    monkeypatch.setattr(D, "decode_loop", None)  # the static path must not use it
    got = D.generate_teacher_data(m, n_seqs=7, seq_len=20, batch_size=3, bos_id=1, temperature=0.9, top_k=10,
                                  seed=3, progress=False)
    assert torch.equal(got, ref)


def test_teacher_data_of_other_models_comes_from_the_hf_loop(monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4)).eval()
    with monkeypatch.context() as mp:  # as if on CUDA: layout, length and placement decide
        mp.setattr(D, "model_device", lambda model: torch.device("cuda"))
        assert not D._static_sampler_applies(m, 12)
        llama = tiny_llama()
        assert D._static_sampler_applies(llama, 12)
        assert not D._static_sampler_applies(llama, 2)  # a CUDA graph needs max_len >= 3
        llama.hf_device_map = {"model.layers.0": 0, "model.layers.1": 1}
        assert not D._static_sampler_applies(llama, 12)  # sharded: StaticDecoder would bypass accelerate's hooks
        from transformers import MistralConfig, MistralForCausalLM

        mistral = MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                                   num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                                   sliding_window=8, max_position_embeddings=64)).eval()
        assert D._static_sampler_applies(mistral, 8)
        assert not D._static_sampler_applies(mistral, 9)  # longer than its sliding window
    a = D.generate_teacher_data(m, n_seqs=5, seq_len=12, batch_size=5, bos_id=1, seed=2, progress=False)
    b = D.generate_teacher_data(m, n_seqs=5, seq_len=12, batch_size=2, bos_id=1, seed=2, progress=False)
    assert torch.equal(a, b) and a.shape == (5, 12) and (a[:, 0] == 1).all()


def test_teacher_data_does_not_depend_on_the_batch_size():
    m = tiny_llama(5)
    a = D.generate_teacher_data(m, n_seqs=7, seq_len=20, batch_size=7, bos_id=1, seed=3, progress=False)
    b = D.generate_teacher_data(m, n_seqs=7, seq_len=20, batch_size=3, bos_id=1, seed=3, progress=False)
    assert torch.equal(a, b)
    assert (a[:, 0] == 1).all() and int(a.max()) < VOCAB


def _llm_qat_reference(m, n, seq_len, seed, greedy, temperature=1.0):
    """LLM-QAT's start, written out: BOS, a uniform token from the row's own draw at position 1, `greedy` argmax
    tokens, then samples; through the HF loop, one row at a time."""
    rows = []
    for r in range(n):
        key = row_keys(seed, torch.tensor([r]))
        first = int(uniforms(key, 1).item() * VOCAB)
        prompt = torch.tensor([[1, first]])

        def choose(logits, pos, key=key):
            return logits.argmax(-1) if pos < 2 + greedy else sample_next(logits, key, pos, temperature)

        rows.append(D.decode_loop(m, prompt, seq_len - 2, choose))
    return torch.cat(rows)


@pytest.mark.parametrize("greedy", [0, 3])
def test_random_token_start_and_greedy_tokens(monkeypatch, greedy):
    """LLM-QAT's recipe: the HF loop (CPU default) and StaticDecoder (CUDA default) both give the written-out
    reference, whatever the batch size; the start tokens are spread over the vocabulary; the greedy tokens are the
    argmax continuation of the start."""
    m = tiny_llama(7)
    ref = _llm_qat_reference(m, 7, 16, seed=4, greedy=greedy)
    kw = dict(n_seqs=7, seq_len=16, bos_id=1, seed=4, progress=False, start="random-token", greedy_tokens=greedy)
    assert torch.equal(D.generate_teacher_data(m, batch_size=3, **kw), ref)
    assert torch.equal(D.generate_teacher_data(m, batch_size=7, **kw), ref)
    with monkeypatch.context() as mp:
        mp.setattr(D, "_static_sampler_applies", lambda model, seq_len: True)
        mp.setattr(D, "decode_loop", None)  # the static path must not use it
        assert torch.equal(D.generate_teacher_data(m, batch_size=3, **kw), ref)
    assert len(set(ref[:, 1].tolist())) >= 6  # 7 uniform draws over 48 tokens: nearly all distinct
    if greedy:
        with torch.no_grad():
            argmax = m(input_ids=ref[:, :-1]).logits.argmax(-1)
        assert torch.equal(ref[:, 2:2 + greedy], argmax[:, 1:1 + greedy])
        # and sampled afterwards: a random tiny model's argmax continuation is not what the draws picked
        assert not torch.equal(ref[:, 2 + greedy:], argmax[:, 1 + greedy:])
    # the start draws follow (seed, row) only: a fresh seed moves them
    other = D.generate_teacher_data(m, batch_size=7, **dict(kw, seed=5))
    assert not torch.equal(other[:, 1], ref[:, 1])


def test_random_token_starts_are_uniform_over_the_vocabulary():
    m = tiny_llama(8)
    n = 6400
    ids = D.generate_teacher_data(m, n_seqs=n, seq_len=3, batch_size=n, bos_id=1, start="random-token", progress=False)
    freq = torch.bincount(ids[:, 1], minlength=VOCAB).double() / n
    tv = 0.5 * (freq - 1.0 / VOCAB).abs().sum().item()
    assert tv < 0.06, f"total variation {tv:.3f} from uniform"
    assert int(ids[:, 1].min()) == 0 and int(ids[:, 1].max()) == VOCAB - 1  # both ends of the vocabulary are drawn


@pytest.mark.parametrize("kw, match", [
    ({"start": "prompt"}, "start must be one of"),
    ({"greedy_tokens": 2}, "greedy_tokens > 0 with start='bos'"),
    ({"start": "random-token", "greedy_tokens": -1}, "greedy_tokens must be >= 0"),
    ({"start": "random-token", "seq_len": 2}, "leaves no sampled token"),
])
def test_teacher_data_rejects_bad_starts(kw, match):
    args = {"n_seqs": 2, "seq_len": 8, "batch_size": 2, "bos_id": 1, "progress": False, **kw}
    with pytest.raises(ValueError, match=match):
        D.generate_teacher_data(tiny_llama(), **args)


def test_static_decoder_rejects_bad_sampling_arguments():
    m = tiny_llama()
    with pytest.raises(ValueError, match="temperature"):
        StaticDecoder(m, max_len=8, temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        StaticDecoder(m, max_len=8, top_k=5)
    with pytest.raises(ValueError, match="top_k"):
        StaticDecoder(m, max_len=8, temperature=1.0, top_k=0)
    with pytest.raises(ValueError, match="greedy_tokens"):
        StaticDecoder(m, max_len=8, greedy_tokens=2)  # greedy decoding has nothing to switch from
    with pytest.raises(ValueError, match="greedy_tokens"):
        StaticDecoder(m, max_len=8, temperature=1.0, greedy_tokens=-1)


@pytest.mark.cuda
def test_cuda_graph_sampling_equals_eager_and_cpu(monkeypatch):
    m = tiny_llama(6)
    prompt = torch.full((4, 1), 1)
    cpu = StaticDecoder(m, batch_size=4, max_len=33, temperature=1.0).generate(prompt, 32, seed=5, first_row=9)
    mc = m.to("cuda")
    graph = StaticDecoder(mc, batch_size=4, max_len=33, temperature=1.0).generate(prompt, 32, seed=5, first_row=9)
    eager = StaticDecoder(mc, batch_size=4, max_len=33, temperature=1.0, cuda_graph=False).generate(
        prompt, 32, seed=5, first_row=9)
    assert torch.equal(graph, eager)
    # same draws on both devices; float32 logits may differ in the last bits, so allow a rare flip
    assert (graph == cpu).float().mean().item() > 0.9
    # teacher data on CUDA comes from StaticDecoder (rows 9-12 of seed 5 are these rows), float32 with grouped matmuls
    assert D._static_sampler_applies(mc, 33)
    assert StaticDecoder(mc, max_len=8)._grouped_matmuls
    assert not StaticDecoder(tiny_llama(6).to("cuda", torch.float16), max_len=8)._grouped_matmuls
    monkeypatch.setattr(D, "decode_loop", None)  # the static path must not use it
    data = D.generate_teacher_data(mc, n_seqs=13, seq_len=33, batch_size=5, bos_id=1, seed=5, progress=False)
    assert (data[9:13] == graph).float().mean().item() > 0.9


@pytest.mark.cuda
def test_cuda_graph_greedy_tokens_equal_eager():
    """The greedy/sampled switch is a device-side choice inside the captured step: graph replays give eager's
    tokens, and the argmax stretch follows each generate() call's prompt length."""
    mc = tiny_llama(9).to("cuda")
    # one decoder each: the graph is captured in the first call (T = 1) and replayed for the longer prompts
    graph = StaticDecoder(mc, batch_size=3, max_len=24, temperature=1.0, greedy_tokens=3)
    eager = StaticDecoder(mc, batch_size=3, max_len=24, temperature=1.0, greedy_tokens=3, cuda_graph=False)
    for T in (1, 2, 4):
        prompt = torch.randint(0, VOCAB, (3, T), generator=torch.Generator().manual_seed(T))
        a = graph.generate(prompt, 24 - T, seed=2)
        assert torch.equal(a, eager.generate(prompt, 24 - T, seed=2))
        with torch.no_grad():
            argmax = mc(input_ids=a[:, :-1].cuda()).logits.argmax(-1).cpu()
        assert torch.equal(a[:, T:T + 3], argmax[:, T - 1:T + 2])
