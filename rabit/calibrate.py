"""Calibration statistics for the function-preserving init: per-channel RMS of each layer's input
activations and of the loss gradient at its output."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._checks import check_positive_int, validate_token_ids


def collect_calibration_stats(model: nn.Module, input_ids: Tensor, names: list[str], batch_size: int = 8,
                              progress: bool = True) -> dict[str, tuple[Tensor, Tensor]]:
    """{name: (s_in [in], s_out [out])} for the named nn.Linear modules.

    The output gradient comes from the model's own next-token cross-entropy on ``input_ids``:
    the distillation loss itself has zero gradient at the teacher (student == teacher), so it
    cannot rank output channels.
    """
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    input_ids = validate_token_ids(input_ids, model.get_input_embeddings().num_embeddings, None, max_pos,
                                   "rabit calibration")
    check_positive_int(batch_size, "calib_batch_size", "rabit calibration")
    device = next(model.parameters()).device
    sq_in, sq_out, count = {}, {}, {}
    handles = []

    def fwd_hook(name):
        def hook(mod, args, out):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sq_in[name] = sq_in.get(name, 0) + x.square().sum(0)
            count[name] = count.get(name, 0) + x.shape[0]
        return hook

    def bwd_hook(name):
        def hook(mod, grad_input, grad_output):
            gy = grad_output[0].detach().float().reshape(-1, grad_output[0].shape[-1])
            sq_out[name] = sq_out.get(name, 0) + gy.square().sum(0)
        return hook

    for name in names:
        mod = model.get_submodule(name)
        handles.append(mod.register_forward_hook(fwd_hook(name)))
        handles.append(mod.register_full_backward_hook(bwd_hook(name)))
    was_training = model.training
    model.eval()
    requires = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(True)  # full backward hooks fire only when outputs require grad
        batches = range(0, input_ids.shape[0], batch_size)
        for i in tqdm(batches, desc="rabit calibration", disable=not progress):
            ids = input_ids[i:i + batch_size].to(device)
            with torch.enable_grad():
                logits = model(input_ids=ids).logits.float()
                loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
                loss.backward()
            model.zero_grad(set_to_none=True)
    finally:
        for h in handles:
            h.remove()
        for p, r in requires.items():
            p.requires_grad_(r)
        model.train(was_training)
    return {n: ((sq_in[n] / count[n]).sqrt(), (sq_out[n] / count[n]).sqrt()) for n in names}
