"""Block-wise reconstruction between the init and the distillation (BRECQ; EfficientQAT's Block-AP).

Each decoder layer of the quantized student is trained alone, for a few steps, to reproduce its full-precision
layer's output on calibration sequences (MSE). The end-to-end distillation then starts from layers that already fit
their teacher layers, rather than from the init's weight-space fit alone.

The layer's inputs are either the teacher's (``inputs="teacher"``: each layer learns the FP layer's map, with no
error carried over from the student's earlier layers) or the student's own earlier layers' outputs
(``inputs="student"``: each layer also learns to correct what came before it). Optimizers are the trainer's
(Muon for the latents, AdamW for scales and norms, at the run's learning rates), cosine to zero within each layer.
Measured in docs/results.md ("block-wise reconstruction").
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

BLOCK_INPUTS = ("teacher", "student")


class _Stop(Exception):
    """Raised by the pre-hook once the first layer's inputs are caught: the rest of the forward is not needed."""


def _first_layer_inputs(model: torch.nn.Module, layer: torch.nn.Module, token_ids: torch.Tensor, batch_size: int):
    """Per batch of ``token_ids``: (hidden states entering ``layer``, the keyword arguments it is called with: rotary
    tables, mask, cache positions). Every decoder layer of a Llama-like model is called with the same keywords."""
    caught = []

    def hook(mod, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        caught.append((hidden.detach(), dict(kwargs)))
        raise _Stop

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for i in range(0, token_ids.shape[0], batch_size):
                try:
                    model(token_ids[i:i + batch_size], use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return caught


def _layer_out(layer: torch.nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def reconstruct_blocks(student: torch.nn.Module, teacher: torch.nn.Module, token_ids: torch.Tensor, config,
                       steps: int, inputs: str = "teacher", batch_size: int = 16,
                       progress: bool = True) -> list[dict[str, Any]]:
    """Train each decoder layer of ``student`` alone for ``steps`` steps to reproduce ``teacher``'s layer on
    ``token_ids [N, T]`` (calibration sequences, never evaluation text). ``config`` is the run's
    :class:`rabit.train.TrainConfig` (learning rates, optimizer, autocast, gradient clipping). Returns, per layer,
    the output MSE against the teacher's layer before and after, averaged over the batches."""
    from tqdm.auto import tqdm

    from .data import model_device
    from .train import _decoder_layers, _set_lr, autocast_context, build_optimizers

    if inputs not in BLOCK_INPUTS:
        raise ValueError(f"rabit: block reconstruction inputs must be one of {BLOCK_INPUTS} (got {inputs!r})")
    if not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f"rabit: block reconstruction steps must be an int >= 0 (got {steps!r})")
    if steps == 0:
        return []
    s_layers, t_layers = _decoder_layers(student), _decoder_layers(teacher)
    if len(s_layers) != len(t_layers):
        raise ValueError(f"rabit: the student has {len(s_layers)} decoder layers, the teacher {len(t_layers)}")
    dev = model_device(student)
    token_ids = token_ids.to(dev)
    caught = _first_layer_inputs(teacher, t_layers[0], token_ids, batch_size)
    kws = [kw for _, kw in caught]
    t_in = [h for h, _ in caught]
    s_in = list(t_in)  # the embeddings are the teacher's, full precision, so the first layer's inputs are shared
    was_training = student.training
    report = []
    bar = tqdm(total=len(s_layers) * steps, desc="block reconstruction", unit="step", disable=not progress,
               dynamic_ncols=True, leave=False)
    try:
        for i, (sl, tl) in enumerate(zip(s_layers, t_layers)):
            with torch.no_grad(), autocast_context(dev, config.autocast):
                targets = [_layer_out(tl, h, kw).float() for h, kw in zip(t_in, kws)]
            x_in = t_in if inputs == "teacher" else s_in

            def mse(b: int) -> torch.Tensor:
                with autocast_context(dev, config.autocast):
                    return F.mse_loss(_layer_out(sl, x_in[b], kws[b]).float(), targets[b])

            with torch.no_grad():
                before = sum(mse(b).item() for b in range(len(targets))) / len(targets)
            params = [p for p in sl.parameters() if p.requires_grad]
            optimizers = build_optimizers(sl, config)
            sl.train()
            for step in range(steps):
                _set_lr(optimizers, 0.5 * (1 + math.cos(math.pi * step / steps)))
                loss = mse(step % len(targets))
                if not math.isfinite(loss.item()):
                    raise RuntimeError(f"rabit: block reconstruction of layer {i} diverged at step {step + 1} "
                                       f"(loss {loss.item()}); lower the learning rates or the block steps")
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                for opt in optimizers:
                    opt.step()
                bar.update()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            sl.eval()
            # one forward of the trained layer gives both its MSE and, with the student's inputs, the next layer's
            with torch.no_grad(), autocast_context(dev, config.autocast):
                outs = [_layer_out(sl, h, kw).float() for h, kw in zip(x_in, kws)]
            after = sum(F.mse_loss(o, y).item() for o, y in zip(outs, targets)) / len(targets)
            if inputs == "student":
                s_in = [o.to(h.dtype) for o, h in zip(outs, s_in)]
            report.append({"layer": i, "mse_before": before, "mse_after": after})
            bar.set_postfix_str(f"layer {i}: MSE {before:.3g} -> {after:.3g}")
            t_in = [y.to(h.dtype) for y, h in zip(targets, t_in)]
    finally:
        bar.close()
        student.train(was_training)
    return report
