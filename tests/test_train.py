"""Tests of rabit.train: loss, optimizer routing, schedule, checkpoints/resume, NaN handling."""

import copy
import functools
import itertools
import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import rabit.train as T
from rabit.train import TrainConfig, TrainingDivergedError, train

from helpers import TINY_VOCAB as VOCAB  # noqa: E402
from helpers import tiny_llama  # noqa: E402


def noisy_student(teacher, latent: bool = False, scale: float = 0.05):
    """A deep copy of the teacher with fixed noise; latent=True marks the decoder linears as RaBiT
    latents (is_rabit_latent), so their weights go to Muon like RaBiTLinear's would."""
    s = copy.deepcopy(teacher)
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in s.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    if latent:
        for name, m in s.named_modules():
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                m.is_rabit_latent = True
    return s


def token_data(n=16, t=24, seed=7):
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def states_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------------------
# loss
# ---------------------------------------------------------------------------------------------


def test_distillation_loss_matches_hand_computation():
    teacher = tiny_llama()
    student = noisy_student(teacher)
    x = token_data(3, 10)
    with torch.no_grad():
        so = student(input_ids=x, output_hidden_states=True)
        to = teacher(input_ids=x, output_hidden_states=True)
        loss, kl, mse = T.distillation_loss(so, to, gamma=2.0, temperature=1.0)
    lt, ls = torch.log_softmax(to.logits.double(), -1), torch.log_softmax(so.logits.double(), -1)
    kl_ref = (lt.exp() * (lt - ls)).sum(-1).mean()
    mse_ref = sum(((a.double() - b.double()) ** 2).mean() for a, b in zip(so.hidden_states[1:], to.hidden_states[1:]))
    assert math.isclose(float(kl), float(kl_ref), rel_tol=1e-5)
    assert math.isclose(float(mse), float(mse_ref), rel_tol=1e-5)
    assert math.isclose(float(loss), float(kl_ref + 2.0 * mse_ref), rel_tol=1e-5)
    assert len(so.hidden_states) == 3  # embeddings + 2 layers: MSE covers the 2 layer outputs


def test_distillation_loss_is_zero_for_identical_models():
    m = tiny_llama()
    with torch.no_grad():
        o = m(input_ids=token_data(2, 8), output_hidden_states=True)
    loss, kl, mse = T.distillation_loss(o, o, gamma=100.0)
    assert float(loss) == 0.0 and float(kl) == 0.0 and float(mse) == 0.0


def test_kl_temperature_scaling():
    a, b = torch.randn(2, 5, VOCAB), torch.randn(2, 5, VOCAB)

    class O:
        def __init__(self, logits):
            self.logits, self.hidden_states = logits, None

    _, kl, _ = T.distillation_loss(O(a), O(b), gamma=0.0, temperature=2.0)
    ref = F.kl_div(torch.log_softmax(a / 2, -1).reshape(-1, VOCAB), torch.log_softmax(b / 2, -1).reshape(-1, VOCAB),
                   log_target=True, reduction="batchmean") * 4
    assert torch.allclose(kl, ref)


# ---------------------------------------------------------------------------------------------
# config, schedule, optimizer routing
# ---------------------------------------------------------------------------------------------


def test_lr_schedule_warmup_then_cosine_to_floor():
    c = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert c.lr_factor(0) == pytest.approx(0.1)
    assert c.lr_factor(9) == pytest.approx(1.0)
    assert c.lr_factor(10) == pytest.approx(1.0)
    assert c.lr_factor(99) == pytest.approx(0.1)
    f = [c.lr_factor(s) for s in range(10, 100)]
    assert all(x >= y for x, y in itertools.pairwise(f)), "cosine part must be non-increasing"
    assert TrainConfig(steps=50, warmup_fraction=0.1).num_warmup_steps == 5


@pytest.mark.parametrize("kw, match", [
    ({"steps": 0}, "steps"), ({"batch_size": 0}, "batch_size"), ({"lr_latent": -1.0}, "lr_latent"),
    ({"optimizer": "sgd"}, "optimizer"), ({"autocast": "fp8"}, "autocast"), ({"gamma": -1.0}, "gamma"),
    ({"warmup_fraction": 1.0}, "warmup_fraction"), ({"kl_temperature": 0.0}, "kl_temperature"),
    ({"muon_momentum": 1.0}, "muon_momentum"), ({"muon_momentum": -0.1}, "muon_momentum"),
    ({"weight_decay": float("inf")}, "weight_decay"), ({"kl_temperature": float("inf")}, "kl_temperature"),
    # these reached torch's optimizers or the loop before they failed
    ({"adam_betas": (1.5, 0.9)}, "adam_betas"), ({"adam_betas": "ab"}, "adam_betas"),
    ({"adam_betas": (0.9,)}, "adam_betas"), ({"muon_adjust_lr": "foo"}, "muon_adjust_lr"),
    ({"warmup_steps": 2.5}, "warmup_steps"), ({"checkpoint_every": 2.5}, "checkpoint_every"),
    ({"gamma": float("inf")}, "gamma"), ({"steps": True}, "steps"), ({"log_every": 0.5}, "log_every"),
    ({"seed": 1.5}, "seed"),
])
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


@pytest.mark.parametrize("kw", [{"lr_latent": "1e-3"}, {"grad_clip": "1"}, {"muon_momentum": "0.9"},
                                {"gamma": True}])
def test_config_names_a_number_field_given_another_type(kw):
    (name, value), = kw.items()
    with pytest.raises(TypeError, match=rf"TrainConfig: {name} must be a number, got {value!r} \({type(value).__name__}\)"):
        TrainConfig(**kw)


