"""Tests of rabit.block_recon: block-wise reconstruction of each decoder layer before the distillation, and its
option in rabit train (ExperimentConfig.block_steps)."""

import copy

import pytest
import torch
import torch.nn.functional as F

import rabit
from rabit.block_recon import reconstruct_blocks
from rabit.train import TrainConfig

from helpers import TINY_VOCAB, tiny_llama  # noqa: E402

CONFIG = TrainConfig(steps=1, batch_size=4, lr_latent=3e-3, lr_scales=3e-3)


def _student(teacher):
    s = copy.deepcopy(teacher)
    rabit.quantize_(s, rabit.RabitConfig(k=2, init_iters=1), progress=False)
    return s


def _ids(n=8, t=20, seed=None):
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    return torch.randint(3, TINY_VOCAB, (n, t), generator=gen)


def _layers(model):
    return list(model.model.layers)


def _param_copy(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("inputs", ["teacher", "student"])
def test_each_layer_gets_closer_to_its_teacher_layer_and_nothing_else_changes(inputs):
    teacher = tiny_llama()
    student = _student(teacher)
    rest = {k: v.clone() for k, v in student.state_dict().items() if not k.startswith("model.layers.")}
    layers_before = [_param_copy(layer) for layer in _layers(student)]
    report = reconstruct_blocks(student, teacher, _ids(), CONFIG, steps=30, inputs=inputs, progress=False)
    assert [r["layer"] for r in report] == [0, 1]
    for r in report:
        assert 0 <= r["mse_after"] < 0.9 * r["mse_before"], r
    after = student.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in rest.items())  # embeddings, final norm, lm_head
    for layer, before in zip(_layers(student), layers_before):
        assert any(not torch.equal(v, layer.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in student.parameters())


def _layer1_output(model, ids):
    out = {}
    handle = model.model.layers[1].register_forward_hook(
        lambda m, a, o: out.setdefault("y", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        handle.remove()
    return out["y"]


def test_the_reported_mse_is_the_layer_output_mse_on_the_inputs_asked_for():
    """teacher: layer 1 learns from the teacher's layer-0 output; student: from the trained student layer 0's."""
    teacher = tiny_llama()
    ids = _ids()
    target = _layer1_output(teacher, ids)
    for inputs in ("teacher", "student"):
        student = _student(teacher)
        layer1 = _param_copy(_layers(student)[1])
        report = reconstruct_blocks(student, teacher, ids, CONFIG, steps=5, inputs=inputs, progress=False)
        # the model layer 1 saw before its training: the teacher's or the trained student's layer 0 in front of it
        probe = copy.deepcopy(teacher if inputs == "teacher" else student)
        probe.model.layers[1] = copy.deepcopy(_layers(student)[1])
        probe.model.layers[1].load_state_dict(layer1)
        expect = F.mse_loss(_layer1_output(probe, ids), target).item()
        assert report[1]["mse_before"] == pytest.approx(expect, rel=1e-5), inputs


def test_teacher_inputs_make_each_layer_independent_of_the_earlier_ones():
    teacher = tiny_llama()
    ids = _ids()
    a, b = _student(teacher), _student(teacher)
    with torch.no_grad():  # another student layer 0 (its latent moved): layer 1's training must not see it
        next(p for n, p in _layers(b)[0].named_parameters() if n.endswith("weight") and p.dim() == 2).mul_(-1)
    reconstruct_blocks(a, teacher, ids, CONFIG, steps=5, inputs="teacher", progress=False)
    reconstruct_blocks(b, teacher, ids, CONFIG, steps=5, inputs="teacher", progress=False)
    la, lb = _layers(a)[1].state_dict(), _layers(b)[1].state_dict()
    assert all(torch.equal(la[k], lb[k]) for k in la)
    # with the student's inputs it does see it
    a, b = _student(teacher), _student(teacher)
    with torch.no_grad():
        next(p for n, p in _layers(b)[0].named_parameters() if n.endswith("weight") and p.dim() == 2).mul_(-1)
    reconstruct_blocks(a, teacher, ids, CONFIG, steps=5, inputs="student", progress=False)
    reconstruct_blocks(b, teacher, ids, CONFIG, steps=5, inputs="student", progress=False)
    la, lb = _layers(a)[1].state_dict(), _layers(b)[1].state_dict()
    assert any(not torch.equal(la[k], lb[k]) for k in la)


def test_zero_steps_change_nothing_and_bad_arguments_are_named():
    teacher = tiny_llama()
    student = _student(teacher)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    assert reconstruct_blocks(student, teacher, _ids(), CONFIG, steps=0, progress=False) == []
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="inputs must be one of"):
        reconstruct_blocks(student, teacher, _ids(), CONFIG, steps=1, inputs="fp", progress=False)
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        reconstruct_blocks(student, teacher, _ids(), CONFIG, steps=-1, progress=False)


def test_a_diverging_layer_is_named():
    teacher = tiny_llama()
    student = _student(teacher)
    with torch.no_grad():
        teacher.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="block reconstruction of layer 1 diverged at step 1"):
        reconstruct_blocks(student, teacher, _ids(), CONFIG, steps=3, progress=False)


def test_rabit_train_runs_the_block_stage_on_the_calibration_rows(tmp_path, monkeypatch):
    from rabit.experiment import ExperimentConfig, run_experiment

    seen = {}

    def fake_blocks(student, teacher, ids, config, steps, inputs, progress=True):
        seen.update(ids=ids.clone(), config=config, steps=steps, inputs=inputs)
        return [{"layer": 0, "mse_before": 2.0, "mse_after": 1.0}]

    def fake_train(student, teacher, data, tc, **kw):
        seen["trained_after_blocks"] = "ids" in seen
        raise RuntimeError("stop after the block stage")

    monkeypatch.setattr("rabit.block_recon.reconstruct_blocks", fake_blocks)
    monkeypatch.setattr("rabit.train.train", fake_train)
    monkeypatch.setattr("rabit.quantize.quantize_", lambda *a, **k: None)
    data = torch.randint(3, 500, (16, 32), generator=torch.Generator().manual_seed(1))
    cfg = ExperimentConfig(model="stories260k", method="rabit", tokens=3 * 4 * 8, seq_len=32, train_seq_len=8,
                           batch_size=4, data_seqs=16, calib_seqs=4, ppl_ctx=(), block_steps=9, block_inputs="student")
    with pytest.raises(RuntimeError, match="after the block stage"):
        run_experiment(cfg, tmp_path / "run", device="cpu", progress=False, teacher_data=data)
    assert torch.equal(seen["ids"], data[:4])  # whole calibration sequences, not the training pieces
    assert (seen["steps"], seen["inputs"], seen["config"]) == (9, "student", cfg.train_config())
    assert seen["trained_after_blocks"]

    # block_seqs: the first rows of the training data instead of the calibration rows, whole sequences too
    seen.clear()
    cfg = ExperimentConfig(model="stories260k", method="rabit", tokens=3 * 4 * 8, seq_len=32, train_seq_len=8,
                           batch_size=4, data_seqs=16, calib_seqs=4, ppl_ctx=(), block_steps=9, block_seqs=12)
    with pytest.raises(RuntimeError, match="after the block stage"):
        run_experiment(cfg, tmp_path / "run2", device="cpu", progress=False, teacher_data=data)
    assert torch.equal(seen["ids"], data[:12])
    # more rows than the data holds (a text file shorter than data_seqs): refused before the stage runs
    seen.clear()
    with pytest.raises(ValueError, match="block stage wants 12 sequences .* has 8"):
        run_experiment(cfg, tmp_path / "run3", device="cpu", progress=False, teacher_data=data[:8])
    assert "ids" not in seen


def test_rabit_train_records_the_block_stage(tmp_path):
    from rabit.experiment import ExperimentConfig, run_experiment

    cfg = ExperimentConfig(model="stories260k", method="rabit", tokens=2 * 4 * 32, seq_len=32, batch_size=4,
                           data_seqs=8, calib_seqs=4, gen_batch=8, ppl_ctx=(), block_steps=3)
    heldout = torch.randint(3, 500, (4, 32), generator=torch.Generator().manual_seed(2))
    res = run_experiment(cfg, tmp_path / "run", device="cpu", progress=False, heldout=heldout)
    assert [r["layer"] for r in res["block_reconstruction"]] == list(range(5))  # stories260K: 5 layers
    assert res["time_s"]["blocks"] > 0 and res["config"]["block_steps"] == 3 and res["block_steps"] == 3
    assert res["block_seqs"] == 4  # the calibration rows by default
    # run again in the same folder: it resumes from the finished run's checkpoint, whose layers replace whatever the
    # block stage would give, so the stage is skipped and the result is the first run's
    again = run_experiment(cfg, tmp_path / "run", device="cpu", progress=False, heldout=heldout)
    assert again["block_reconstruction"] == [] and again["time_s"]["blocks"] == 0
    assert res["heldout_vs_teacher"]["kl"] > 0
    assert again["heldout_vs_teacher"] == pytest.approx(res["heldout_vs_teacher"], rel=1e-6)


def test_rabit_train_reconstructs_by_default_where_the_method_trains_every_path():
    from rabit.experiment import DEFAULT_BLOCK_STEPS, ExperimentConfig

    for method in ("rabit", "rabit-plain", "independent", "onebit"):
        assert ExperimentConfig(method=method).block_steps_run == DEFAULT_BLOCK_STEPS
        assert ExperimentConfig(method=method, block_steps=0).block_steps_run == 0
    for method in ("ptq", "path-freeze"):
        assert ExperimentConfig(method=method).block_steps_run == 0
        assert ExperimentConfig(method=method, block_steps=0).block_steps_run == 0
