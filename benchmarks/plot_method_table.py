"""Plot a method table written by benchmarks/method_table.py: training KL against tokens for every
method, and the final held-out / WikiText numbers.

    python benchmarks/plot_method_table.py RESULT_PREFIX OUT.png
(RESULT_PREFIX: e.g. benchmarks/results/method_table_stories260k_cpu_20261125)
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(prefix: str, out: str) -> None:
    table = json.loads(Path(prefix + ".json").read_text())
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for method in table["rows"]:
        p = Path(f"{prefix}_{method}.json")
        if not p.is_file():
            continue
        res = json.loads(p.read_text())
        tok_per_step = res["train_tokens"] / max(res["steps"], 1)
        hist = res["history"]
        ax[0].plot([h["step"] * tok_per_step / 1e6 for h in hist], [h["kl"] for h in hist], label=method)
    ax[0].set_xlabel("training tokens (M)")
    ax[0].set_ylabel("training KL to FP (nats/token)")
    ax[0].set_yscale("log")
    ax[0].legend()
    names, vals, label = [], [], ""
    for method, row in table["rows"].items():
        if row.get("heldout_vs_teacher"):
            names.append(method)
            vals.append(row["heldout_vs_teacher"]["kl"])
            label = "held-out KL to FP (nats/token)"
        elif row.get("wikitext2_ppl"):
            names.append(method)
            vals.append(row["wikitext2_ppl"]["2048"]["ppl"])
            label = "WikiText-2 PPL @2048"
    ax[1].bar(names, vals)
    ax[1].tick_params(axis="x", labelrotation=30)  # six method names side by side overlap otherwise
    ax[1].set_yscale("log")
    ax[1].set_ylabel(label)
    fig.suptitle(f"{table['model']} on {table['device']}, {table['date']}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