def test_latents_go_to_muon_and_the_rest_to_adamw():
    s = noisy_student(tiny_llama(), latent=True)
    opts = T.build_optimizers(s, TrainConfig())
    muon = [o for o in opts if isinstance(o, torch.optim.Muon)]
    adam = [o for o in opts if isinstance(o, torch.optim.AdamW)]
    assert len(muon) == 1 and len(adam) == 1
    muon_ids = {id(p) for g in muon[0].param_groups for p in g["params"]}
    latent_ids = {id(m.weight) for m in s.modules() if getattr(m, "is_rabit_latent", False)}
    assert muon_ids == latent_ids and len(latent_ids) == 14  # 7 linears x 2 layers
    adam_ids = {id(p) for g in adam[0].param_groups for p in g["params"]}
    assert not (adam_ids & muon_ids)
    assert adam_ids | muon_ids == {id(p) for p in s.parameters() if p.requires_grad}
    assert all(g["weight_decay"] == 0.0 for g in adam[0].param_groups)
    # momentum and weight decay reach the latents' optimizer, never the scales'
    muon, adam = T.build_optimizers(s, TrainConfig(muon_momentum=0.8, weight_decay=0.1))
    assert [(g["momentum"], g["weight_decay"]) for g in muon.param_groups] == [(0.8, 0.1)]
    assert all(g["weight_decay"] == 0.0 for g in adam.param_groups)

    opts = T.build_optimizers(s, TrainConfig(optimizer="adamw"))
    assert len(opts) == 1 and isinstance(opts[0], torch.optim.AdamW)
    names = {g["name"]: g for g in opts[0].param_groups}
    assert {id(p) for p in names["latent"]["params"]} == latent_ids


def test_embeddings_are_frozen_by_default_and_trained_when_asked():
    teacher = tiny_llama()
    s = noisy_student(teacher)
    emb_before = s.get_input_embeddings().weight.detach().clone()
    norm_before = s.model.norm.weight.detach().clone()
    train(s, teacher, token_data(), TrainConfig(steps=2, batch_size=4, lr_scales=1e-2), progress=False)
    assert torch.equal(s.get_input_embeddings().weight, emb_before)
    assert not torch.equal(s.model.norm.weight, norm_before)
    # and trained, with the scales' AdamW, when asked (rabit train --train-embeddings)
    s = noisy_student(teacher)
    emb_before = s.get_input_embeddings().weight.detach().clone()
    train(s, teacher, token_data(), TrainConfig(steps=2, batch_size=4, lr_scales=1e-2, freeze_embeddings=False),
          progress=False)
    assert not torch.equal(s.get_input_embeddings().weight, emb_before)


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("latent", [False, True], ids=["adamw", "muon"])
def test_training_lowers_the_loss(latent):
    teacher = tiny_llama()
    s = noisy_student(teacher, latent=latent)
    cfg = TrainConfig(steps=15, batch_size=4, lr_latent=1e-2, lr_scales=3e-3, gamma=1.0, log_every=5)
    r = train(s, teacher, token_data(), cfg, progress=False)
    assert [h["step"] for h in r.history] == [1, 5, 10, 15]
    assert r.final_loss < 0.7 * r.history[0]["loss"], r.history
    assert r.final_kl is not None and r.final_mse is not None and r.tokens_per_s > 0
    json.dumps(r.to_dict())  # serialisable


def train_killed_at_first_checkpoint(monkeypatch, student, teacher, ids, cfg, out_dir):
    """Train until the process "dies" right after writing its first checkpoint."""

    class Killed(Exception):
        pass

    real_save = T.save_checkpoint

    def save_then_die(*a, **k):
        real_save(*a, **k)
        raise Killed

    monkeypatch.setattr(T, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train(student, teacher, ids, cfg, out_dir=out_dir, progress=False)
    monkeypatch.setattr(T, "save_checkpoint", real_save)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, monkeypatch):
    teacher = tiny_llama()
    ids = token_data()
    cfg = TrainConfig(steps=6, batch_size=4, lr_latent=1e-2, lr_scales=3e-3, gamma=1.0, checkpoint_every=3,
                      log_every=1)
    straight = noisy_student(teacher, latent=True)
    ref = train(straight, teacher, ids, cfg, progress=False)

    train_killed_at_first_checkpoint(monkeypatch, noisy_student(teacher, latent=True), teacher, ids, cfg, tmp_path)

    resumed = noisy_student(teacher, latent=True)  # fresh weights: everything must come from the checkpoint
    r = train(resumed, teacher, ids, cfg, out_dir=tmp_path, progress=False)
    assert r.start_step == 3 and r.steps == 6
    assert states_equal(straight, resumed)
    assert [h["step"] for h in r.history] == list(range(1, 7))
    assert [h["loss"] for h in r.history] == [h["loss"] for h in ref.history]
    saved = json.loads((tmp_path / "history.json").read_text())
    assert [h["step"] for h in saved] == list(range(1, 7))

    # a finished run resumes to "nothing to do" and keeps the weights
    again = noisy_student(teacher, latent=True)
    r2 = train(again, teacher, ids, cfg, out_dir=tmp_path, progress=False)
    assert r2.start_step == 6 and states_equal(again, straight)


