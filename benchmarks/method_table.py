"""The RaBiT results table on one GPU: every method at the same token budget, one shared set of
teacher-sampled training sequences, WikiText-2 PPL at ctx 2048 (and 4096), peak memory, time.

    python benchmarks/method_table.py --model smollm2-135m --tokens 2.5e6 --batch-size 16 --data-seqs 1024 \
        --min-lr-ratio 0.1 --out DIR --methods rabit independent onebit rabit-plain ptq

(the 2.5 M-token table of docs/results.md; without the recipe options every method gets `rabit train`'s defaults)

Each row is also reproducible alone with ``rabit train --model ... --method ... --tokens ... --out`` and the same
recipe options (``--batch-size``, ``--data-seqs``, ``--min-lr-ratio``, ...).
Writes DIR/<method>/result.json and DIR/table.json (device, versions, date, FP reference beside).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from rabit.data import bos_token_id, cached_teacher_data, write_json_atomic
from rabit.evaluate import wikitext2_perplexity
from rabit.experiment import METHODS, add_config_arguments, config_from_args, run_experiment, training_data
from rabit.models import load_model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(ap)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--ctx", type=int, nargs="*", default=[2048, 4096], help="WikiText-2 contexts (none: skip)")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--heldout-seqs", type=int, default=0,
                    help="also score KL / top-1 / PPL against the FP model on this many held-out teacher samples "
                         "(always at temperature 1 from the full vocabulary: the teacher's own distribution)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = config_from_args(args, ppl_ctx=tuple(args.ctx))
    configs = {m: replace(base, method=m) for m in args.methods}  # every method's checks before any work
    teacher, tok = load_model(args.model, device=args.device)
    teacher.eval()
    t0 = time.perf_counter()
    data = training_data(base, teacher, tok, out, args.device, args.progress)
    data_s = time.perf_counter() - t0
    heldout = None
    if args.heldout_seqs:
        heldout = cached_teacher_data(out / "heldout.safetensors", teacher, args.heldout_seqs, base.seq_len,
                                      base.gen_batch, bos_token_id(teacher), model_name=args.model,
                                      seed=base.seed + 1_000_000, device=args.device)
    fp_results = {str(c): wikitext2_perplexity(teacher, tok, ctx=c) for c in args.ctx}
    fp = {c: float(r) for c, r in fp_results.items()}
    fp_by_position = {c: r.nll_by_position for c, r in fp_results.items()}
    print(f"FP: {fp}  (training data {data.shape[0]}x{data.shape[1]} in {data_s:.0f} s)", flush=True)
    del teacher
    rows = {}
    for method in args.methods:
        res = run_experiment(configs[method], out / method, device=args.device, teacher_data=data,
                             progress=args.progress,
                             heldout=heldout)
        rows[method] = {k: res[k] for k in ("wikitext2_ppl", "heldout_vs_teacher", "train_tokens", "steps",
                                            "train_peak_memory_bytes", "time_s", "kernels", "ppl_curve")}
        print(f"{method:>12}: PPL {res['wikitext2_ppl']} held-out {res['heldout_vs_teacher']} "
              f"peak {res['train_peak_memory_bytes']}  "
              f"time {res['time_s']}", flush=True)
        write_json_atomic(out / "table.json", {
            "model": args.model, "fp_ppl": fp, "fp_nll_by_position": fp_by_position, "rows": rows,
            "teacher_data_s": round(data_s, 1),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "versions": {"torch": torch.__version__}, "date": time.strftime("%Y-%m-%d %H:%M"),
            "config": {k: v for k, v in vars(args).items()}})
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
