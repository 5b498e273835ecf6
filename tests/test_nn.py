"""RaBiTLinear / PackedRaBiTLinear, quantize_ / convert_ on real architectures, and the init."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import rabit
from rabit import reference as R
from rabit.init import init_rabit_linear, residual_svid
from rabit.models import load_stories260k

from helpers import assert_float_close, rel_err


def tiny_llama():  # GQA: 4 query heads share 2 KV heads
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2():  # another architecture, with biases on q/k/v
    cfg = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Qwen2ForCausalLM(cfg).eval()


def rabit_layer(out=24, in_features=40, bias=True):
    lin = nn.Linear(in_features, out, bias=bias)
    m = rabit.RaBiTLinear.from_linear(lin, k=2)
    init_rabit_linear(m, iters=2)
    return m


# ---------------------------------------------------------------- layers
def test_rabit_linear_forward_is_x_times_reference_what():
    m = rabit_layer()
    x = torch.randn(3, 5, 40)
    what, _ = R.residual_binarize(m.weight.detach(), m.g.detach(), m.h.detach())
    assert torch.equal(m(x), F.linear(x, what, m.bias))


def test_rabit_linear_gradients_follow_the_method():
    m = rabit_layer()
    x = torch.randn(7, 40)
    dy = torch.randn(7, 24)
    m(x).backward(dy)
    G = dy.T @ x  # ∂L/∂Ŵ
    _, packed = R.residual_binarize(m.weight.detach(), m.g.detach(), m.h.detach())
    _, dg64, dh64 = R.residual_binarize_backward(G, m.weight.detach(), m.g.detach(), m.h.detach(), packed,
                                                 compute_dtype=torch.float64)
    assert torch.equal(m.weight.grad, G)  # straight-through: ∂L/∂W = ∂L/∂Ŵ
    assert rel_err(m.g.grad, dg64) < 1e-5 and rel_err(m.h.grad, dh64) < 1e-5
    assert torch.equal(m.bias.grad, dy.sum(0))


def test_packed_layer_freezes_the_qat_signs_and_scales_exactly():
    m = rabit_layer()
    p = rabit.PackedRaBiTLinear.from_rabit_linear(m)
    _, packed = R.residual_binarize(m.weight.detach(), m.g.detach(), m.h.detach())
    assert torch.equal(p.packed, packed)
    assert p.g.dtype == torch.float16 and torch.equal(p.g, m.g.detach().half())
    assert torch.equal(p.h, m.h.detach().half())


@pytest.mark.parametrize("factor", [1e6, 1e-6])
def test_packed_layer_moves_a_power_of_two_between_scales_that_float16_cannot_hold(factor):
    # g beyond float16's range (Inf above 65504; all of it subnormal or 0 below 6.1e-5): a power of two per path
    # moves between g and h, so every product g_k[o]·h_k[i] stays what it was, instead of an Inf or a cut path
    m = rabit_layer()
    with torch.no_grad():
        m.g.mul_(factor)
    p = rabit.PackedRaBiTLinear.from_rabit_linear(m)
    assert torch.isfinite(p.g).all() and torch.isfinite(p.h).all() and (p.g.abs() >= 2 ** -14).all()
    prod = m.g.detach()[:, :, None].double() * m.h.detach()[:, None, :].double()
    prod16 = p.g[:, :, None].double() * p.h[:, None, :].double()
    assert rel_err(prod16, prod) < 2e-3  # float16 rounding of both, as without the move
    x = torch.randn(3, 40)
    assert rel_err(p(x), m(x).detach()) < 2e-3


def test_packed_layer_rejects_scales_no_power_of_two_can_fit():
    m = rabit_layer()
    with torch.no_grad():
        m.g[0, 0] = 1e30  # the rest of g near 1: a spread of 1e30 in one vector, beyond float16's ~1e12
    with pytest.raises(ValueError, match="the scales span more than torch.float16 can hold"):
        rabit.PackedRaBiTLinear.from_rabit_linear(m)


@pytest.mark.parametrize("bias", [True, False])
def test_packed_output_equals_rabit_linear_output(bias):
    m = rabit_layer(bias=bias)
    x = torch.randn(2, 3, 40)
    p32 = rabit.PackedRaBiTLinear.from_rabit_linear(m, scale_dtype=torch.float32)
    y_qat, y_packed = m(x).detach(), p32(x)
    what = R.residual_binarize(m.weight.detach(), m.g.detach(), m.h.detach())[0]
    y64 = F.linear(x.double(), what.double(), None if m.bias is None else m.bias.double())
    terms = (x.abs() @ what.abs().T) + (0 if m.bias is None else m.bias.abs())
    assert_float_close(y_packed, y_qat, y64, "packed vs QAT", terms, 2 * 40)
    # the float16 export differs from the QAT layer only by rounding the scales to float16
    p16 = rabit.PackedRaBiTLinear.from_rabit_linear(m)
    assert rel_err(p16(x), y_qat) < 2e-3


def test_packed_layer_rejects_wrong_width():
    p = rabit.PackedRaBiTLinear.from_rabit_linear(rabit_layer())
    with pytest.raises(ValueError, match="input has 41 features but the layer expects 40"):
        p(torch.randn(2, 41))


@pytest.mark.parametrize("cls", ["RaBiTLinear", "IndependentRaBiTLinear", "PackedRaBiTLinear"])
@pytest.mark.parametrize("kw, match", [({"k": 2.5}, "k=2.5 paths is not supported; use an integer in 1..4"),
                                       ({"k": True}, "k=True"), ({"k": 5}, "k=5"),
                                       ({"in_features": 0}, "in_features must be an integer >= 1, got 0"),
                                       ({"out_features": 8.0}, "out_features must be an integer >= 1, got 8.0")])
def test_layers_reject_bad_sizes(cls, kw, match):
    args = {"in_features": 40, "out_features": 8, **kw}
    with pytest.raises(ValueError, match=rf"{cls}: {match}"):
        getattr(rabit, cls)(**args)


def test_from_linear_rejects_other_modules():
    with pytest.raises(TypeError, match="expected a torch.nn.Linear, got Conv1d"):
        rabit.RaBiTLinear.from_linear(nn.Conv1d(3, 4, 1))
    with pytest.raises(TypeError, match="expected a RaBiTLinear, got Linear"):
        rabit.PackedRaBiTLinear.from_rabit_linear(nn.Linear(3, 4))


def test_bf16_latent_and_autocast():
    m = rabit_layer().to(torch.bfloat16)
    m.g.data, m.h.data = m.g.data.float(), m.h.data.float()
    x = torch.randn(4, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert m.weight.grad.dtype == torch.bfloat16 and m.g.grad.dtype == torch.float32


# ---------------------------------------------------------------- init
def test_coupled_svid_signs_follow_the_coupled_chain_and_improve_on_greedy():
    w = torch.randn(48, 80) * torch.rand(48, 1) * torch.rand(1, 80)
    greedy = residual_svid(w, 2, 0)
    refined = residual_svid(w, 2, 6)
    for signs, g, h in (greedy, refined):
        assert torch.equal(signs, R.residual_signs(w, g, h))  # what the coupled forward will re-derive
    err = [(w - R.dequantize(*fit)).norm() for fit in (greedy, refined)]
    assert err[1] <= err[0]


def test_init_is_function_preserving_for_the_coupled_forward():
    lin = nn.Linear(80, 48)
    m = rabit.RaBiTLinear.from_linear(lin)
    rel = init_rabit_linear(m, iters=4)
    what = m.dequantize().detach()
    assert torch.equal(m.weight, lin.weight)  # latent_init="pretrained"
    assert abs(rel_err(what, lin.weight.detach()) - rel) < 1e-5  # the forward reproduces the init's fit
    assert rel < 0.6  # two binary paths fit a Gaussian-like matrix to well under its own norm


def test_reconstruction_latent_init():
    lin = nn.Linear(40, 24)
    m = rabit.RaBiTLinear.from_linear(lin)
    rel = init_rabit_linear(m, iters=3, latent_init="reconstruction")
    # the latent now IS the init's reconstruction Ŵ, so its distance to W is the init's error
    assert abs(rel_err(m.weight.detach(), lin.weight.detach()) - rel) < 1e-5
    assert not torch.equal(m.weight, lin.weight)


def test_independent_mode_runs():
    w = torch.randn(16, 33)
    signs, g, h = residual_svid(w, 2, 3, mode="independent")
    assert (w - R.dequantize(signs, g, h)).norm() < w.norm()


# ---------------------------------------------------------------- model-level API
def _linear_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))


def test_quantize_swaps_every_decoder_linear_of_llama_gqa():
    model = tiny_llama()
    names = [n for n in _linear_names(model) if n != "lm_head"]
    assert len(names) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    rabit.quantize_(model, rabit.RabitConfig(init_iters=1), progress=False)
    for n in names:
        assert isinstance(model.get_submodule(n), rabit.RaBiTLinear)
    assert type(model.lm_head) is nn.Linear
    assert model.get_submodule("model.layers.0.self_attn.k_proj").out_features == 32  # GQA: 2 KV heads x 16
    logits = model(torch.randint(0, 128, (2, 9))).logits
    assert torch.isfinite(logits).all()


def test_quantize_include_exclude_patterns():
    model = tiny_llama()
    rabit.quantize_(model, rabit.RabitConfig(include=("*.mlp.*",), exclude=("lm_head", "*.down_proj"),
                                             init_iters=0), progress=False)
    kinds = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, rabit.RaBiTLinear)}
    assert kinds == {"gate_proj", "up_proj"}


def test_quantize_errors():
    with pytest.raises(TypeError, match="matches .model.layers.0.mlp., a LlamaMLP, not nn.Linear"):
        rabit.quantize_(tiny_llama(), rabit.RabitConfig(include=("model.layers.0.mlp",)), progress=False)
    with pytest.raises(ValueError, match="no nn.Linear matched"):
        rabit.quantize_(tiny_llama(), rabit.RabitConfig(include=("nothing.*",)), progress=False)
    model = rabit.quantize_(tiny_llama(), rabit.RabitConfig(init_iters=0), progress=False)
    with pytest.raises(ValueError, match="already has RaBiT layers"):
        rabit.quantize_(model, progress=False)
    with pytest.raises(ValueError, match="k=7 is not supported"):
        rabit.RabitConfig(k=7)
    with pytest.raises(ValueError, match="ste 'sigmoid' is unknown"):
        rabit.RabitConfig(ste="sigmoid")
    with pytest.raises(ValueError, match="no RaBiTLinear layers"):
        rabit.convert_(tiny_llama())


def test_qat_layers_infer_shapes_on_the_meta_device():
    """A QAT layer on the meta device (shape inference, empty-weight loading) runs its forward there, with or without
    autocast on: autocast has no state for meta, and asking torch for it raised (RuntimeError from
    torch.is_autocast_enabled)."""
    from rabit.nn import IndependentRaBiTLinear, RaBiTLinear
    for cls in (RaBiTLinear, IndependentRaBiTLinear):
        layer = cls(40, 24, k=2).to("meta")
        x = torch.empty(3, 40, device="meta")
        y = layer(x)
        assert y.device.type == "meta" and y.shape == (3, 24) and y.dtype == torch.float32, cls
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(x).shape == (3, 24), cls


def test_a_model_on_the_meta_device_is_named():
    m = tiny_llama().to("meta")
    with pytest.raises(ValueError, match="rabit.quantize_: the model's weights are on the meta device"):
        rabit.quantize_(m, progress=False)
    q = rabit.quantize_(tiny_llama(), rabit.RabitConfig(init_iters=0), progress=False).to("meta")
    with pytest.raises(ValueError, match="rabit.convert_: the model's weights are on the meta device"):
        rabit.convert_(q)


@pytest.mark.parametrize("kw, err, match", [
    ({"include": "*q_proj"}, TypeError, r"got the string '\*q_proj'; write include=\('\*q_proj',\)"),
    ({"exclude": "lm_head"}, TypeError, r"write exclude=\('lm_head',\)"),
    ({"include": ("a", 3)}, TypeError, "glob patterns"),
    ({"k": 2.5}, ValueError, "integer k in 1..4"), ({"k": True}, ValueError, "integer k"),
    ({"alpha_in": "0.5"}, TypeError, r"alpha_in must be a number, got '0.5' \(str\)"),
    ({"ste_param": "1"}, TypeError, "ste_param must be a number"),
    ({"init_iters": 1.5}, ValueError, "init_iters must be an integer >= 0"),
    ({"alpha_in": float("nan")}, ValueError, "finite and >= 0"), ({"alpha_out": float("inf")}, ValueError, "finite"),
])
def test_config_rejects_what_would_go_wrong_later(kw, err, match):
    """A lone string was split into characters ('*' then matched every layer, lm_head included); k=2.5 and
    init_iters=1.5 failed deep in torch; alpha=nan surfaced as NaN scales."""
    with pytest.raises(err, match=match):
        rabit.RabitConfig(**kw)


@pytest.mark.parametrize("ids, bs, match", [
    (torch.full((2, 8), 600), 8, r"token ids span \[600, 600\] but the model's vocabulary is \[0, \d+\)"),
    (torch.zeros(0, 8, dtype=torch.long), 8, "at least one sequence"),
    (torch.zeros(2, 8, dtype=torch.long), 0, "calib_batch_size must be an integer >= 1, got 0"),
    (torch.zeros(2, 8, dtype=torch.long), -1, "calib_batch_size must be an integer >= 1, got -1"),
])
def test_calibration_input_errors(ids, bs, match):
    with pytest.raises(ValueError, match=match):
        rabit.quantize_(tiny_llama(), calib_input_ids=ids, calib_batch_size=bs, progress=False)


def test_calibration_takes_the_token_ids_training_takes():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 9))
    with pytest.raises(TypeError, match="token ids must be an integer tensor, got torch.float32"):
        rabit.quantize_(tiny_llama(), calib_input_ids=ids.float(), progress=False)
    too_long = torch.zeros(1, model.config.max_position_embeddings + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="exceed the model's max_position_embeddings"):
        rabit.quantize_(tiny_llama(), calib_input_ids=too_long, progress=False)
    # any integer dtype, as in training: int16 gives the same init as int64
    a, b = tiny_llama(), tiny_llama()
    b.load_state_dict(a.state_dict())
    rabit.quantize_(a, rabit.RabitConfig(init_iters=1), calib_input_ids=ids, progress=False)
    rabit.quantize_(b, rabit.RabitConfig(init_iters=1), calib_input_ids=ids.short(), progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_quantize_refuses_float64_models():
    with pytest.raises(TypeError, match=r"has torch.float64 weights; .* convert the model first \(model.float\(\)\)"):
        rabit.quantize_(tiny_llama().double(), progress=False)


def test_convert_names_the_layer_and_leaves_the_model_as_it_was():
    model = tiny_llama()
    rabit.quantize_(model, rabit.RabitConfig(init_iters=1), progress=False)
    bad = "model.layers.1.mlp.down_proj"
    with torch.no_grad():
        model.get_submodule(bad).g[0, 0] = float("inf")
    with pytest.raises(ValueError, match=f"rabit.convert_: layer {bad}: .*g contains NaN or Inf"):
        rabit.convert_(model)
    assert not any(isinstance(m, rabit.PackedRaBiTLinear) for m in model.modules())


def test_another_architecture_with_biases_round_trips_through_convert():
    model = tiny_qwen2()
    ids = torch.randint(0, 128, (2, 11))
    rabit.quantize_(model, rabit.RabitConfig(init_iters=1), calib_input_ids=ids, progress=False)
    q = model.get_submodule("model.layers.1.self_attn.q_proj")
    assert isinstance(q, rabit.RaBiTLinear) and q.bias is not None
    with torch.no_grad():
        qat_logits = model(ids).logits
    rabit.convert_(model, scale_dtype=torch.float32)
    assert isinstance(model.get_submodule("model.layers.1.self_attn.q_proj"), rabit.PackedRaBiTLinear)
    with torch.no_grad():
        packed_logits = model(ids).logits
    # same signs and scales, only the summation order differs: float32 noise through 2 layers
    assert rel_err(packed_logits, qat_logits) < 1e-4


def test_calibration_statistics_drive_the_preconditioning():
    ids = torch.randint(0, 128, (4, 16))
    a, b = tiny_llama(), tiny_llama()
    b.load_state_dict(a.state_dict())
    rabit.quantize_(a, rabit.RabitConfig(init_iters=2), progress=False)
    rabit.quantize_(b, rabit.RabitConfig(init_iters=2, alpha_in=0.5, alpha_out=0.5), calib_input_ids=ids,
                    progress=False)
    qa, qb = a.get_submodule("model.layers.0.mlp.up_proj"), b.get_submodule("model.layers.0.mlp.up_proj")
    assert not torch.equal(qa.h, qb.h)  # the column scales now follow the input statistics
    assert all(p.grad is None for p in b.parameters())  # calibration leaves no gradients behind


def test_quantize_and_one_qat_step_lower_the_distillation_loss_on_stories260k():
    teacher, _ = load_stories260k()
    student, _ = load_stories260k()
    ids = torch.randint(3, 512, (4, 48))
    rabit.quantize_(student, rabit.RabitConfig(), calib_input_ids=ids, progress=False)
    opt = torch.optim.Adam(student.parameters(), lr=3e-4)
    with torch.no_grad():
        t_logp = F.log_softmax(teacher(ids).logits, -1)

    def kl():
        s_logp = F.log_softmax(student(ids).logits, -1)
        return F.kl_div(s_logp.flatten(0, 1), t_logp.flatten(0, 1), log_target=True, reduction="batchmean")

    before = kl()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = kl()
    assert torch.isfinite(before) and after < before
