"""The inter-path correlation tool."""

import copy

import torch

import rabit
from rabit.diagnostics import path_correlations, path_weights, plot_path_correlations
from rabit.models import load_stories260k


def test_residual_alignment_is_one_when_path_two_is_the_exact_residual(tmp_path):
    teacher, _ = load_stories260k()
    student = rabit.quantize_(copy.deepcopy(teacher), rabit.RabitConfig(init_iters=1), progress=False)
    # make the teacher's weight exactly Ŵ1 + Ŵ2: then R1 = y_t - y1 = y2 in every layer
    for name, m in student.named_modules():
        if isinstance(m, rabit.RaBiTLinear):
            w1, w2 = path_weights(m)
            teacher.get_submodule(name).weight.data.copy_(w1 + w2)
    ids = torch.randint(3, 512, (2, 32))
    rows = path_correlations(student, teacher, ids)
    assert len(rows) == 35  # 5 layers x 7 linears
    assert all(abs(r["corr_r1_y2"] - 1) < 1e-6 for r in rows)
    assert all(-1 <= r["corr_y1_y2"] <= 1 for r in rows)
    plot_path_correlations({"exact": rows}, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_independent_layers_are_analysed_too():
    teacher, _ = load_stories260k()
    student = rabit.quantize_(copy.deepcopy(teacher), rabit.RabitConfig(latents="independent", init_iters=1),
                              progress=False)
    rows = path_correlations(student, teacher, torch.randint(3, 512, (1, 16)))
    assert len(rows) == 35 and all(-1 <= r["corr_r1_y2"] <= 1 for r in rows)
