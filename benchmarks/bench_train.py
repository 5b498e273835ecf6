"""QAT training throughput: RaBiT coupled QAT against FP training of the same model, same loop, same run.

    python benchmarks/bench_train.py [--steps 20] [--out DIR] [--profile]

The model has SmolLM2-135M's shapes (30 layers, 576 hidden, 1536 MLP, 9/3 heads, 49152 vocab) with random
weights: throughput does not depend on the values, and no model file is needed. Both runs use
rabit.train.train (KL distillation from a frozen copy, Muon for the 2-D weights, AdamW for the rest, bf16
autocast, batch 16 x 512 tokens):

* ``fp``: the student is a plain copy of the teacher (its nn.Linear weights marked as Muon latents, as
  RaBiTLinear's are) — the cost of the same training without quantization;
* ``rabit``: the student's linears are RaBiTLinear (K = 2, coupled);
* ``rabit-checked``: as ``rabit`` with the per-layer NaN/Inf check left on (one device sync per layer per
  step), to show what turning it off during training buys.

Writes bench_train_<gpu>_<date>_batch<B>.json (into --out, else $OUT, else benchmarks/results/). With --profile,
also the top CUDA kernels and CPU ops of 3 profiled rabit steps (torch.profiler).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import rabit  # noqa: E402
import rabit.train as T  # noqa: E402
from rabit import _ops as rabit_ops  # noqa: E402  (FLOAT32_DWHAT: the same-run comparison)
from timing import device_tag, write_result  # noqa: E402


def smollm2_shaped(device):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device).eval()


def run(student, teacher, ids, steps, batch, checked=False):
    cfg = T.TrainConfig(steps=steps, batch_size=batch, lr_latent=1e-4, lr_scales=1e-4, gamma=0.0,
                        log_every=max(1, steps // 4), checkpoint_every=0, warmup_steps=0,
                        layer_finite_checks=checked)
    r = T.train(student, teacher, ids, cfg, progress=False)
    # the first logged interval holds one-time costs (kernel selection, allocator growth): skip it
    later = [h for h in r.history if h["step"] > r.history[0]["step"]]
    tps = sum(h["tokens_per_s"] for h in later) / len(later) if later else r.tokens_per_s
    return {"tokens_per_s": tps, "ms_per_step": batch * ids.shape[1] / tps * 1e3,
            "peak_memory_bytes": torch.cuda.max_memory_allocated()}


def profile(student, teacher, ids, batch):
    from torch.profiler import ProfilerActivity, profile as tprofile

    cfg = T.TrainConfig(steps=3, batch_size=batch, lr_latent=1e-4, lr_scales=1e-4, gamma=0.0, log_every=1,
                        checkpoint_every=0, warmup_steps=0)
    with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        T.train(student, teacher, ids, cfg, progress=False)
    ka = prof.key_averages()
    cuda = sorted(ka, key=lambda e: e.device_time_total, reverse=True)[:25]
    cpu = sorted(ka, key=lambda e: e.self_cpu_time_total, reverse=True)[:25]
    return {"cuda_top": [(e.key, round(e.device_time_total / 3e3, 2), e.count // 3) for e in cuda],
            "cpu_self_top": [(e.key, round(e.self_cpu_time_total / 3e3, 2), e.count // 3) for e in cpu],
            "units": "ms per step, calls per step"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    teacher = smollm2_shaped(dev)
    for p in teacher.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, 49152, (4 * args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    res = {}

    fp = copy.deepcopy(teacher)
    for name, m in fp.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            m.is_rabit_latent = True  # the 2-D weights go to Muon, as RaBiTLinear's latents do
    for p in fp.parameters():
        p.requires_grad_(True)
    torch.cuda.reset_peak_memory_stats()
    res["fp"] = run(fp, teacher, ids, args.steps, args.batch)
    del fp

    student = copy.deepcopy(teacher)
    for p in student.parameters():
        p.requires_grad_(True)
    rabit.quantize_(student, rabit.RabitConfig(k=2, init_iters=0), progress=False)
    # rabit-fp16-dwhat: dŴ in the activations' dtype and residual_binarize_backward writing dW (the schedule before
    # scale_grads; rabit._ops.FLOAT32_DWHAT), for the same-run comparison
    variants = (("rabit", False, True), ("rabit-checked", True, True), ("rabit-fp16-dwhat", False, False))
    try:
        for name, checked, f32_dwhat in variants:
            rabit_ops.FLOAT32_DWHAT = f32_dwhat
            torch.cuda.reset_peak_memory_stats()
            res[name] = run(student, teacher, ids, args.steps, args.batch, checked=checked)
    finally:  # the module-wide switch goes back to its default even when a variant fails (the profile runs after)
        rabit_ops.FLOAT32_DWHAT = True
    for name, _, _ in variants:
        res[name]["step_time_vs_fp"] = res["fp"]["tokens_per_s"] / res[name]["tokens_per_s"]
    for name, r in res.items():
        print(f"{name:>14}: {r['tokens_per_s']:>9,.0f} tok/s  {r['ms_per_step']:7.1f} ms/step  "
              f"peak {r['peak_memory_bytes'] / 2**30:5.2f} GiB" +
              (f"  {r['step_time_vs_fp']:.2f}x FP step time" if "step_time_vs_fp" in r else ""), flush=True)
    if args.profile:
        res["profile_rabit"] = profile(student, teacher, ids, args.batch)
        for k, ms, n in res["profile_rabit"]["cuda_top"][:15]:
            print(f"  cuda {ms:8.2f} ms/step {n:6d}x  {k[:90]}")
        for k, ms, n in res["profile_rabit"]["cpu_self_top"][:15]:
            print(f"  cpu  {ms:8.2f} ms/step {n:6d}x  {k[:90]}")

    gpu = torch.cuda.get_device_name()
    doc = {"device": gpu, "torch": torch.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "model": "SmolLM2-135M shapes, random weights", "batch": args.batch, "seq_len": args.seq_len,
           "steps": args.steps, "results": res}
    write_result(doc, args.out, f"bench_train_{device_tag(gpu)}_{datetime.date.today()}_batch{args.batch}.json")


if __name__ == "__main__":
    main()
