"""rabit.static_decode.StaticDecoder: the static-KV-cache greedy decoder (CUDA graphs on GPU) gives exactly the
tokens of HF generate() for FP and packed models, and refuses what it cannot run."""

import pytest
import torch

import rabit
from rabit.models import load_stories260k
from rabit.static_decode import StaticDecoder, stack_linears

from helpers import tiny_llama


def _hf_greedy(model, ids, n):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False).cpu()


@pytest.fixture(scope="module")
def stories():
    model, tok = load_stories260k()
    return model.eval(), tok


def _prompts(tok, batch):
    texts = ["Once upon a time", "The dog ran to", "Lily had a red ball and"][:batch]
    enc = [[1] + tok.encode(t) for t in texts]
    n = min(len(e) for e in enc)  # equal lengths: no padding in either decoder
    return torch.tensor([e[:n] for e in enc])


@pytest.mark.parametrize("batch", [1, 3])
def test_fp_equals_hf_generate(stories, batch):
    model, tok = stories
    ids = _prompts(tok, batch)
    ref = _hf_greedy(model, ids, 40)
    out = StaticDecoder(model, batch_size=batch, max_len=ids.shape[1] + 41).generate(ids, 40)
    assert torch.equal(out, ref)


def test_packed_equals_hf_generate(stories):
    model, tok = load_stories260k()
    rabit.quantize_(model, rabit.RabitConfig(init_iters=1), progress=False)
    rabit.convert_(model)
    ids = _prompts(tok, 2)
    ref = _hf_greedy(model, ids, 30)
    dec = StaticDecoder(model, batch_size=2, max_len=64)
    assert torch.equal(dec.generate(ids, 30), ref)
    # the decoder is reusable: a second prompt starts from a clean cache
    assert torch.equal(dec.generate(ids[:, :3], 30), _hf_greedy(model, ids[:, :3], 30))
    # q/k/v and gate/up run as one packed_linear_group call each, or (group_projections=False) one call a linear
    layer = model.model.layers[0]
    assert dec.projections()[:4] == [(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                                     (layer.self_attn.o_proj,), (layer.mlp.gate_proj, layer.mlp.up_proj),
                                     (layer.mlp.down_proj,)]
    single = StaticDecoder(model, batch_size=2, max_len=64, group_projections=False)
    assert len(single.projections()) == 7 * len(model.model.layers)
    assert torch.equal(single.generate(ids, 30), ref)


def test_eos_stops_and_pads(stories):
    model, tok = stories
    ids = _prompts(tok, 1)
    full = StaticDecoder(model, max_len=80).generate(ids, 60)
    gen = full[0, ids.shape[1]:].tolist()
    eos = gen[5]  # pretend the 6th generated token is EOS
    out = StaticDecoder(model, max_len=80).generate(ids, 60, eos_token_id=eos)
    first = gen.index(eos)
    got = out[0, ids.shape[1]:].tolist()
    assert got[: first + 1] == gen[: first + 1] and all(t == eos for t in got[first:])
    assert len(got) <= 16 * (first // 16 + 1)  # stopped at the first check after the EOS


def test_errors(stories):
    model, tok = stories
    with pytest.raises(TypeError, match="not a Llama-family"):
        StaticDecoder(torch.nn.Linear(2, 2))
    dec = StaticDecoder(model, batch_size=2, max_len=8)
    with pytest.raises(ValueError, match=r"expected input_ids of shape \[2, T\]"):
        dec.generate(torch.ones(1, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="must have 1 .. max_len-1"):
        dec.generate(torch.ones(2, 8, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"4 prompt \+ 5 new tokens exceed max_len=8"):  # before any decoding
        dec.generate(torch.ones(2, 4, dtype=torch.long), 5)
    assert dec.generate(torch.ones(2, 4, dtype=torch.long), 4).shape == (2, 8)  # exactly max_len
    with pytest.raises(ValueError, match=r"expected input_ids of shape \[2, T\], got \(3,\)"):
        dec.generate(torch.ones(3, dtype=torch.long), 2)  # 1-D: an IndexError before
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0, got -1"):
        dec.generate(torch.ones(2, 4, dtype=torch.long), -1)  # returned the prompt silently
    with pytest.raises(ValueError, match=r"token ids span \[1, 600\] but the model's vocabulary is \[0, 512\)"):
        dec.generate(torch.tensor([[1, 600], [1, 2]]), 2)
    model.config.model_type = "gpt2"
    try:
        with pytest.raises(TypeError, match="model type 'gpt2' is not supported"):
            StaticDecoder(model)
    finally:
        model.config.model_type = "llama"
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        StaticDecoder(model, cuda_graph=True)


@pytest.mark.cuda
@pytest.mark.parametrize("packed", [False, True], ids=["fp16", "packed"])
def test_cuda_graph_equals_eager_and_hf(packed):
    if packed and not torch.ops.rabit.packed_linear.default.has_kernel_for_dispatch_key("CUDA"):
        pytest.skip("rabit was built without CUDA kernels")
    model, tok = load_stories260k()
    if packed:
        rabit.quantize_(model, rabit.RabitConfig(init_iters=1), progress=False)
        rabit.convert_(model)
    model = model.to("cuda", torch.float16)
    ids = _prompts(tok, 3)
    graph = StaticDecoder(model, batch_size=3, max_len=64).generate(ids, 40)
    eager = StaticDecoder(model, batch_size=3, max_len=64, cuda_graph=False).generate(ids, 40)
    assert torch.equal(graph, eager)
    # q/k/v and gate/up as one call each (the default) or one call a linear: packed, the same tokens (the group op
    # is bit for bit); FP16, stacked weights in one GEMM that may round otherwise in the last bits (checked below
    # against HF's logits, and here that the modules became views of the stacked tensors)
    single = StaticDecoder(model, batch_size=3, max_len=64, group_projections=False).generate(ids, 40)
    if packed:  # the default fuses the glue into the packed kernels (fused_glue), which rounds otherwise
        unfused_glue = StaticDecoder(model, batch_size=3, max_len=64, fused_glue=False)
        assert torch.equal(single, unfused_glue.generate(ids, 40))
    else:
        a, m = model.model.layers[0].self_attn, model.model.layers[0].mlp
        qkv, gu = (a.q_proj.weight, a.k_proj.weight, a.v_proj.weight), (m.gate_proj.weight, m.up_proj.weight)
        for ws in (qkv, gu):
            assert all(w.untyped_storage().data_ptr() == ws[0].untyped_storage().data_ptr() for w in ws)
        dec2 = StaticDecoder(model, batch_size=3, max_len=64)  # a second decoder reuses the stacked tensors
        assert dec2._stacked[id(a.q_proj)][0].data_ptr() == qkv[0].data_ptr()
        assert len(dec2.projections()) == 4 * len(model.model.layers)
    # capturing after the prefill (warm_up, as rabit generate does before its clock starts) keeps the state
    dec = StaticDecoder(model, batch_size=3, max_len=64)
    dec.prefill(ids)
    dec.warm_up()
    dec.decode(40)
    assert torch.equal(dec._out[:, : ids.shape[1] + 40].cpu(), graph)
    # against the HF forward: the logits after the prompt (fp16, so a tolerance instead of token equality)
    dec = StaticDecoder(model, batch_size=3, max_len=64)
    dec.prefill(ids)
    with torch.no_grad():
        ours = dec.forward(dec._tok, dec._pos).float()
        ref = model(ids.cuda()).logits[:, -1].float()
    assert (ours - ref).norm() / ref.norm() < 5e-3


def test_tiny_gqa_model_matches_hf():
    model = tiny_llama()
    ids = torch.randint(3, 48, (2, 6))
    assert torch.equal(StaticDecoder(model, batch_size=2, max_len=40).generate(ids, 30), _hf_greedy(model, ids, 30))


@pytest.mark.parametrize("grouped", [False, True], ids=["sdpa", "grouped-matmuls"])
def test_both_attention_forms_match_hf(grouped):
    """StaticDecoder attends with SDPA (enable_gqa), or with grouped matmuls for float32 on CUDA; both give HF's
    greedy tokens (the grouped form forced here, on the CPU)."""
    model = tiny_llama(3)
    ids = torch.randint(3, 48, (2, 6))
    dec = StaticDecoder(model, batch_size=2, max_len=40, fused_attention=False)  # decode steps use these forms too
    assert dec._grouped_matmuls is False  # the CPU's default
    dec._grouped_matmuls = grouped
    out = dec.generate(ids, 30)
    assert torch.equal(out, _hf_greedy(model, ids, 30))
    with torch.no_grad():  # and the logits after them, against HF's forward over the whole sequence
        ours = dec.forward(dec._tok, dec._pos)
        ref = model(out).logits[:, -1]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_decoding_leaves_no_inference_tensors(stories):
    """The CPU decode loop runs under torch.inference_mode (cheaper custom-op dispatch). What it hands out and the
    state it keeps must stay normal tensors: the tokens can feed a training step, the buffers can be refilled."""
    model, tok = stories
    ids = _prompts(tok, 2)
    dec = StaticDecoder(model, batch_size=2, max_len=48)
    out = dec.generate(ids, 20)
    assert not out.is_inference()
    for t in (dec._out, dec._tok, dec._pos, dec.k_cache, dec.v_cache):
        assert not t.is_inference()
    # the generated tokens go into a forward with autograd, and the decoder runs again from a new prompt
    emb = model.get_input_embeddings()
    emb.weight.requires_grad_(True)
    try:
        emb(out).sum().backward()
        assert emb.weight.grad is not None
    finally:
        emb.weight.requires_grad_(False)
        emb.weight.grad = None
    assert torch.equal(dec.generate(ids, 20), out)


def test_compiled_glue_gives_the_same_tokens(stories):
    """compile=True fuses RMSNorm/rotary/SwiGLU with torch.compile (decode steps only)."""
    model, tok = stories
    ids = _prompts(tok, 2)
    ref = StaticDecoder(model, batch_size=2, max_len=48).generate(ids, 24)
    assert torch.equal(StaticDecoder(model, batch_size=2, max_len=48, compile=True).generate(ids, 24), ref)
    # warm_up (one compiled step on scratch positions) after the prefill keeps the decoder's state
    dec = StaticDecoder(model, batch_size=2, max_len=48, compile=True)
    dec.prefill(ids)
    dec.warm_up()
    dec.decode(24)
    assert torch.equal(dec._out[:, : ids.shape[1] + 24].cpu(), ref)


def test_full_length_prompt_and_path_freeze_budget(stories):
    """A prompt of max_len - 1 tokens leaves room for exactly one new token."""
    model, tok = stories
    ids = torch.tensor([[1] + tok.encode("Once upon a time there was")])
    out = StaticDecoder(model, max_len=ids.shape[1] + 1).generate(ids, 1)
    assert torch.equal(out, _hf_greedy(model, ids, 1))


def test_stack_linears_keeps_the_parameters():
    """The FP grouping of the decoder (CUDA) moves q/k/v-like weights into one tensor: same values, same Parameter
    objects (an optimizer keeps training them), no inference tensors even when called under inference_mode, a second
    call reuses the stack, and unlike layers are left alone."""
    lins = (torch.nn.Linear(8, 4), torch.nn.Linear(8, 6), torch.nn.Linear(8, 2))
    params = [p for lin in lins for p in lin.parameters()]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.1)
    with torch.inference_mode():
        w, b = stack_linears(lins)
    assert [p is q for p, q in zip(params, [p for lin in lins for p in lin.parameters()])] == [True] * 6
    assert all(torch.equal(p, q) for p, q in zip(params, before)) and not lins[0].weight.is_inference()
    assert w.shape == (12, 8) and b.shape == (12,) and w.data_ptr() == lins[0].weight.data_ptr()
    x = torch.randn(3, 8)
    sum(lin(x).sum() for lin in lins).backward()
    opt.step()
    assert not torch.equal(lins[1].weight, before[2]) and torch.equal(w[4:10], lins[1].weight)  # trained, in place
    w2, b2 = stack_linears(lins)
    assert w2.data_ptr() == w.data_ptr() and b2.data_ptr() == b.data_ptr()
    lins[0].load_state_dict({k: v.clone() for k, v in lins[0].state_dict().items()})
    mixed = (torch.nn.Linear(8, 4), torch.nn.Linear(8, 4, bias=False))
    assert stack_linears(mixed) is None and stack_linears((lins[0], torch.nn.Linear(8, 4).double())) is None



def _count_fused_calls(monkeypatch):
    import rabit.static_decode as sd

    calls = []

    def counting(*args, **kw):
        calls.append(args[7])
        return rabit.decode_attention(*args, **kw)

    monkeypatch.setattr(sd, "decode_attention", counting)
    return calls


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_fused_attention_matches_unfused(device, monkeypatch):
    """Decode steps run one rabit.decode_attention call per layer by default (fused_attention=None: where supported)
    and give the unfused path's tokens and, within rounding, its logits; the prefill stays unfused."""
    model = tiny_llama(5).to(device, torch.float16 if device == "cuda" else torch.float32)
    ids = torch.randint(3, 48, (2, 6))
    calls = _count_fused_calls(monkeypatch)
    fused = StaticDecoder(model, batch_size=2, max_len=40, cuda_graph=False)
    unfused = StaticDecoder(model, batch_size=2, max_len=40, cuda_graph=False, fused_attention=False)
    assert fused.fused_attention and not unfused.fused_attention
    out = fused.generate(ids, 30)
    assert len(calls) == 30 * len(model.model.layers)  # the decode steps only, each layer once
    ref = unfused.generate(ids, 30)
    assert torch.equal(out, ref)
    assert torch.equal(out, _hf_greedy(model, ids.to(device), 30))
    with torch.no_grad():  # one more step on each, from the same caches
        a = fused.forward(fused._tok, fused._pos).float()
        b = unfused.forward(unfused._tok, unfused._pos).float()
    assert (a - b).norm() / b.norm() < (2e-3 if device == "cuda" else 1e-5)
    if device == "cpu":  # float32: the fused rotary is HF's float32 arithmetic, so layer 0's caches (whose inputs are
        # the same tokens) agree bit for bit; later layers read attention outputs that differ in the last bits
        assert torch.equal(fused.k_cache[0], unfused.k_cache[0]) and torch.equal(fused.v_cache[0], unfused.v_cache[0])


def test_fused_attention_true_runs_on_cpu():
    model = tiny_llama()
    dec = StaticDecoder(model, max_len=16, fused_attention=True)
    assert dec.fused_attention
    ids = torch.randint(3, 48, (1, 5))
    assert torch.equal(dec.generate(ids, 8), _hf_greedy(model, ids, 8))


@pytest.mark.cuda
def test_cuda_fused_attention_where_supported():
    from transformers import LlamaConfig, LlamaForCausalLM

    # head_dim 68 is not a multiple of 8: the CUDA kernel cannot take it, so None runs unfused and True says why
    cfg = LlamaConfig(vocab_size=48, hidden_size=136, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval().to("cuda", torch.float16)
    assert not StaticDecoder(model, max_len=16).fused_attention
    with pytest.raises(ValueError, match="not a multiple of 8"):
        StaticDecoder(model, max_len=16, fused_attention=True)
    # the unfused decode step against HF's forward (logits: a random fp16 model's are near-ties, so no token equality)
    ids = torch.randint(3, 48, (1, 5))
    dec = StaticDecoder(model, max_len=16)
    dec.prefill(ids)
    with torch.no_grad():
        ours = dec.forward(dec._tok, dec._pos).float()
        ref = model(ids.cuda()).logits[:, -1].float()
    assert (ours - ref).norm() / ref.norm() < 5e-3


def _packed_tiny(seed):
    model = tiny_llama(seed)
    rabit.quantize_(model, rabit.RabitConfig(init_iters=1), progress=False)
    rabit.convert_(model)
    return model


@pytest.mark.parametrize("batch", [1, 5])
def test_cpu_fused_glue_matches_unfused(batch):
    """On the CPU a packed model's decode steps run the glue inside packed_linear_fused by default (any batch size:
    the CPU op has no row bound): the unfused step's logits within float32 rounding, the same greedy tokens, and
    True says why where it cannot run."""
    model = _packed_tiny(3)
    ids = torch.randint(3, 48, (batch, 6), generator=torch.Generator().manual_seed(batch))
    fused = StaticDecoder(model, batch_size=batch, max_len=40)
    unfused = StaticDecoder(model, batch_size=batch, max_len=40, fused_glue=False)
    assert fused.fused_glue and not unfused.fused_glue
    for dec in (fused, unfused):
        dec.prefill(ids)
    with torch.no_grad():
        a = fused.forward(fused._tok, fused._pos)
        b = unfused.forward(unfused._tok, unfused._pos)
    assert (a - b).norm() / b.norm() < 1e-5
    assert torch.equal(StaticDecoder(model, batch_size=batch, max_len=40).generate(ids, 12),
                       StaticDecoder(model, batch_size=batch, max_len=40, fused_glue=False).generate(ids, 12))
    with pytest.raises(ValueError, match="fused_glue=True, but the glue cannot be fused: the attention is not fused"):
        StaticDecoder(model, batch_size=batch, max_len=40, fused_attention=False, fused_glue=True)
    assert not StaticDecoder(tiny_llama(3), max_len=16).fused_glue  # not packed


def test_cpu_int8_activations_decode_within_the_int8_class():
    """int8_activations=True: decode steps run rabit.packed_linear_fused_i8 (int8 activation tables) on the CPU: the
    step's logits within a few 1e-2 of the default decoder's and not equal to them (the option takes effect), the
    prefill unchanged (float32 kernels), decoding runs; errors where it cannot run."""
    model = _packed_tiny(4)
    ids = torch.randint(3, 48, (2, 6), generator=torch.Generator().manual_seed(4))
    base = StaticDecoder(model, batch_size=2, max_len=40)
    i8 = StaticDecoder(model, batch_size=2, max_len=40, int8_activations=True)
    for dec in (base, i8):
        dec.prefill(ids)
    assert torch.equal(base._tok, i8._tok)  # the prompt's next token: float32 kernels in both
    with torch.no_grad():
        a = base.forward(base._tok, base._pos)
        b = i8.forward(i8._tok, i8._pos)
    err = ((a - b).norm() / a.norm()).item()
    assert 1e-4 < err < 5e-2, err
    out = i8.generate(ids, 8)
    assert out.shape == (2, 14) and torch.equal(out[:, :6], ids)
    with pytest.raises(ValueError, match="int8_activations=True needs the fused glue, which cannot run here: "
                                         "fused_glue=False"):
        StaticDecoder(model, max_len=16, fused_glue=False, int8_activations=True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_int8_activations_decode_within_the_int8_class(dtype):
    """int8_activations=True on CUDA (batch 1): decode steps run rabit.packed_linear_fused_i8 (int8 activation bit
    planes): the step's logits within a few 1e-2 of the default decoder's and not equal to them, the prefill
    unchanged, the CUDA graph's tokens those of eager steps; batch_size > 1 is refused."""
    if not torch.ops.rabit.packed_linear_i8.default.has_kernel_for_dispatch_key("CUDA"):
        pytest.skip("rabit was built without CUDA kernels")
    model, tok = load_stories260k()
    rabit.quantize_(model, rabit.RabitConfig(init_iters=2), progress=False)
    rabit.convert_(model)
    model = model.to("cuda", dtype)
    ids = _prompts(tok, 1)
    base = StaticDecoder(model, max_len=64, cuda_graph=False)
    i8 = StaticDecoder(model, max_len=64, cuda_graph=False, int8_activations=True)
    for dec in (base, i8):
        dec.prefill(ids)
    assert torch.equal(base._tok, i8._tok)  # the prompt's next token: the float kernels in both
    with torch.no_grad():
        a = base.forward(base._tok, base._pos).float()
        b = i8.forward(i8._tok, i8._pos).float()
    err = ((a - b).norm() / a.norm()).item()
    assert 1e-4 < err < 5e-2, err
    eager = i8.generate(ids, 30)
    graph = StaticDecoder(model, max_len=64, int8_activations=True).generate(ids, 30)
    assert torch.equal(graph, eager)
    with pytest.raises(ValueError, match="int8_activations=True decodes one row at a time on CUDA, got batch_size=2"):
        StaticDecoder(model, batch_size=2, max_len=16, int8_activations=True)


@pytest.mark.parametrize("int8", [False, True], ids=["f32-tables", "int8"])
@pytest.mark.parametrize("batch", [1, 3])
def test_cpu_decode_layers_one_call_equals_the_calls_one_by_one(int8, batch):
    """On the CPU a fused step's layers run as one rabit.decode_layers call: the residual stream and both caches equal
    those of the per-group calls bit for bit (the same ops in the same order), float32 or int8 tables, a model with
    q/k/v biases too; the op names what is wrong with its arguments."""
    for model in (_packed_tiny(6), _packed_tiny_qkv_bias(7)):
        dec = StaticDecoder(model, batch_size=batch, max_len=32, int8_activations=int8)
        ids = torch.randint(3, 48, (batch, 9), generator=torch.Generator().manual_seed(batch))
        dec.prefill(ids)
        h = torch.randn(batch, model.config.hidden_size)
        pos = torch.tensor([8])
        caches = dec.k_cache.clone(), dec.v_cache.clone()
        with torch.no_grad():
            one = dec.layers_fused(h, pos)
            after_one = dec.k_cache.clone(), dec.v_cache.clone()
            dec.k_cache.copy_(caches[0])
            dec.v_cache.copy_(caches[1])
            calls = dec.layers_fused(h, pos, one_call=False)
        assert torch.equal(one, calls)
        assert torch.equal(after_one[0], dec.k_cache) and torch.equal(after_one[1], dec.v_cache)
        assert not torch.equal(after_one[0], caches[0])  # position 8 was written
    weights, bias, eps = dec._decode_layers_args()
    with pytest.raises(ValueError, match=r"rabit.decode_layers: expected 23 weights per layer for the cache's 2 "
                                         r"layers \(46\), got 45"):
        torch.ops.rabit.decode_layers(h, weights[:-1], bias, eps, dec.k_cache, dec.v_cache, dec.cos, dec.sin, pos,
                                      dec.n_heads, 0.125, int8)
    with pytest.raises(ValueError, match=r"expected 2 epsilons per layer \(4\), got 3"):
        torch.ops.rabit.decode_layers(h, weights, bias, eps[:3], dec.k_cache, dec.v_cache, dec.cos, dec.sin, pos,
                                      dec.n_heads, 0.125, int8)


def _packed_tiny_qkv_bias(seed):
    """_packed_tiny with q/k/v biases (Qwen2's layout): the other linears have none."""
    model = tiny_llama(seed)
    for layer in model.model.layers:
        for name in ("q_proj", "k_proj", "v_proj"):
            old = getattr(layer.self_attn, name)
            new = torch.nn.Linear(old.in_features, old.out_features, bias=True)
            new.weight.data.copy_(old.weight.data)
            torch.nn.init.normal_(new.bias, std=0.1)
            setattr(layer.self_attn, name, new)
    rabit.quantize_(model, rabit.RabitConfig(init_iters=1), progress=False)
    rabit.convert_(model)
    return model


def _fused_step_matches_unfused(model, ids, cuda_graph):
    """A decode step of the default decoder (glue fused) after a prefill of ids gives, within rounding, the unfused
    step's logits and HF's; returns the fused decoder."""
    fused = StaticDecoder(model, batch_size=ids.shape[0], max_len=40, cuda_graph=cuda_graph)
    unfused = StaticDecoder(model, batch_size=ids.shape[0], max_len=40, cuda_graph=cuda_graph, fused_glue=False)
    assert fused.fused_glue and not unfused.fused_glue
    for dec in (fused, unfused):
        dec.prefill(ids)
    with torch.no_grad():
        a = fused.forward(fused._tok, fused._pos).float()
        b = unfused.forward(unfused._tok, unfused._pos).float()
        ref = model(ids.cuda()).logits[:, -1].float()
    assert (a - b).norm() / b.norm() < 5e-3
    assert (a - ref).norm() / ref.norm() < 5e-3
    return fused


@pytest.mark.cuda
@pytest.mark.parametrize("batch", [1, 4])
def test_cuda_fused_glue_matches_unfused(batch):
    """A packed model's decode steps run the norms, SwiGLU and residual adds inside packed_linear_fused by default
    (fused_glue=None on CUDA): within rounding the unfused step's logits, the graph equals eager decoding, and where
    the kernel cannot run (5 rows) None falls back to the unfused glue and True says why."""
    model = _packed_tiny(4).to("cuda", torch.float16)
    ids = torch.randint(3, 48, (batch, 6))
    fused = _fused_step_matches_unfused(model, ids, cuda_graph=None)
    graph = fused.generate(ids, 20)
    eager = StaticDecoder(model, batch_size=batch, max_len=40, cuda_graph=False).generate(ids, 20)
    assert torch.equal(graph, eager)
    assert not StaticDecoder(model, batch_size=5, max_len=40).fused_glue
    with pytest.raises(ValueError, match="the batch size 5 is above the fused kernels' 4 rows"):
        StaticDecoder(model, batch_size=5, max_len=40, fused_glue=True)
    with pytest.raises(ValueError, match="the attention is not fused"):
        StaticDecoder(model, batch_size=1, max_len=40, fused_attention=False, fused_glue=True)


@pytest.mark.cuda
@pytest.mark.parametrize("batch", [1, 3])
def test_cuda_fused_glue_on_wide_layers(batch):
    """Layers wider than the CUDA-core kernel's take the glue inside the MMA decode kernels (int8 at batch 1, down_proj
    the 1-bit one; fp16 at batch 3): the fused step gives the unfused step's and HF's logits within rounding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    cfg = LlamaConfig(vocab_size=48, hidden_size=1600, intermediate_size=7800, num_hidden_layers=1,
                      num_attention_heads=25, num_key_value_heads=5, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval().cuda()
    rabit.quantize_(model, rabit.RabitConfig(init_iters=1), progress=False)
    rabit.convert_(model)
    model.half()
    _fused_step_matches_unfused(model, torch.randint(3, 48, (batch, 6)), cuda_graph=False)


def _packed_qwen2(seed):
    """A 2-layer Qwen2 (biases on q/k/v, grouped KV heads), packed."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=48, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    model = Qwen2ForCausalLM(cfg).eval()
    rabit.quantize_(model, rabit.RabitConfig(init_iters=1), progress=False)
    rabit.convert_(model)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    return model


# float32: the fused step computes forward's function up to float32 rounding (measured on the CPU: 1.9e-7); fp16 and
# bf16: up to the roundings the unfused glue adds (8e-4 and 5e-3 on the CPU)
FUSED_STEP_TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype", list(FUSED_STEP_TOL), ids=str)
def test_forward_fused_is_forward(device, dtype):
    """forward_fused (the glue inside rabit.packed_linear_fused: norms, SwiGLU, residual adds; on the CPU its composed
    op) gives forward's logits on a Qwen2 model with q/k/v biases and grouped KV heads, and HF's forward's; on CUDA
    (fp16/bf16, where the kernel runs) it is what the decoder runs by default."""
    if device == "cuda" and dtype == torch.float32:
        pytest.skip("the CUDA kernel takes fp16/bf16 x")
    model = _packed_qwen2(6).to(device, dtype)
    ids = torch.randint(3, 48, (2, 6))
    dec = StaticDecoder(model, batch_size=2, max_len=40, cuda_graph=False, fused_glue=False)
    dec.prefill(ids)
    with torch.no_grad():
        b = dec.forward(dec._tok, dec._pos).float()
        a = dec.forward_fused(dec._tok, dec._pos).float()
        ref = model(ids.to(device)).logits[:, -1].float()
    tol = FUSED_STEP_TOL[dtype]
    assert (a - b).norm() / b.norm() < tol
    assert (a - ref).norm() / ref.norm() < tol
    if device == "cuda":
        assert StaticDecoder(model, batch_size=2, max_len=40).fused_glue


@pytest.mark.parametrize("head_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_head_dtype_computes_the_logits_from_a_rounded_copy(stories, head_dtype):
    """head_dtype: the logits are F.linear on the final normalised state and lm_head's weight, both rounded to
    head_dtype, returned in float32; the model's own lm_head is untouched, and decoding still runs (the tokens may
    differ from the float32 head's only at near-ties)."""
    model, tok = stories
    w0 = model.lm_head.weight.detach().clone()
    dec = StaticDecoder(model, batch_size=1, max_len=24, head_dtype=head_dtype)
    x = torch.randn(2, 1, model.config.hidden_size)
    ref = torch.nn.functional.linear(x.to(head_dtype), w0.to(head_dtype)).float()
    assert dec._head(x).dtype == torch.float32 and torch.equal(dec._head(x), ref)
    assert torch.equal(model.lm_head.weight, w0) and model.lm_head.weight.dtype == torch.float32
    ids = _prompts(tok, 1)
    full = StaticDecoder(model, batch_size=1, max_len=24)
    pos = torch.arange(ids.shape[1])
    with torch.no_grad():
        logits, logits32 = dec.forward(ids, pos), full.forward(ids, pos)
    assert logits.dtype == torch.float32
    tol = {torch.float16: 1e-3, torch.bfloat16: 1e-2}[head_dtype]  # ~2 units of the dtype's rounding
    assert (logits - logits32).abs().max() <= tol * logits32.abs().max()
    out = dec.generate(ids, 8)
    assert out.shape == (1, ids.shape[1] + 8) and torch.equal(out[:, : ids.shape[1]], ids)


def test_int8_head_computes_the_logits_with_int8_linear(stories):
    """head_dtype="int8" (CPU): the logits are rabit.int8_linear on the final normalised state and lm_head's int8 blocks,
    returned in float32, within the int8 class of the float32 head's; the model's lm_head is untouched; decoding runs,
    also with int8 activations in the layers (the fastest CPU setting)."""
    model, tok = stories
    w0 = model.lm_head.weight.detach().clone()
    dec = StaticDecoder(model, batch_size=1, max_len=24, head_dtype="int8")
    x = torch.randn(2, 1, model.config.hidden_size)
    want = rabit.int8_linear(x[:, 0], *rabit.int8_weight(w0), w0.shape[0])
    assert dec._head(x).dtype == torch.float32 and torch.equal(dec._head(x)[:, 0], want)
    assert torch.equal(model.lm_head.weight, w0)
    ids = _prompts(tok, 1)
    full = StaticDecoder(model, batch_size=1, max_len=24)
    pos = torch.arange(ids.shape[1])
    with torch.no_grad():
        logits, logits32 = dec.forward(ids, pos), full.forward(ids, pos)
    err = ((logits - logits32).norm() / logits32.norm()).item()
    assert 1e-4 < err < 2e-2, err
    out = dec.generate(ids, 8)
    assert out.shape == (1, ids.shape[1] + 8) and torch.equal(out[:, : ids.shape[1]], ids)
    packed = _packed_tiny(5)
    fast = StaticDecoder(packed, batch_size=2, max_len=24, head_dtype="int8", int8_activations=True)
    assert fast.generate(torch.randint(3, 48, (2, 5), generator=torch.Generator().manual_seed(5)), 6).shape == (2, 11)


def test_head_dtype_errors(stories):
    model, _ = stories
    with pytest.raises(ValueError, match=r"head_dtype must be None, torch.float16, torch.bfloat16 or 'int8', got "
                                         r"torch.float64"):
        StaticDecoder(model, max_len=8, head_dtype=torch.float64)
    half = StaticDecoder.__new__(StaticDecoder)  # only _head_fn's check: an fp16 lm_head has nothing to gain
    with pytest.raises(ValueError, match=r"needs a float32 nn.Linear lm_head, got a torch.float16 weight"):
        half._head_fn(torch.nn.Linear(4, 3).half(), torch.float16)
