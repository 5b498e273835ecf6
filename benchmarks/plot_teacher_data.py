"""Plot a comparison of 5 M-token training variants (benchmarks/results/teacher_data_variants_*.json,
init_sweep_*.json, ...): WikiText-2 perplexity per variant (with its held-out KL to the teacher where every row has
one), and each variant's NLL gap to the FP model by position in the window.

    python benchmarks/plot_teacher_data.py RESULT.json OUT.png [--title WHAT]
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result")
    ap.add_argument("out")
    ap.add_argument("--title", default="how the teacher data is sampled", help="what the runs compare (the title)")
    args = ap.parse_args(argv)
    res = json.loads(Path(args.result).read_text())
    rows = res["rows"]
    names = [r["run"] for r in rows]
    many = len(rows) > 8  # taller, with the position legend beside the axes and 20 distinct colours
    fig, (left, right) = plt.subplots(1, 2, figsize=(13 if many else 11, max(4, 0.32 * len(rows) + 1.5)))
    colors = plt.get_cmap("tab20" if len(rows) > 10 else "tab10").colors
    ppl = [r["wikitext2_ppl_2048"] for r in rows]
    bars = left.barh(names, ppl, color=["C0" if p == min(ppl) else "C7" for p in ppl])
    if all("heldout_kl" in r for r in rows):
        left.bar_label(bars, [f"{r['wikitext2_ppl_2048']:.1f} (held-out KL {r['heldout_kl']:.3f})" for r in rows],
                       padding=3)
    else:
        left.bar_label(bars, fmt="%.1f", padding=3)
    left.axvline(res["fp_wikitext2_ppl_2048"], color="k", ls="--", lw=1)
    left.set_xlim(0, 1.6 * max(ppl))
    left.invert_yaxis()
    # the FP line named in the label: a legend box would cover some bar's label
    left.set_xlabel(f"WikiText-2 PPL, ctx 2048 (lower is better; dashed: FP {res['fp_wikitext2_ppl_2048']:.2f})")
    for i, r in enumerate(rows):
        gap = r["nll_gap_to_fp_by_position"]
        right.plot(range(len(gap)), list(gap.values()), marker="o", label=r["run"], color=colors[i % len(colors)])
    right.set_xticks(range(len(gap)), [k.replace("-", "–") for k in gap])
    right.set_xlabel("positions in the 2,048-token window")
    right.set_ylabel("NLL gap to FP (nats)")
    if many:
        right.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    else:
        right.legend(fontsize=8)
    fig.suptitle(f"RaBiT on SmolLM2-135M, 5 M tokens, seed 0: {args.title} ({res['device']})")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
