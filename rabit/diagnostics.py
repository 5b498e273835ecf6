"""The paper's inter-path analysis (RaBiT §2, rabit-method.md §7) for any trained model.

For a two-path layer with outputs y1 = x Ŵ1ᵀ and y2 = x Ŵ2ᵀ and the teacher's y_t = x Wᵀ:

    MSE(y_t, y1 + y2) ≈ σ²_R1 + σ²_y2 − 2 σ_R1 σ_y2 Corr(R1, y2),   R1 = y_t − y1

so path 2 should align with the functional residual of path 1: high Corr(R1, y2) (RaBiT reports
0.58–0.65 on Llama-2-7B, DB-LLM 0.25) and negative Corr(y1, y2).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._ops import unpack_signs
from .nn import QAT_LAYERS


def _corr(a: Tensor, b: Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-300))


def path_weights(m) -> list[Tensor]:
    """Ŵ_k = g_k ⊙ B_k ⊙ h_k of a QAT layer (the signs its forward uses now), float32."""
    signs = unpack_signs(m.packed_signs(), m.in_features)
    return [(m.g[k].detach().float()[:, None] * signs[k]) * m.h[k].detach().float()[None, :] for k in range(m.k)]


@torch.no_grad()
def path_correlations(student: nn.Module, teacher: nn.Module, input_ids: Tensor,
                      max_tokens: int = 8192) -> list[dict]:
    """Per RaBiT layer with K >= 2: Corr(y1, y2) and Corr(R1, y2) on the layer's own inputs.

    ``input_ids`` are calibration sequences (never a test split). The teacher provides the FP weight
    of the layer with the same name.
    """
    layers = {n: m for n, m in student.named_modules() if isinstance(m, QAT_LAYERS) and m.k >= 2}
    if not layers:
        raise ValueError("rabit.diagnostics: the student has no QAT layer with two or more paths")
    inputs: dict[str, list[Tensor]] = {n: [] for n in layers}
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: inputs[n].append(args[0].detach()))
             for n, m in layers.items()]
    try:
        student(input_ids=input_ids.to(next(student.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for name, m in layers.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[name]])[:max_tokens].float()
        w1, w2 = path_weights(m)[:2]
        y1, y2 = x @ w1.T, x @ w2.T
        yt = x @ teacher.get_submodule(name).weight.detach().float().T
        rows.append({"layer": name, "corr_y1_y2": _corr(y1, y2), "corr_r1_y2": _corr(yt - y1, y2)})
    return rows


def plot_path_correlations(results: dict[str, list[dict]], path) -> None:
    """One line per model (label → path_correlations rows): Corr(R1, y2) and Corr(y1, y2) per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.4), sharex=True)
    for label, rows in results.items():
        ax[0].plot([r["corr_r1_y2"] for r in rows], marker=".", label=label)
        ax[1].plot([r["corr_y1_y2"] for r in rows], marker=".", label=label)
    ax[0].set_title("Corr(R1, y2): path 2 aligned with path 1's residual")
    ax[1].set_title("Corr(y1, y2)")
    for a in ax:
        a.set_xlabel("layer (model order)")
        a.axhline(0, color="k", lw=0.5)
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