def test_resume_refuses_a_different_run(tmp_path):
    teacher = tiny_llama()
    ids = token_data()
    cfg = TrainConfig(steps=2, batch_size=4, checkpoint_every=1)
    train(noisy_student(teacher), teacher, ids, cfg, out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="lr_scales"):
        train(noisy_student(teacher), teacher, ids, TrainConfig(steps=2, batch_size=4, lr_scales=5e-3),
              out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="token data"):
        train(noisy_student(teacher), teacher, token_data(seed=8), cfg, out_dir=tmp_path, progress=False)
    # resume=False starts over in the same folder
    r = train(noisy_student(teacher), teacher, ids, TrainConfig(steps=2, batch_size=4, lr_scales=5e-3),
              out_dir=tmp_path, resume=False, progress=False)
    assert r.start_step == 0


def test_resume_names_a_corrupt_file_and_a_student_that_does_not_fit(tmp_path):
    from rabit.quantize import RabitConfig, quantize_

    teacher = tiny_llama()
    ids = token_data()
    cfg = TrainConfig(steps=2, batch_size=4, checkpoint_every=1)

    def student(k):
        s = copy.deepcopy(teacher)
        quantize_(s, RabitConfig(k=k, init_iters=1), progress=False)
        return s

    train(student(2), teacher, ids, cfg, out_dir=tmp_path, progress=False)
    hist = tmp_path / "history.json"
    good = hist.read_text()
    for text in ('[{"step": 1', '{"step": 1}', '["x"]'):  # cut off, an object, not a list of steps
        hist.write_text(text)
        with pytest.raises(ValueError, match=r"history.json' is not a training history .* delete it"):
            train(student(2), teacher, ids, cfg, out_dir=tmp_path, progress=False)
    hist.write_text(good)
    # the same layers with another number of paths: torch's size mismatch, named as the student not fitting
    with pytest.raises(ValueError, match=r"checkpoint does not fit this student \(.*size mismatch.*same settings"):
        train(student(1), teacher, ids, cfg, out_dir=tmp_path, progress=False)


def test_train_refuses_a_packed_student():
    from rabit.quantize import RabitConfig, convert_, quantize_

    teacher = tiny_llama()
    s = copy.deepcopy(teacher)
    convert_(quantize_(s, RabitConfig(init_iters=1), progress=False))
    with pytest.raises(ValueError, match=r"packed layers \(model.layers.0.self_attn.q_proj, .*train the model before "
                                         r"rabit.convert_"):
        train(s, teacher, token_data(), TrainConfig(steps=1, batch_size=4), progress=False)


def test_a_run_killed_eager_resumes_compiled(tmp_path, monkeypatch, dynamo_only):
    # compile changes only the rounding order, so a resume may switch it (as a GPU row killed mid-run and re-run did)
    teacher = tiny_llama()
    ids = token_data()
    cfg = TrainConfig(steps=4, batch_size=4, checkpoint_every=2, compile=False)

    train_killed_at_first_checkpoint(monkeypatch, noisy_student(teacher), teacher, ids, cfg, tmp_path)
    r = train(noisy_student(teacher), teacher, ids, replace(cfg, compile=True), out_dir=tmp_path, progress=False)
    assert (r.start_step, r.steps, r.compiled) == (2, 4, True)


def test_nan_loss_stops_with_a_message_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    teacher = tiny_llama()
    ids = token_data()
    calls = {"n": 0}
    real = T.distillation_loss

    def nan_at_third_step(*a, **k):
        calls["n"] += 1
        loss, kl, mse = real(*a, **k)
        return (loss * float("nan"), kl, mse) if calls["n"] == 3 else (loss, kl, mse)

    monkeypatch.setattr(T, "distillation_loss", nan_at_third_step)
    s = noisy_student(teacher)
    cfg = TrainConfig(steps=5, batch_size=4, checkpoint_every=2)
    with pytest.raises(TrainingDivergedError) as e:
        train(s, teacher, ids, cfg, out_dir=tmp_path, progress=False)
    msg = str(e.value)
    assert "step 3" in msg and "nan" in msg and "checkpoint (step 2)" in msg and "Lower the learning rates" in msg
    meta, _ = T.read_checkpoint(tmp_path / T.CHECKPOINT_NAME)
    assert meta["step"] == 2
    monkeypatch.setattr(T, "distillation_loss", real)
    r = train(noisy_student(teacher), teacher, ids, cfg, out_dir=tmp_path, progress=False)
    assert r.start_step == 2 and r.steps == 5


def test_exploding_learning_rate_is_reported_as_divergence():
    teacher = tiny_llama()
    cfg = TrainConfig(steps=20, batch_size=4, lr_scales=1e6, grad_clip=None, gamma=1.0, warmup_steps=0)
    with pytest.raises(TrainingDivergedError, match="no checkpoint was written"):
        train(noisy_student(teacher), teacher, token_data(), cfg, progress=False)


@pytest.mark.parametrize("ids, err, match", [
    (torch.full((4, 8), VOCAB), ValueError, "vocabulary"),
    (torch.full((4, 8), -1), ValueError, "vocabulary"),
    (torch.zeros(4, 1, dtype=torch.long), ValueError, "at least 2 tokens"),
    (torch.zeros(8, dtype=torch.long), ValueError, "2-D"),
    (torch.zeros(4, 8), TypeError, "integer"),
    (torch.zeros(2, 8, dtype=torch.long), ValueError, "batch_size"),
    (torch.zeros(4, 65, dtype=torch.long), ValueError, "max_position_embeddings"),
])
def test_bad_token_ids_are_rejected(ids, err, match):
    teacher = tiny_llama()
    with pytest.raises(err, match=match):
        train(noisy_student(teacher), teacher, ids, TrainConfig(steps=1, batch_size=4), progress=False)


