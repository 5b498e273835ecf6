"""QAT training throughput: RaBiT coupled QAT against FP training of the same model, same loop, same run.

    python benchmarks/bench_train.py [--steps 20] [--batch 16] [--variants fp,rabit,...] [--profile VARIANT]
                                     [--tag TAG] [--out DIR]

The model has SmolLM2-135M's shapes (30 layers, 576 hidden, 1536 MLP, 9/3 heads, 49152 vocab) with random
weights: throughput does not depend on the values, and no model file is needed. Every variant uses
rabit.train.train (KL distillation from a frozen copy, Muon for the 2-D weights, AdamW for the rest, bf16
autocast, batch x 512 tokens):

* ``fp``: the student is a plain copy of the teacher (its nn.Linear weights marked as Muon latents, as
  RaBiTLinear's are) — the cost of the same training without quantization;
* ``rabit``: the student's linears are RaBiTLinear (K = 2, coupled);
* ``rabit-checked``: as ``rabit`` with the per-layer NaN/Inf check left on (one device sync per layer per
  step), to show what turning it off during training buys;
* ``rabit-fp16-dwhat``: dŴ in the activations' dtype (the backward before ``scale_grads``);
* ``fp-compiled``, ``rabit-compiled``: as ``fp`` and ``rabit`` with ``TrainConfig(compile=True)`` (decoder layers
  and loss through torch.compile); ``first_step_s`` shows the compile time.

Throughput leaves out the first logged interval (step 1: compilation, kernel selection, allocator growth).
Writes bench_train_<gpu>_<date>_batch<B>[_TAG].json (into --out, else $OUT, else benchmarks/results/), with each
variant's step time against ``fp`` (and ``fp-compiled`` when run). With --profile VARIANT, also the top CUDA
kernels and CPU ops of 3 profiled steps of that variant (torch.profiler).
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


def run(student, teacher, ids, steps, batch, checked=False, compiled=False):
    cfg = T.TrainConfig(steps=steps, batch_size=batch, lr_latent=1e-4, lr_scales=1e-4, gamma=0.0,
                        log_every=max(1, steps // 4), checkpoint_every=0, warmup_steps=0,
                        layer_finite_checks=checked, compile=compiled)
    r = T.train(student, teacher, ids, cfg, progress=False)
    # the first logged interval (step 1) holds one-time costs (compilation, kernel selection, allocator growth): skip it
    later = [h for h in r.history if h["step"] > r.history[0]["step"]]
    tps = sum(h["tokens_per_s"] for h in later) / len(later) if later else r.tokens_per_s
    return {"tokens_per_s": tps, "ms_per_step": batch * ids.shape[1] / tps * 1e3,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(),
            "first_step_s": r.history[0]["elapsed_s"]}


def profile(student, teacher, ids, batch, compiled=False):
    from torch.profiler import ProfilerActivity, profile as tprofile

    cfg = T.TrainConfig(steps=3, batch_size=batch, lr_latent=1e-4, lr_scales=1e-4, gamma=0.0, log_every=1,
                        checkpoint_every=0, warmup_steps=0, compile=compiled)
    T.train(student, teacher, ids, cfg, progress=False)  # compiled: the same graphs, so the profile sees no compiling
    with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        T.train(student, teacher, ids, cfg, progress=False)
    ka = prof.key_averages()
    cuda = sorted(ka, key=lambda e: e.device_time_total, reverse=True)[:25]
    cpu = sorted(ka, key=lambda e: e.self_cpu_time_total, reverse=True)[:25]
    return {"cuda_top": [(e.key, round(e.device_time_total / 3e3, 2), e.count // 3) for e in cuda],
            "cpu_self_top": [(e.key, round(e.self_cpu_time_total / 3e3, 2), e.count // 3) for e in cpu],
            "units": "ms per step, calls per step"}


# variant -> (RaBiT student, per-layer finite checks, float32 dŴ, TrainConfig.compile). rabit-fp16-dwhat: dŴ in the
# activations' dtype and residual_binarize_backward writing dW (the schedule before scale_grads;
# rabit._ops.FLOAT32_DWHAT), for the same-run comparison. "-compiled": TrainConfig(compile=True).
VARIANTS = {"fp": (False, False, True, False), "fp-compiled": (False, False, True, True),
            "rabit": (True, False, True, False), "rabit-compiled": (True, False, True, True),
            "rabit-checked": (True, True, True, False), "rabit-fp16-dwhat": (True, False, False, False)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--variants", default="fp,rabit,rabit-checked,rabit-fp16-dwhat",
                    help=f"comma-separated, from {', '.join(VARIANTS)} (default %(default)s)")
    ap.add_argument("--profile", default=None, metavar="VARIANT",
                    help="also profile 3 steps of this RaBiT variant (rabit or rabit-compiled) with torch.profiler")
    ap.add_argument("--tag", default=None, help="appended to the JSON's file name")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    bad = [v for v in variants + ([args.profile] if args.profile else []) if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
    if args.profile and not VARIANTS[args.profile][0]:
        ap.error("--profile takes a RaBiT variant (rabit, rabit-compiled)")
    dev = torch.device("cuda")
    teacher = smollm2_shaped(dev)
    for p in teacher.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, 49152, (4 * args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))

    fp = copy.deepcopy(teacher)
    for name, m in fp.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            m.is_rabit_latent = True  # the 2-D weights go to Muon, as RaBiTLinear's latents do
    for p in fp.parameters():
        p.requires_grad_(True)
    student = copy.deepcopy(teacher)
    for p in student.parameters():
        p.requires_grad_(True)
    rabit.quantize_(student, rabit.RabitConfig(k=2, init_iters=0), progress=False)
    res = {}
    try:
        for name in variants:
            is_rabit, checked, f32_dwhat, compiled = VARIANTS[name]
            rabit_ops.FLOAT32_DWHAT = f32_dwhat
            torch.cuda.reset_peak_memory_stats()
            res[name] = run(student if is_rabit else fp, teacher, ids, args.steps, args.batch, checked, compiled)
            print(f"{name:>16}: {res[name]['tokens_per_s']:>9,.0f} tok/s  {res[name]['ms_per_step']:7.1f} ms/step  "
                  f"peak {res[name]['peak_memory_bytes'] / 2**30:5.2f} GiB  first step "
                  f"{res[name]['first_step_s']:.1f} s", flush=True)
    finally:  # the module-wide switch goes back to its default even when a variant fails (the profile runs after)
        rabit_ops.FLOAT32_DWHAT = True
    for name, r in res.items():
        for base in ("fp", "fp-compiled"):
            if base in res and name != base:
                r[f"step_time_vs_{base}"] = res[base]["tokens_per_s"] / r["tokens_per_s"]
        ratios = "  ".join(f"{k.removeprefix('step_time_vs_')} {v:.2f}x" for k, v in r.items()
                           if k.startswith("step_time_vs_"))
        if ratios:
            print(f"{name:>16}: step time vs {ratios}", flush=True)
    if args.profile:
        key = f"profile_{args.profile}"
        res[key] = profile(student, teacher, ids, args.batch, compiled=VARIANTS[args.profile][3])
        for k, ms, n in res[key]["cuda_top"][:15]:
            print(f"  cuda {ms:8.2f} ms/step {n:6d}x  {k[:90]}")
        for k, ms, n in res[key]["cpu_self_top"][:15]:
            print(f"  cpu  {ms:8.2f} ms/step {n:6d}x  {k[:90]}")

    gpu = torch.cuda.get_device_name()
    doc = {"device": gpu, "torch": torch.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "model": "SmolLM2-135M shapes, random weights", "batch": args.batch, "seq_len": args.seq_len,
           "steps": args.steps, "results": res}
    tag = f"_{args.tag}" if args.tag else ""
    write_result(doc, args.out, f"bench_train_{device_tag(gpu)}_{datetime.date.today()}_batch{args.batch}{tag}.json")


if __name__ == "__main__":
    main()
