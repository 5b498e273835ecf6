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

It wraps rabit.quickstart's call of train for this process; the block stage is rabit.block_recon, which
`rabit train --block-steps N --block-inputs {teacher,student}` runs on any model.

    python benchmarks/block_recon_sweep.py STEPS SEED [LR_SCALE [INPUTS]]   (INPUTS: student (default) or teacher)
"""
import dataclasses
import json
import sys
import time

import rabit.quickstart as Q
import rabit.train as T
from rabit.block_recon import BLOCK_INPUTS, reconstruct_blocks

CALIB_SEQS = 64


steps, seed = int(sys.argv[1]), int(sys.argv[2])
lr_scale = float(sys.argv[3]) if len(sys.argv) > 3 else 1.0
inputs = sys.argv[4] if len(sys.argv) > 4 else "student"
if inputs not in BLOCK_INPUTS:
    sys.exit(f"block_recon_sweep: INPUTS must be one of {BLOCK_INPUTS}, got {inputs!r}")
real_train, blocks = T.train, {}


def train_after_blocks(student, teacher, token_ids, config, **kw):
    if steps > 0:
        t0 = time.perf_counter()
        block_config = dataclasses.replace(config, lr_latent=config.lr_latent * lr_scale,
                                           lr_scales=config.lr_scales * lr_scale)
        blocks["layers"] = reconstruct_blocks(student, teacher, token_ids[:CALIB_SEQS], block_config, steps, inputs,
                                              progress=False)
        blocks["seconds"] = round(time.perf_counter() - t0, 1)
    return real_train(student, teacher, token_ids, config, **kw)


Q.train = train_after_blocks
r = Q.run_quickstart(steps=400, seed=seed, progress=False, report=False)
print(json.dumps({"block_steps": steps, "lr_scale": lr_scale, "inputs": inputs, "seed": seed,
                  "kl": r["rabit_2bit"]["kl_to_fp"], "ppl": r["rabit_2bit"]["ppl"], "fp_ppl": r["fp"]["ppl"],
                  "top1": r["rabit_2bit"]["top1_agreement"],
                  "final_train_kl": r["train"]["final_kl"], "train_s": r["timings"]["train_s"], "blocks": blocks}))
