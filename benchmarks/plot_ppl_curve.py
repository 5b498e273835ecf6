"""Plot WikiText-2 perplexity against training tokens from `rabit train --curve N` results (result.json,
key "ppl_curve"), one line per file, with the FP model's perplexity as a reference line.

    python benchmarks/plot_ppl_curve.py OUT.png RESULT.json... [--fp 22.23]
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("results", nargs="+")
    ap.add_argument("--fp", type=float, default=None, help="the FP model's perplexity (dashed line)")
    ap.add_argument("--labels", nargs="*", default=None, help="one legend label per result (default: the method)")
    args = ap.parse_args(argv)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    title = None
    labels = args.labels or [None] * len(args.results)
    if len(labels) != len(args.results):
        raise SystemExit("--labels: give one label per result file")
    for f, label in zip(args.results, labels):
        res = json.loads(Path(f).read_text())
        curve = res.get("ppl_curve") or []
        if not curve:
            raise SystemExit(f"{f}: no ppl_curve (run rabit train with --curve N)")
        key = next(k for k in curve[0] if k.startswith("wikitext2_ppl_"))
        pts = [(c["tokens"] / 1e6, c[key]) for c in curve if c["tokens"] > 0]  # the init (tokens 0) is off-scale
        ax.plot(*zip(*pts), marker="o", label=f"{label or res['method']} (init: {curve[0][key]:.3g})")
        title = f"{res['model']}, {res['device']}, ctx {key.rsplit('_', 1)[1]}"
    if args.fp:
        ax.axhline(args.fp, color="k", ls="--", lw=1, label=f"FP {args.fp:g}")
        ax.axhline(1.5 * args.fp, color="gray", ls=":", lw=1, label=f"target 1.5x FP = {1.5 * args.fp:.3g}")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    # beside the axes, not over them: with five or more curves a legend inside covers points
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.set_size_inches(9.0, 4.0)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
