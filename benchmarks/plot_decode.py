"""Plot end-to-end decode results of benchmarks/bench_decode.py: tokens/s of FP and rabit per model and batch.

    python benchmarks/plot_decode.py OUT.png RESULT.json [RESULT.json ...]
"""

import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(out: str, paths: list[str]) -> None:
    docs = [json.loads(Path(p).read_text()) for p in paths]
    rows = [(d, r) for d in docs for r in d["results"]]
    fig, ax = plt.subplots(figsize=(1.3 * len(rows) + 2, 3.6))
    xs = range(len(rows))
    kinds = sorted({f"{d['fp_dtype'].removeprefix('torch.')} {d['device_type'].upper()}" for d in docs})  # e.g. float16 CUDA
    labels = {"fp": f"FP ({' / '.join(kinds)})", "fp_single": "FP, one GEMM per linear",
              "rabit": "rabit packed (K=2)", "rabit_single": "rabit, one launch per linear",
              "rabit_unfused_glue": "rabit, norms / SwiGLU / residual unfused",
              "rabit_int8": "rabit, int8 activations (opt-in, ~1e-2 error)"}
    # one bar per variant the results have (bench_decode --variants); grouped q/k/v and gate/up where a -single
    # variant is beside it
    variants = [v for v in labels if any(v in r for _, r in rows)]
    if "fp_single" in variants:
        labels["fp"] += ", q/k/v and gate/up stacked"
    if "rabit_single" in variants:
        labels["rabit"] += ", grouped"
    w = 0.8 / len(variants)
    values = []
    for i, v in enumerate(variants):
        vals = [r[v]["tokens_per_s"] if v in r else 0 for _, r in rows]  # a missing bar is 0: below the axis
        values += [t for t in vals if t > 0]
        off = (i - (len(variants) - 1) / 2) * w
        ax.bar([x + off for x in xs], vals, width=w, label=labels[v])
        if v == "rabit":  # speedup: rabit over FP with the same grouping, where both ran
            for x, (_, r) in zip(xs, rows):
                if "speedup" in r:
                    ax.text(x + off, r["rabit"]["tokens_per_s"], f"{r['speedup']:.2f}x", ha="center",
                            va="bottom", fontsize=8)
        if v == "rabit_int8":  # against the fastest FP variant of its run
            for x, (_, r) in zip(xs, rows):
                if "speedup_rabit_int8_vs_fastest_fp" in r:
                    ax.text(x + off, r["rabit_int8"]["tokens_per_s"], f"{r['speedup_rabit_int8_vs_fastest_fp']:.2f}x",
                            ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{r['model']}\n{d['device'].split(' x')[0][:12]}\nB={r['batch']}" for d, r in rows], fontsize=7)
    ax.set_yscale("log")
    # bars on a log axis start at its bottom: a power of ten below the smallest keeps their lengths comparable
    ax.set_ylim(bottom=10 ** math.floor(math.log10(min(values))))
    ax.set_ylabel("tokens/s (greedy decode)")
    ax.legend(fontsize=8)
    ax.set_title("End-to-end decoding, the same static-cache runtime\nfor both (bench_decode.py)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
