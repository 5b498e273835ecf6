"""Does a per-channel-normalised hidden-state MSE help where the raw MSE hurt (docs/results.md)? One stories260K
quickstart run (400 steps on the CPU) with the KL plus gamma x the MSE of the hidden states, each channel divided by the
teacher's RMS over the batch (so that a few huge-activation channels do not dominate), or with the raw MSE
(`raw`, rabit's `TrainConfig.gamma`); prints one JSON line with the held-out KL / PPL / top-1 against the FP model.

The normalised loss is an experiment, not a rabit option: it is swapped in here by replacing
rabit.train.distillation_loss for this process.

    python benchmarks/hidden_mse_sweep.py {raw|chan} GAMMA SEED
"""
import dataclasses
import json
import sys

import torch.nn.functional as F

import rabit.train as T
from rabit.quickstart import PLAN, run_quickstart

raw_loss = T.distillation_loss


def channel_normalised_loss(student_out, teacher_out, gamma, temperature=1.0):
    kl, _, _ = raw_loss(student_out, teacher_out, 0.0, temperature)
    if gamma == 0:
        return kl, kl, None
    mse = 0.0
    for s, t in zip(student_out.hidden_states[1:], teacher_out.hidden_states[1:]):
        t = t.float()
        inv = t.pow(2).mean(dim=(0, 1), keepdim=True).add(1e-6).rsqrt()  # 1 / RMS per channel of the teacher
        mse = mse + F.mse_loss(s.float() * inv, t * inv)
    return kl + gamma * mse, kl, mse


variant, gamma, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
if variant not in ("raw", "chan"):
    sys.exit(f"hidden_mse_sweep.py: variant must be raw or chan, got {variant!r}")
if variant == "chan":
    T.distillation_loss = channel_normalised_loss
plan = dataclasses.replace(PLAN, gamma=gamma)
r = run_quickstart(steps=400, seed=seed, progress=False, report=False, plan=plan)
print(json.dumps({"variant": variant, "gamma": gamma, "seed": seed, "kl": r["rabit_2bit"]["kl_to_fp"],
                  "ppl": r["rabit_2bit"]["ppl"], "fp_ppl": r["fp"]["ppl"], "top1": r["rabit_2bit"]["top1_agreement"],
                  "final_train_kl": r["train"]["final_kl"], "train_s": r["timings"]["train_s"]}))
