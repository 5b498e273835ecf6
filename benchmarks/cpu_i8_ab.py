"""A/B of the CPU packed linear on float32 tables (rabit.packed_linear) against int8 tables (rabit.packed_linear_i8),
the two alternated in one process so that a noisy machine affects both alike; also each one's relative error
against a float64 oracle.

    python benchmarks/cpu_i8_ab.py [--shapes 576x576,1536x576,576x1536,4096x4096,11008x4096] [--M 1]
                                   [--threads 1,2] [--rounds 7] [--out DIR] [--tag TAG]

Per shape, thread count and round: the best of 20 calls of each op (after a warm-up), in alternating order; the row
gives the medians over the rounds and the rounds int8 won. Random K = 2 layers (fp16 scales), x float32 (what the
CPU decoder runs). Writes cpu_i8_ab_<date>[_<tag>].json (timing.write_cpu_result).
"""
import argparse
import statistics
import time

import torch

import rabit
from rabit import reference as R
from timing import write_cpu_result


def best_us(fn, calls=20):
    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="576x576,1536x576,576x1536,4096x4096,11008x4096",
                    help="comma-separated OUTxIN")
    ap.add_argument("--M", type=int, default=1, help="rows of x")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=None)
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    with torch.inference_mode():
        for shape in args.shapes.split(","):
            out, in_features = (int(v) for v in shape.split("x"))
            w = torch.randn(out, in_features)
            g, h = torch.rand(2, out) + 0.5, torch.rand(2, in_features) + 0.5
            _, packed = rabit.residual_binarize(w, g, h)
            g, h = g.half(), h.half()
            layout = rabit.i8_layout(packed, in_features)
            x = torch.randn(args.M, in_features)
            oracle = R.packed_linear(x.double(), packed, g, h, compute_dtype=torch.float64)
            err = {name: ((y.double() - oracle).norm() / oracle.norm()).item() for name, y in
                   (("f32", rabit.packed_linear(x, packed, g, h)), ("i8", rabit.packed_linear_i8(x, layout, g, h)))}
            fns = {"f32": lambda: rabit.packed_linear(x, packed, g, h),
                   "i8": lambda: rabit.packed_linear_i8(x, layout, g, h)}
            for threads in (int(t) for t in args.threads.split(",")):
                torch.set_num_threads(threads)
                for fn in fns.values():
                    best_us(fn, 5)
                times = {name: [] for name in fns}
                for r in range(args.rounds):
                    for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                        times[name].append(best_us(fns[name]))
                med = {name: statistics.median(v) for name, v in times.items()}
                wins = sum(a < b for a, b in zip(times["i8"], times["f32"]))
                row = dict(out=out, in_features=in_features, M=args.M, K=2, threads=threads,
                           f32_us=round(med["f32"], 2), i8_us=round(med["i8"], 2),
                           speedup=round(med["f32"] / med["i8"], 3), i8_won_rounds=f"{wins}/{args.rounds}",
                           rel_err_f32=float(f"{err['f32']:.3g}"), rel_err_i8=float(f"{err['i8']:.3g}"),
                           rounds_us={k: [round(t, 2) for t in v] for k, v in times.items()})
                rows.append(row)
                print(f"{out}x{in_features} M={args.M} threads={threads}: float32 tables {med['f32']:.1f} us, "
                      f"int8 {med['i8']:.1f} us ({row['speedup']:.2f}x, won {wins}/{args.rounds}); rel err "
                      f"{err['f32']:.1e} / {err['i8']:.1e}", flush=True)
    write_cpu_result("cpu_i8_ab", "interleaved best-of-20 per round, median over rounds", rows, args.out, args.tag,
                     kernel=rabit.cpu_kernel())


if __name__ == "__main__":
    main()