def test_batches_are_a_pure_function_of_seed_and_step():
    a = T.BatchSampler(10, 4, seed=1)
    b = T.BatchSampler(10, 4, seed=1)
    seq = torch.cat([a.indices(s) for s in range(5)])  # 20 rows = exactly 2 epochs
    assert sorted(seq[:10].tolist()) == list(range(10)) and sorted(seq[10:].tolist()) == list(range(10))
    assert torch.equal(b.indices(3), seq[12:16])  # random access without replaying earlier steps


def test_gradient_checkpointing_gives_the_same_training(monkeypatch):
    teacher = tiny_llama()
    ids = token_data()
    cfg = {"steps": 3, "batch_size": 4, "lr_latent": 1e-2, "lr_scales": 3e-3, "gamma": 1.0}
    a, b = noisy_student(teacher, latent=True), noisy_student(teacher, latent=True)
    train(a, teacher, ids, TrainConfig(**cfg), progress=False)
    seen = []
    real_forward = T._forward

    def spy(model, *args):
        if model is b:
            seen.append(model.is_activation_checkpointing)
        return real_forward(model, *args)

    monkeypatch.setattr(T, "_forward", spy)
    train(b, teacher, ids, TrainConfig(gradient_checkpointing=True, **cfg), progress=False)
    assert seen == [True] * 3, "the student must run with activation checkpointing on"
    on = getattr(b, "is_activation_checkpointing", None)
    assert on is not None and not on, "train() must switch checkpointing back off"
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6), name


def test_bf16_autocast_path_trains():
    """The CUDA default (autocast bf16) exercised on CPU: finite, decreasing loss."""
    teacher = tiny_llama()
    s = noisy_student(teacher, latent=True)
    cfg = TrainConfig(steps=8, batch_size=4, lr_latent=1e-2, lr_scales=3e-3, gamma=1.0, autocast="bf16",
                      log_every=1)
    r = train(s, teacher, token_data(), cfg, progress=False)
    assert all(math.isfinite(h["loss"]) for h in r.history)
    assert r.history[-1]["loss"] < r.history[0]["loss"]
    assert all(p.dtype == torch.float32 for p in s.parameters()), "autocast must not change parameter dtypes"


# ---------------------------------------------------------------------------------------------
# the real thing: quantize_ + coupled QAT on stories260K
# ---------------------------------------------------------------------------------------------


def test_quantize_then_qat_lowers_distillation_loss_on_stories260k():
    from rabit.data import generate_teacher_data
    from rabit.models import load_stories260k
    from rabit.quantize import RabitConfig, quantize_

    teacher, _ = load_stories260k()
    ids = generate_teacher_data(teacher, n_seqs=16, seq_len=64, batch_size=16, bos_id=1, seed=0, progress=False)
    student = copy.deepcopy(teacher)
    quantize_(student, RabitConfig(), calib_input_ids=ids[:8], progress=False)
    assert any(getattr(m, "is_rabit_latent", False) for m in student.modules())
    opts = T.build_optimizers(student, TrainConfig())
    assert any(isinstance(o, torch.optim.Muon) for o in opts)
    cfg = TrainConfig(steps=12, batch_size=8, lr_latent=3e-3, lr_scales=3e-3, gamma=10.0, log_every=1,
                      warmup_steps=0)
    r = train(student, teacher, ids, cfg, progress=False)
    first = sum(h["loss"] for h in r.history[:3]) / 3
    last = sum(h["loss"] for h in r.history[-3:]) / 3
    assert last < 0.8 * first, [round(h["loss"], 3) for h in r.history]


def test_independent_latents_go_to_the_latent_optimizer():
    import rabit
    from rabit.models import load_stories260k
    from rabit.train import TrainConfig, build_optimizers, latent_parameters

    model, _ = load_stories260k()
    rabit.quantize_(model, rabit.RabitConfig(latents="independent", init_iters=0), progress=False)
    latents = latent_parameters(model)
    assert len(latents) == 2 * 35 and all(".latents." in n for n, _ in latents)
    muon = build_optimizers(model, TrainConfig(steps=1))[0]
    assert isinstance(muon, torch.optim.Muon) and len(muon.param_groups[0]["params"]) == 70


# ---------------------------------------------------------------------------------------------
# per-layer finite checks and the evaluation hook
# ---------------------------------------------------------------------------------------------


def _rabit_student(teacher):
    import rabit

    s = copy.deepcopy(teacher)
    rabit.quantize_(s, rabit.RabitConfig(k=2, init_iters=0), progress=False)
    return s


def test_training_turns_the_layer_finite_checks_off_and_restores_them():
    teacher = tiny_llama()
    s = _rabit_student(teacher)
    layers = [m for m in s.modules() if hasattr(m, "check_finite")]
    assert layers and all(m.check_finite for m in layers)
    layers[0].check_finite = False  # a user's own setting survives training
    seen = []
    train(s, teacher, token_data(), TrainConfig(steps=2, batch_size=4), progress=False,
          eval_fn=lambda m: seen.append([x.check_finite for x in layers]) or {}, eval_every=1)
    assert seen == [[False] * len(layers)] * 2
    assert layers[0].check_finite is False and all(m.check_finite for m in layers[1:])
    assert "check_finite" not in layers[1].__dict__  # back to the class default
    seen.clear()  # TrainConfig.layer_finite_checks keeps them on
    train(s, teacher, token_data(), TrainConfig(steps=1, batch_size=4, layer_finite_checks=True), progress=False,
          eval_fn=lambda m: seen.append([x.check_finite for x in layers[1:]]) or {}, eval_every=1)
    assert seen == [[True] * (len(layers) - 1)]


