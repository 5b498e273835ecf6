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
    fp = [r["fp"]["tokens_per_s"] for _, r in rows]
    rb = [r["rabit"]["tokens_per_s"] for _, r in rows]
    kinds = sorted({f"{d['fp_dtype'].removeprefix('torch.')} {d['device_type'].upper()}" for d in docs})  # e.g. float16 CUDA
    # results with a rabit_single variant (one launch per linear, bench_decode --variants) get a third bar
    single = any("rabit_single" in r for _, r in rows)
    w = 0.27 if single else 0.4
    ax.bar([x - w / (1 if single else 2) for x in xs], fp, width=w, label=f"FP ({' / '.join(kinds)})")
    rx = [x if single else x + w / 2 for x in xs]
    ax.bar(rx, rb, width=w, label="rabit packed (K=2)" + (", q/k/v and gate/up grouped" if single else ""))
    if single:
        ax.bar([x + w for x in xs], [r.get("rabit_single", {}).get("tokens_per_s", 0) for _, r in rows], width=w,
               label="rabit, one launch per linear")
    for x, (_, r) in zip(rx, rows):
        ax.text(x, r["rabit"]["tokens_per_s"], f"{r['speedup']:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{r['model']}\n{d['device'].split(' x')[0][:12]}\nB={r['batch']}" for d, r in rows], fontsize=7)
    ax.set_yscale("log")
    # bars on a log axis start at its bottom: a power of ten below the smallest keeps their lengths comparable
    ax.set_ylim(bottom=10 ** math.floor(math.log10(min(fp + rb))))  # (a missing third bar is 0: below the axis)
    ax.set_ylabel("tokens/s (greedy decode)")
    ax.legend(fontsize=8)
    ax.set_title("End-to-end decoding, same static-cache runtime for both (bench_decode.py)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
