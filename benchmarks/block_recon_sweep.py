"""Block-wise reconstruction before the end-to-end distillation (BRECQ; EfficientQAT's Block-AP), tried on stories260K
first: one quickstart run (400 coupled-QAT steps on the CPU) in which, between the RaBiT init and the distillation,
each decoder layer of the student is trained alone for STEPS steps to reproduce its FP layer's output. The layer's
inputs are the student's own earlier layers' outputs on calibration sequences (the first 64 training sequences, teacher
samples: never evaluation text); its targets are the teacher layer's outputs on the teacher's inputs; the loss is their
MSE; the optimizers are the trainer's (Muon for the latents, AdamW for the scales and norms, the run's learning rates
times LR_SCALE), cosine to zero within the layer. Prints one JSON line: the held-out KL / PPL / top-1 against the FP
model and each layer's MSE before and after.

With INPUTS = teacher, every layer's inputs are the teacher's instead (its own layers' outputs on the same sequences:
each layer learns the FP layer's map alone, with no error carried from the student's earlier layers).

An experiment, not a rabit option: it wraps rabit.quickstart's call of train for this process.

    python benchmarks/block_recon_sweep.py STEPS SEED [LR_SCALE [INPUTS]]   (INPUTS: student (default) or teacher)
"""
import dataclasses
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

import rabit.quickstart as Q
import rabit.train as T

CALIB_SEQS, BATCH = 64, 16


class _Stop(Exception):
    pass


def _layer_inputs(model, layer, token_ids):
    """Per batch of the calibration sequences: (hidden states entering `layer`, the keyword arguments it is called
    with: rotary tables, mask, cache positions), caught by a pre-hook that stops the forward there."""
    caught = []

    def hook(mod, args, kwargs):
        caught.append((args[0].detach(), {k: v for k, v in kwargs.items()}))
        raise _Stop

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for i in range(0, token_ids.shape[0], BATCH):
                try:
                    model(token_ids[i:i + BATCH], use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return caught


def _run(layer, h, kw):
    out = layer(h, **kw)
    return out[0] if isinstance(out, tuple) else out


def reconstruct_blocks(student, teacher, token_ids, config, steps, lr_scale, inputs="student"):
    s_layers, t_layers = T._decoder_layers(student), T._decoder_layers(teacher)
    t_in = _layer_inputs(teacher, t_layers[0], token_ids)
    s_in = [h.clone() for h, _ in t_in]  # the embeddings are the same full-precision ones
    kws = [kw for _, kw in t_in]
    block_config = dataclasses.replace(config, lr_latent=config.lr_latent * lr_scale,
                                       lr_scales=config.lr_scales * lr_scale)
    report = []
    for i, (sl, tl) in enumerate(zip(s_layers, t_layers)):
        with torch.no_grad():
            targets = [_run(tl, h, kw) for (h, _), kw in zip(t_in, kws)]
            before = sum(F.mse_loss(_run(sl, h, kw), y).item() for h, kw, y in zip(s_in, kws, targets)) / len(targets)
        optimizers = T.build_optimizers(sl, block_config)
        sl.train()
        for step in range(steps):
            T._set_lr(optimizers, 0.5 * (1 + math.cos(math.pi * step / steps)))
            b = step % len(targets)
            loss = F.mse_loss(_run(sl, s_in[b], kws[b]), targets[b])
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in sl.parameters() if p.requires_grad], 1.0)
            for opt in optimizers:
                opt.step()
        sl.eval()
        with torch.no_grad():
            outs = [_run(sl, h, kw) for h, kw in zip(s_in, kws)]
            after = sum(F.mse_loss(o, y).item() for o, y in zip(outs, targets)) / len(targets)
        report.append({"layer": i, "mse_before": before, "mse_after": after})
        s_in, t_in = (outs if inputs == "student" else targets), [(y, kw) for y, kw in zip(targets, kws)]
    return report


steps, seed = int(sys.argv[1]), int(sys.argv[2])
lr_scale = float(sys.argv[3]) if len(sys.argv) > 3 else 1.0
inputs = sys.argv[4] if len(sys.argv) > 4 else "student"
if inputs not in ("student", "teacher"):
    sys.exit(f"block_recon_sweep: INPUTS must be student or teacher, got {inputs!r}")
real_train, blocks = T.train, {}


def train_after_blocks(student, teacher, token_ids, config, **kw):
    if steps > 0:
        t0 = time.perf_counter()
        blocks["layers"] = reconstruct_blocks(student, teacher, token_ids[:CALIB_SEQS], config, steps, lr_scale, inputs)
        blocks["seconds"] = round(time.perf_counter() - t0, 1)
    return real_train(student, teacher, token_ids, config, **kw)


Q.train = train_after_blocks
r = Q.run_quickstart(steps=400, seed=seed, progress=False, report=False)
print(json.dumps({"block_steps": steps, "lr_scale": lr_scale, "inputs": inputs, "seed": seed,
                  "kl": r["rabit_2bit"]["kl_to_fp"], "ppl": r["rabit_2bit"]["ppl"], "fp_ppl": r["fp"]["ppl"],
                  "top1": r["rabit_2bit"]["top1_agreement"],
                  "final_train_kl": r["train"]["final_kl"], "train_s": r["timings"]["train_s"], "blocks": blocks}))