def test_a_non_finite_parameter_is_named_before_training(tmp_path):
    teacher = tiny_llama()
    s = _rabit_student(teacher)
    name, layer = next((n, m) for n, m in s.named_modules() if hasattr(m, "check_finite"))
    with torch.no_grad():
        layer.weight[0, 1] = float("nan")  # a NaN latent entry binarizes to -1: the loss alone would not see it
    with pytest.raises(ValueError, match=f"{name}.weight holds NaN or Inf in the student"):
        train(s, teacher, token_data(), TrainConfig(steps=2, batch_size=4), out_dir=tmp_path, progress=False)


def test_a_parameter_that_becomes_non_finite_is_caught_at_the_checkpoint(tmp_path, monkeypatch):
    teacher = tiny_llama()
    s = _rabit_student(teacher)
    layer = next(m for m in s.modules() if hasattr(m, "check_finite"))
    from rabit.muon import GroupedMuon

    real_step = GroupedMuon.step

    def poisoned_step(self, *a, **k):  # an optimizer step that writes NaN into one latent
        out = real_step(self, *a, **k)
        with torch.no_grad():
            layer.weight[0, 0] = float("nan")
        return out

    monkeypatch.setattr(GroupedMuon, "step", poisoned_step)
    with pytest.raises(TrainingDivergedError, match=r"\.weight became NaN or Inf at step 2.*no checkpoint"):
        train(s, teacher, token_data(), TrainConfig(steps=4, batch_size=4, checkpoint_every=2), out_dir=tmp_path,
              progress=False)
    # without an out_dir (no checkpoints) the check runs once after the last step
    s = _rabit_student(teacher)
    layer = next(m for m in s.modules() if hasattr(m, "check_finite"))
    with pytest.raises(TrainingDivergedError, match=r"\.weight became NaN or Inf at step 3"):
        train(s, teacher, token_data(), TrainConfig(steps=3, batch_size=4), progress=False)


def test_a_bad_start_leaves_the_student_as_it_was():
    teacher = tiny_llama()
    s = _rabit_student(teacher).eval()
    layer = next(m for m in s.modules() if hasattr(m, "check_finite"))
    with torch.no_grad():
        layer.g[0, 0] = float("inf")
    with pytest.raises(ValueError, match="holds NaN or Inf in the student"):
        train(s, teacher, token_data(), TrainConfig(steps=2, batch_size=4, gradient_checkpointing=True),
              progress=False)
    assert not s.training and layer.check_finite and "check_finite" not in layer.__dict__
    assert not getattr(s.model, "gradient_checkpointing", False)
    with pytest.raises(ValueError, match="eval_every must be >= 0"):
        train(s, teacher, token_data(), TrainConfig(steps=2, batch_size=4), eval_every=-1, progress=False)


def test_eval_hook_records_a_curve_without_changing_training():
    teacher = tiny_llama()
    ids = token_data()
    cfg = TrainConfig(steps=5, batch_size=4, lr_latent=1e-2, lr_scales=3e-3, log_every=10)
    plain, hooked = noisy_student(teacher, latent=True), noisy_student(teacher, latent=True)
    train(plain, teacher, ids, cfg, progress=False)
    modes = []

    def kl_to_teacher(model):
        modes.append((model.training, torch.is_grad_enabled()))
        with torch.no_grad():
            return {"kl": float(T.distillation_loss(model(ids[:4]), teacher(ids[:4]), 0.0)[1])}

    r = train(hooked, teacher, ids, cfg, progress=False, eval_fn=kl_to_teacher, eval_every=2)
    assert states_equal(plain, hooked)
    evals = [(h["step"], h["tokens"]) for h in r.history if "eval" in h]
    assert evals == [(2, 2 * 4 * 24), (4, 4 * 4 * 24), (5, 5 * 4 * 24)]
    assert modes == [(False, False)] * 3 and hooked.training == plain.training
    assert all(h["eval"]["kl"] > 0 for h in r.history if "eval" in h)


def test_experiment_records_the_ppl_curve(tmp_path, monkeypatch):
    from rabit import evaluate as E
    from rabit.experiment import ExperimentConfig, run_experiment

    wiki = tmp_path / "shared" / E.WIKITEXT2_RAW_TEST
    wiki.parent.mkdir(parents=True)
    wiki.write_text("\n".join(f" Once upon a time there was a cat number {i} ." for i in range(40)) + "\n")
    monkeypatch.setenv(E.SHARED_ENV, str(tmp_path / "shared"))
    cfg = ExperimentConfig(model="stories260k", method="rabit", block_steps=0,
                           tokens=4 * 4 * 32, seq_len=32, batch_size=4,
                           data_seqs=16, calib_seqs=4, gen_batch=16, ppl_ctx=(64,), curve_points=2)
    res = run_experiment(cfg, tmp_path / "run", device="cpu", progress=False)
    curve = res["ppl_curve"]
    assert [c["tokens"] for c in curve] == [0, 2 * 4 * 32, 4 * 4 * 32]
    assert all(math.isfinite(c["wikitext2_ppl_64"]) for c in curve)
    assert curve[-1]["wikitext2_ppl_64"] == pytest.approx(res["wikitext2_ppl"]["64"]["ppl"], rel=1e-9)
    assert curve[0]["wikitext2_ppl_64"] != curve[-1]["wikitext2_ppl_64"]


