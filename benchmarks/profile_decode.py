"""Where a decode step's time goes, kernel by kernel: FP vs rabit packed in StaticDecoder (CUDA graph, compiled glue).

    python benchmarks/profile_decode.py [--model llama2-7b-shape] [--batch 1] [--steps 8] [--attention fused|unfused]

Profiles `--steps` graph replays of the decode step with torch.profiler (CUPTI records the kernels inside a graph)
and sums, per step, the GPU time of each kind of kernel (the packed GEMV prologue and main kernels, cuBLAS, the
attention, the torch.compile glue, ...) and the idle time between consecutive kernels (launch latency and
dependencies: the part of a step no kernel is running). bench_decode.py times the parts with separate graphs; this
shows them in the step itself. Writes profile_decode_<model>_<device>_<date>[_<tag>].json (--out, else $OUT, else
benchmarks/results/) and prints the table.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode import load, pack_random_  # noqa: E402
from rabit.static_decode import StaticDecoder  # noqa: E402
from timing import device_tag, write_result  # noqa: E402

# kernel name fragment -> kind, first match wins
KINDS = [
    ("prep_kernel", "packed GEMV prologue"),
    ("gemv_", "packed GEMV main"),
    ("decode_attention", "attention (rabit.decode_attention)"),
    ("fmha", "attention (SDPA)"), ("flash", "attention (SDPA)"), ("attention", "attention (SDPA)"),
    ("softmax", "attention (SDPA)"),
    ("triton", "glue (torch.compile)"),
    ("splitkreduce", "cuBLAS / GEMM"), ("gemv", "cuBLAS / GEMM"), ("gemm", "cuBLAS / GEMM"), ("sm90_xmma", "cuBLAS / GEMM"), ("cutlass", "cuBLAS / GEMM"),
    ("nvjet", "cuBLAS / GEMM"),
    ("index", "indexing, copies, argmax"), ("copy", "indexing, copies, argmax"), ("arg", "indexing, copies, argmax"),
    ("reduce", "indexing, copies, argmax"), ("elementwise", "other elementwise"),
]


def kind(name: str) -> str:
    low = name.lower()
    for frag, k in KINDS:
        if frag in low:
            return k
    return "other"


def profile(dec: StaticDecoder, steps: int) -> dict:
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        dec.decode(steps)
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    ev = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memset") and "dur" in e), key=lambda e: e["ts"])
    if not ev:
        raise RuntimeError("profile_decode: the profiler recorded no kernels (CUPTI unavailable?)")
    per_kind = collections.defaultdict(float)
    count = collections.Counter()
    names = collections.defaultdict(float)
    idle, end = 0.0, ev[0]["ts"]
    for e in ev:
        k = "memset" if e["cat"] == "gpu_memset" else kind(e["name"])
        per_kind[k] += e["dur"]
        count[k] += 1
        names[e["name"][:90]] += e["dur"]
        idle += max(0.0, e["ts"] - end)
        end = max(end, e["ts"] + e["dur"])
    span = end - ev[0]["ts"]
    return {
        "us_per_step": round(span / steps, 1),
        "busy_us_per_step": {k: round(v / steps, 1) for k, v in sorted(per_kind.items(), key=lambda kv: -kv[1])},
        "kernels_per_step": {k: count[k] / steps for k in per_kind},
        "idle_us_per_step": round(idle / steps, 1),
        "top_kernels_us_per_step": {n: round(v / steps, 1) for n, v in
                                    sorted(names.items(), key=lambda kv: -kv[1])[:25]},
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama2-7b-shape")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--attention", choices=["fused", "unfused"], default="fused")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    model, weights = load(args.model, dev, torch.float16)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt),
                        generator=torch.Generator().manual_seed(1))
    fused = None if args.attention == "fused" else False
    rows = {}
    # rabit: StaticDecoder's default (the glue fused into the packed kernels where they take it); rabit-unfused-glue:
    # the norms, SwiGLU and residual adds as compiled kernels of their own (fused_glue=False)
    for side in ("fp", "rabit", "rabit-unfused-glue"):
        if side == "rabit":
            model = pack_random_(model)
            torch.cuda.empty_cache()
        dec = StaticDecoder(model, batch_size=args.batch, max_len=args.prompt + 2 * args.steps + 8, compile=True,
                            fused_attention=fused, fused_glue=False if side == "rabit-unfused-glue" else None)
        if side == "rabit-unfused-glue" and not rows["rabit"]["fused_glue"]:
            break  # the default did not fuse: the same decoder again
        dec.prefill(ids)
        dec.decode(4)  # capture and warm up
        rows[side] = profile(dec, args.steps)
        rows[side]["fused_glue"] = dec.fused_glue
        print(f"\n{side}: {rows[side]['us_per_step']} us/step, idle {rows[side]['idle_us_per_step']} us")
        for k, v in rows[side]["busy_us_per_step"].items():
            print(f"  {k:40s} {v:9.1f} us  ({rows[side]['kernels_per_step'][k]:.0f} kernels)")
        del dec
    doc = {"benchmark": "profile_decode", "device": torch.cuda.get_device_name(dev), "model": args.model,
           "weights": weights, "batch": args.batch, "prompt_tokens": args.prompt, "steps": args.steps,
           "attention": args.attention,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "versions": {"torch": torch.__version__, "cuda": torch.version.cuda},
           "command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])), "results": rows}
    suffix = f"_{args.tag}" if args.tag else ""
    write_result(doc, args.out, f"profile_decode_{args.model}_{device_tag(doc['device'])}_"
                                f"{datetime.date.today().isoformat()}{suffix}.json")


if __name__ == "__main__":
    main()
