"""The path-freezing baseline: stage 2 keeps path 1 exactly as stage 1 left it, fits path 2 to the weight
residual, and trains path 2 only; the experiment harness runs it end to end."""

import copy

import pytest
import torch

import rabit
from rabit.nn import IndependentRaBiTLinear
from rabit.path_freeze import add_residual_path_
from rabit.train import TrainConfig, train

from helpers import TINY_VOCAB, tiny_llama


def _data(n=16, t=24):
    return torch.randint(3, TINY_VOCAB, (n, t))


def test_stage2_freezes_path1_and_fits_the_residual():
    teacher = tiny_llama()
    student = copy.deepcopy(teacher)
    rabit.quantize_(student, rabit.RabitConfig(k=1), progress=False)
    train(student, teacher, _data(), TrainConfig(steps=3, batch_size=4, checkpoint_every=0), progress=False)
    q = student.model.layers[0].self_attn.q_proj
    what1 = q.dequantize(torch.float32).clone()
    w = teacher.model.layers[0].self_attn.q_proj.weight.detach().float()
    assert add_residual_path_(student, teacher) == 14  # 7 linears x 2 layers
    m = student.model.layers[0].self_attn.q_proj
    assert isinstance(m, IndependentRaBiTLinear) and m.k == 2
    paths = list(m._paths(torch.float32))
    assert torch.equal(paths[0][0], what1)  # path 1 unchanged
    # path 2 reduces the residual of path 1 (sign + rank-1 magnitude of W - Ŵ1)
    assert (w - what1 - paths[1][0]).norm() < (w - what1).norm()
    frozen = (m.latents[0].clone(), m.g[0].clone(), m.h[0].clone())
    trainable = (m.latents[1].clone(), m.g[1].clone(), m.h[1].clone())
    train(student, teacher, _data(), TrainConfig(steps=3, batch_size=4, lr_latent=1e-2, lr_scales=1e-2,
                                                 checkpoint_every=0), progress=False)
    assert all(torch.equal(a, b) for a, b in zip(frozen, (m.latents[0], m.g[0], m.h[0])))
    assert not any(torch.equal(a, b) for a, b in zip(trainable, (m.latents[1], m.g[1], m.h[1])))
    # the packed export of the two-path layer still works
    rabit.convert_(student)
    x = torch.randint(3, TINY_VOCAB, (1, 8))
    assert torch.isfinite(student(x).logits).all()


def test_stage2_needs_single_path_layers():
    teacher = tiny_llama()
    student = copy.deepcopy(teacher)
    with pytest.raises(ValueError, match="no RaBiTLinear layers"):
        add_residual_path_(student, teacher)
    rabit.quantize_(student, rabit.RabitConfig(k=2), progress=False)
    with pytest.raises(ValueError, match="stage 1 must train a single path"):
        add_residual_path_(student, teacher)


def test_experiment_runs_path_freeze(tmp_path):
    from rabit.experiment import ExperimentConfig, run_experiment

    cfg = ExperimentConfig(model="stories260k", method="path-freeze", tokens=4 * 4 * 32, seq_len=32, batch_size=4,
                           data_seqs=16, calib_seqs=4, gen_batch=16, ppl_ctx=())
    heldout = torch.randint(3, 512, (4, 32))
    res = run_experiment(cfg, tmp_path, device="cpu", progress=False, heldout=heldout)
    assert res["steps"] == 4 and [h["step"] for h in res["history"]][-1] == 4
    assert (tmp_path / "train_path1").is_dir() and (tmp_path / "train_path2").is_dir()
    assert res["heldout_vs_teacher"]["kl"] > 0