def test_experiment_trains_on_pieces_of_the_teacher_sequences(tmp_path, monkeypatch):
    """train_seq_len cuts the teacher sequences into pieces: the trainer sees [N * seq_len / L, L] rows of the same
    tokens, the calibration keeps the first whole sequences, and the step count follows the piece length."""
    from rabit import experiment as X
    from rabit.experiment import ExperimentConfig, run_experiment

    seen = {}

    def fake_train(student, teacher, data, tc, **kw):
        seen["data"], seen["steps"] = data.clone(), tc.steps
        raise RuntimeError("stop after the data check")

    def fake_quantize(student, config, calib_input_ids=None, progress=True):
        seen["calib"] = calib_input_ids.clone()

    data = torch.randint(3, 500, (16, 32), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr("rabit.train.train", fake_train)
    monkeypatch.setattr("rabit.quantize.quantize_", fake_quantize)
    cfg = ExperimentConfig(model="stories260k", method="rabit", block_steps=0,
                           tokens=3 * 4 * 8, seq_len=32, train_seq_len=8,
                           batch_size=4, data_seqs=16, calib_seqs=4, ppl_ctx=())
    assert (cfg.train_len, cfg.steps) == (8, 3)
    with pytest.raises(RuntimeError, match="after the data check"):
        run_experiment(cfg, tmp_path / "run", device="cpu", progress=False, teacher_data=data)
    assert torch.equal(seen["data"], data.reshape(64, 8))
    assert torch.equal(seen["calib"], data[:4])
    assert seen["steps"] == 3
    with pytest.raises(ValueError, match="divisor"):
        X.ExperimentConfig(seq_len=32, train_seq_len=12)
    # data given as is, without train_seq_len, is trained on as given (never glued into seq_len rows)
    short = data[:, :16].clone()
    cfg = ExperimentConfig(model="stories260k", method="rabit", block_steps=0,
                           tokens=3 * 4 * 32, seq_len=32, batch_size=4, data_seqs=16, calib_seqs=4, ppl_ctx=())
    with pytest.raises(RuntimeError, match="after the data check"):
        run_experiment(cfg, tmp_path / "run2", device="cpu", progress=False, teacher_data=short)
    assert torch.equal(seen["data"], short)
    cfg = ExperimentConfig(model="stories260k", method="rabit", block_steps=0,
                           tokens=3 * 4 * 8, seq_len=32, train_seq_len=8,
                           batch_size=4, data_seqs=16, calib_seqs=4, ppl_ctx=())
    with pytest.raises(ValueError, match="does not divide"):
        run_experiment(cfg, tmp_path / "run3", device="cpu", progress=False, teacher_data=data[:, :12].clone())


def test_experiment_hands_its_recipe_to_the_trainer(tmp_path, monkeypatch):
    """run_experiment trains with ExperimentConfig.train_config(): every recipe option reaches train()."""
    from rabit.experiment import ExperimentConfig, run_experiment

    seen = {}

    def fake_train(student, teacher, data, tc, **kw):
        seen["tc"] = tc
        raise RuntimeError("stop after the config check")

    monkeypatch.setattr("rabit.train.train", fake_train)
    monkeypatch.setattr("rabit.quantize.quantize_", lambda *a, **k: None)
    cfg = ExperimentConfig(model="stories260k", method="rabit", block_steps=0,
                           tokens=3 * 4 * 32, seq_len=32, batch_size=4,
                           data_seqs=16, calib_seqs=4, ppl_ctx=(), lr_latent=2e-3, lr_scales=3e-3, muon_momentum=0.9,
                           weight_decay=0.05, kl_temperature=2.0, train_embeddings=True, min_lr_ratio=0.1, gamma=0.5,
                           seed=7)
    data = torch.randint(3, 500, (16, 32), generator=torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError, match="after the config check"):
        run_experiment(cfg, tmp_path / "run", device="cpu", progress=False, teacher_data=data)
    tc = seen["tc"]
    assert tc == cfg.train_config()
    assert (tc.steps, tc.lr_latent, tc.lr_scales, tc.muon_momentum, tc.weight_decay, tc.kl_temperature,
            tc.freeze_embeddings, tc.min_lr_ratio, tc.gamma, tc.seed) == (3, 2e-3, 3e-3, 0.9, 0.05, 2.0, False, 0.1,
                                                                          0.5, 7)


def test_experiment_trains_and_calibrates_on_a_text_file(tmp_path, monkeypatch, capsys):
    """ExperimentConfig.text (rabit train --text): the training rows are the text's tokens (BOS first, rows of
    seq_len, at most data_seqs of them), the calibration takes the first rows, and no teacher data is sampled."""
    from rabit.data import encode_text
    from rabit.experiment import ExperimentConfig, run_experiment
    from rabit.models import load_model

    seen = {}

    def fake_train(student, teacher, data, tc, **kw):
        seen["data"] = data.clone()
        raise RuntimeError("stop after the data check")

    def fake_quantize(student, config, calib_input_ids=None, progress=True):
        seen["calib"] = calib_input_ids.clone()

    def no_sampling(*a, **k):
        raise AssertionError("teacher data sampled although a text file was given")

    text = " ".join(f"Once upon a time there was a dog named Tim number {i}." for i in range(60))
    path = tmp_path / "mine.txt"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setattr("rabit.train.train", fake_train)
    monkeypatch.setattr("rabit.quantize.quantize_", fake_quantize)
    monkeypatch.setattr("rabit.data.cached_teacher_data", no_sampling)
    _, tok = load_model("stories260k", device="cpu")
    ids = encode_text(tok, text, bos=True)
    for data_seqs in (1000, 5):
        cfg = ExperimentConfig(model="stories260k", method="rabit", block_steps=0,
                               tokens=4 * 4 * 32, seq_len=32, batch_size=4,
                               data_seqs=data_seqs, calib_seqs=3, ppl_ctx=(), text=str(path))
        with pytest.raises(RuntimeError, match="stop after the data check"):
            run_experiment(cfg, tmp_path / f"run{data_seqs}", device="cpu", progress=False)
        rows = min(len(ids) // 32, data_seqs)
        assert seen["data"].shape == (rows, 32)
        assert seen["data"].flatten().tolist() == ids[: rows * 32]
        assert torch.equal(seen["calib"], seen["data"][:3])
        assert f"{str(path)}: {len(ids) // 32 * 32:,} tokens in {len(ids) // 32} rows of 32" in capsys.readouterr().out
    cfg = ExperimentConfig(model="stories260k", seq_len=32, ppl_ctx=(), text=str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        run_experiment(cfg, tmp_path / "run_missing", device="cpu", progress=False)


# ---------------------------------------------------------------------------------------------
# TrainConfig.compile: the decoder layers and the loss through torch.compile
# ---------------------------------------------------------------------------------------------


# The KL of a student close to its teacher is a small difference of log-probabilities of size ~ln(48) ≈ 4; summed in
# another order its float32 rounding is a few eps of that, not of the KL itself.
KL_ROUNDING = 4 * 4 * torch.finfo(torch.float32).eps


def _loss_and_grads(student, teacher, ids, compiled: bool, autocast: str = "none"):
    """The trainer's loss and the student's gradients on one batch, with its layers and loss compiled or eager."""
    student.zero_grad(set_to_none=True)
    layers = T._decoder_layers(student, teacher) if compiled else []
    loss_fn = torch.compile(T.distillation_loss, dynamic=False) if compiled else T.distillation_loss
    with T.compiled_forwards(layers):
        with torch.no_grad(), T.autocast_context(ids.device, autocast):
            t_out = T._forward(teacher, ids, False)
        with T.autocast_context(ids.device, autocast):
            s_out = T._forward(student, ids, False)
        loss = loss_fn(s_out, t_out, 0.0)[0]
        loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


# the layers of the method table's methods: coupled K = 2, independent latents, K = 1
STUDENT_LAYERS = {"rabit": {}, "independent": {"latents": "independent"}, "onebit": {"k": 1}}


def _quantized_student(teacher, kind: str):
    import rabit

    s = copy.deepcopy(teacher)
    rabit.quantize_(s, rabit.RabitConfig(init_iters=0, **STUDENT_LAYERS[kind]), progress=False)
    return s


@pytest.mark.parametrize("student_kind", [*STUDENT_LAYERS, "fp"])
def test_compiled_layers_give_the_eager_loss_and_gradients(student_kind):
    teacher = tiny_llama()
    s = noisy_student(teacher, latent=True) if student_kind == "fp" else _quantized_student(teacher, student_kind)
    s.train()
    ids = token_data(4, 16, seed=int(torch.randint(0, 2**31 - 1, ())))
    loss_e, grads_e = _loss_and_grads(s, teacher, ids, compiled=False)
    loss_c, grads_c = _loss_and_grads(s, teacher, ids, compiled=True)
    assert "forward" not in next(iter(T._decoder_layers(s))).__dict__, "the eager forward must come back"
    assert math.isclose(loss_c, loss_e, rel_tol=1e-5, abs_tol=KL_ROUNDING)
    assert grads_c.keys() == grads_e.keys() and len(grads_e) > 10
    for name, g in grads_e.items():
        # float32 sums in another order (fused RMSNorm, softmax): rounding-level, far under 1e-4 of the norm
        err = float((grads_c[name] - g).norm() / g.norm())
        assert err < 1e-4, f"{name}: relative error {err:.2e}"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("student_kind", list(STUDENT_LAYERS))
def test_compiled_layers_on_cuda_give_the_eager_gradients_under_bf16_autocast(monkeypatch, student_kind):
    """The trainer's CUDA setting (bf16 autocast) with the rabit CUDA kernels, for the layers of the method table's
    methods; every layer takes the eager two-stream backward (threshold 0), which the compiled graph replaces by the
    serial one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import rabit._ops

    monkeypatch.setattr(rabit._ops, "OVERLAP_MIN_WEIGHTS", 0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=192, intermediate_size=320, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    teacher = LlamaForCausalLM(cfg).cuda().eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    s = _quantized_student(teacher, student_kind).train()  # the quantized layers' parameters; the rest stays frozen
    for p in s.get_input_embeddings().parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, 1000, (4, 96), device="cuda")
    loss_e, grads_e = _loss_and_grads(s, teacher, ids, compiled=False, autocast="bf16")
    loss_c, grads_c = _loss_and_grads(s, teacher, ids, compiled=True, autocast="bf16")
    assert math.isclose(loss_c, loss_e, rel_tol=1e-2)
    assert grads_c.keys() == grads_e.keys() and len(grads_e) > 20
    for name, g in grads_e.items():
        # bf16 GEMM inputs: the compiled graph rounds its fused intermediates elsewhere than eager does (1e-3 to 1e-2)
        err = float((grads_c[name].float() - g.float()).norm() / g.float().norm())
        assert err < 3e-2, f"{name}: relative error {err:.2e}"


def test_compiled_training_trains_and_restores_the_eager_layers():
    teacher = tiny_llama()
    a, b = _rabit_student(teacher), _rabit_student(teacher)
    cfg = {"steps": 3, "batch_size": 4, "log_every": 1}
    ra = train(a, teacher, token_data(), TrainConfig(**cfg), progress=False)
    rb = train(b, teacher, token_data(), TrainConfig(compile=True, **cfg), progress=False)
    assert rb.compiled and not ra.compiled
    # step 1 sees the same weights; later steps may part by a sign flip of a near-zero latent
    assert math.isclose(rb.history[0]["loss"], ra.history[0]["loss"], rel_tol=1e-5, abs_tol=KL_ROUNDING)
    assert all(math.isfinite(h["loss"]) for h in rb.history)
    assert not any("forward" in m.__dict__ for m in (*b.modules(), *teacher.modules()))
    x = token_data(2, 8, seed=3)
    with torch.no_grad():  # the restored student runs its eager forward and computes the same function
        ref = copy.deepcopy(b)
        assert torch.equal(b(input_ids=x).logits, ref(input_ids=x).logits)


def test_compiled_forwards_put_back_what_was_there():
    plain, own = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    mine = own.forward  # a forward set on the instance, as a user's wrapper would be
    own.forward = mine
    with T.compiled_forwards([plain, own]):
        assert "forward" in plain.__dict__ and own.forward is not mine
    assert "forward" not in plain.__dict__ and own.forward is mine
    with pytest.raises(RuntimeError, match="inside"), T.compiled_forwards([plain]):
        raise RuntimeError("inside")
    assert "forward" not in plain.__dict__


@pytest.fixture
def dynamo_only(monkeypatch):
    """torch.compile with dynamo's graphs run as they are (backend "eager"): what dynamo caches and recompiles is the
    same, without minutes of inductor's C++ builds on the CI machine."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))


def test_each_compiled_run_compiles_afresh_past_the_recompile_limit(dynamo_only):
    # A results table trains several methods in one process. Were each run's graphs kept, dynamo would stop compiling
    # the decoder layer's forward at its recompile limit (8) and run the later methods eagerly, silently.
    from torch._dynamo.utils import counters

    model = tiny_llama()
    runs = torch._dynamo.config.recompile_limit + 2
    compiled = []
    for n in range(runs):
        before = counters["stats"]["unique_graphs"]
        with T.compiled_forwards(T._decoder_layers(model)), torch.no_grad():
            model(input_ids=token_data(1, 4 + n, seed=n))  # a new length: a graph no earlier run compiled
        compiled.append(counters["stats"]["unique_graphs"] > before)
    assert all(compiled), compiled


def test_evaluations_in_a_compiled_run_compile_nothing(dynamo_only):
    from torch._dynamo.utils import counters

    teacher = tiny_llama()
    cfg = TrainConfig(steps=2, batch_size=4, compile=True)
    graphs = []
    for eval_fn in (None, lambda m: {"loss": float(m(input_ids=token_data(1, 11, seed=5)).logits.mean())}):
        before = counters["stats"]["unique_graphs"]
        r = train(_rabit_student(teacher), teacher, token_data(), cfg, progress=False, eval_fn=eval_fn, eval_every=1)
        graphs.append(counters["stats"]["unique_graphs"] - before)
    assert "eval" in r.history[-1] and math.isfinite(r.history[-1]["eval"]["loss"])
    assert graphs[1] == graphs[0] > 0  # eval mode and another length would otherwise compile graphs of their own


def test_compile_auto_is_eager_on_the_cpu_and_checked():
    teacher = tiny_llama()
    r = train(_rabit_student(teacher), teacher, token_data(), TrainConfig(steps=1, batch_size=4), progress=False)
    assert TrainConfig().compile == "auto" and r.compiled is False  # no gain on the CPU (docs/results.md)
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="compile must be True, False or 'auto'"):
            TrainConfig(compile=bad)


def test_compile_needs_decoder_layers():
    teacher = tiny_llama()
    s = _rabit_student(teacher).eval()
    s._no_split_modules = None  # a model that does not name its repeated block
    with pytest.raises(ValueError, match="compile=True compiles a model's decoder layers.*compile=False"):
        train(s, teacher, token_data(), TrainConfig(steps=1, batch_size=4, compile=True), progress=False)
    assert not s.training


def test_training_data_begins_teacher_rows_with_the_prefix(tmp_path):
    """--data-prefix: every teacher row is BOS, the prefix's tokens (no second BOS), then the teacher's samples."""
    from rabit.data import encode_text
    from rabit.experiment import ExperimentConfig, training_data
    from rabit.models import load_model

    model, tok = load_model("stories260k")
    text = "Tom had a red ball."  # not how stories260K's samples from BOS begin ("Once upon a time")
    pre = encode_text(tok, text, bos=False)
    cfg = ExperimentConfig(model="stories260k", seq_len=24, data_seqs=3, calib_seqs=3, gen_batch=3,
                           block_steps=0, data_prefix=text)
    ids = training_data(cfg, model, tok, tmp_path, "cpu", progress=False)
    assert ids.shape == (3, 24) and len(pre) >= 3
    assert (ids[:, 1 : 1 + len(pre)] == torch.tensor(pre)).all()
    assert (ids[:, 0] != ids[:, 1]).all()
    plain = training_data(ExperimentConfig(model="stories260k", seq_len=24, data_seqs=3, calib_seqs=3, gen_batch=3,
                                           block_steps=0), model, tok,
                          tmp_path / "plain", "cpu", progress=False)
    assert not torch.equal(ids[:, 1 + len(pre):], plain[:, 1 + len(pre):])  # the samples follow the prefix


@pytest.mark.parametrize("kw, match", [
    ({"data_prefix": "x", "text": "f.txt"}, "do not apply to training on a text file"),
    ({"data_prefix": "x", "data_start": "random-token"}, "does not combine"),
    ({"data_prefix": ""}, "non-empty"),
])
def test_experiment_config_rejects_a_bad_prefix(kw, match):
    from rabit.experiment import ExperimentConfig

    with pytest.raises(ValueError, match=match):
        ExperimentConfig(**kw)
