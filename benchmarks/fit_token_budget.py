"""How many training tokens would the RaBiT recipe need for the WikiText-2 target? A power-law fit of the finished runs.

    python benchmarks/fit_token_budget.py [--results benchmarks/results] [--plot docs/token_budget_smollm2.png]
                                          [--json benchmarks/results/token_budget_fit_smollm2.json]

Collects every finished SmolLM2-135M RaBiT run in the result JSONs (any dict with method, config, train_tokens and
wikitext2_ppl) that used one recipe: batch 32, cosine to zero, KL only, float32 teacher samples started at BOS at
temperature 1, whole sequences, the default learning rates; each run's own data (seed and sequence count) as its
command sampled it. Runs of other recipes are left out, so every point differs from the others in its token budget,
its seed or its card only. Fits log(PPL - FP) = a - c log(tokens) by least squares (the excess over the FP model
falling as a power of the tokens, with no floor of its own), and reports c with its standard error and the tokens at
which the fit reaches the target (1.5x FP), for c and c +- 2 standard errors, anchored at the fit's value at the largest
budget. Curve points taken during a run are not used: before the cosine has reached zero they sit above what a run of
that length ends at.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

FP_PPL = 22.23  # SmolLM2-135M (the dequantized Q4_1 reference), WikiText-2 at ctx 2048
RECIPE = {"batch_size": 32, "min_lr_ratio": 0.0, "gamma": 0.0, "data_temperature": 1.0, "data_top_k": None,
          "data_start": "bos", "data_greedy": 0, "data_dtype": "float32", "text": None, "train_seq_len": 0,
          "lr_latent": 1e-3, "lr_scales": 1e-3, "seq_len": 512, "init_iters": 5, "alpha_in": 0.5, "alpha_out": 0.5,
          "latent_init": "pretrained", "ste": "identity", "muon_momentum": 0.95, "weight_decay": 0.0,
          "kl_temperature": 1.0, "train_embeddings": False, "data_prefix": None}
# fields added to the config after the first runs: a run that lacks one ran with the recipe's value (its day's default)
LATER_FIELDS = ("data_start", "data_greedy", "data_dtype", "text", "train_seq_len", "init_iters", "alpha_in",
                "alpha_out", "latent_init", "ste", "muon_momentum", "weight_decay", "kl_temperature",
                "train_embeddings", "data_prefix")


def _runs(obj, source: str, out: list) -> None:
    if isinstance(obj, dict):
        if {"method", "config", "train_tokens", "wikitext2_ppl"} <= obj.keys():
            out.append((source, obj))
        for v in obj.values():
            _runs(v, source, out)
    elif isinstance(obj, list):
        for v in obj:
            _runs(v, source, out)


def recipe_runs(results: Path) -> list[dict]:
    """The finished runs of RECIPE, one per (tokens, seed, PPL) however many files repeat it."""
    found: list = []
    for f in sorted(results.glob("*.json")):
        _runs(json.loads(f.read_text()), f.name, found)
    rows, seen = [], set()
    for source, r in found:
        cfg = r["config"]
        ppl = (r["wikitext2_ppl"].get("2048") or {}).get("ppl")
        # a missing key is the default of the run's day: the fields that came later default to the recipe's values
        same = all(cfg.get(k, RECIPE[k] if k in LATER_FIELDS else object()) == v for k, v in RECIPE.items())
        model = r.get("model") or cfg.get("model", "")  # the variant comparisons' results name it in the config only
        if r["method"] != "rabit" or "smollm2" not in model or ppl is None or not same:
            continue
        key = (r["train_tokens"], cfg["seed"], round(ppl, 3))
        if key not in seen:
            seen.add(key)
            rows.append({"tokens": r["train_tokens"], "seed": cfg["seed"], "ppl": ppl, "device": r.get("device"),
                         "compile": cfg.get("compile", False), "data_seqs": cfg["data_seqs"], "source": source})
    return sorted(rows, key=lambda x: (x["tokens"], x["seed"], x["ppl"]))


def fit(rows: list[dict], target: float) -> dict:
    x = np.log([r["tokens"] for r in rows])
    y = np.log([r["ppl"] - FP_PPL for r in rows])
    a = np.vstack([np.ones_like(x), x]).T
    coef, res, *_ = np.linalg.lstsq(a, y, rcond=None)
    n = len(rows)
    se = float(np.sqrt(res[0] / (n - 2) * np.linalg.inv(a.T @ a)[1, 1]))
    c = -float(coef[1])
    t_max = max(r["tokens"] for r in rows)
    y_max = coef[0] + coef[1] * np.log(t_max)

    def tokens_for(exp: float) -> float | None:
        return float(t_max * np.exp((y_max - np.log(target - FP_PPL)) / exp)) if exp > 0 else None

    return {"exponent": c, "exponent_se": se, "intercept": float(coef[0]), "n_runs": n,
            "fitted_ppl_at_largest_budget": float(FP_PPL + np.exp(y_max)), "largest_budget": t_max,
            "tokens_to_target": {"fit": tokens_for(c), "exponent_plus_2se": tokens_for(c + 2 * se),
                                 "exponent_minus_2se": tokens_for(c - 2 * se)}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--plot", default=None, help="write the runs and the fit as a PNG here")
    ap.add_argument("--json", default=None, help="write the runs and the fit as JSON here")
    args = ap.parse_args(argv)
    rows = recipe_runs(Path(args.results))
    if len(rows) < 3 or len({r["tokens"] for r in rows}) < 2:
        raise SystemExit(f"{args.results}: {len(rows)} runs of the recipe; the fit needs 3 or more at 2 or more budgets")
    target = 1.5 * FP_PPL
    f = fit(rows, target)
    for r in rows:
        print(f"{r['tokens'] / 1e6:6.1f} M tokens  seed {r['seed']}  PPL {r['ppl']:6.2f}  {r['device']}  {r['source']}")
    tt = f["tokens_to_target"]
    fmt = lambda t: f"{t:.2g}" if t else "never"  # noqa: E731
    print(f"excess PPL ~ tokens^-{f['exponent']:.3f} (standard error {f['exponent_se']:.3f}, {f['n_runs']} runs); "
          f"PPL {target:.1f} at {fmt(tt['fit'])} tokens (exponent +2 SE: {fmt(tt['exponent_plus_2se'])}, "
          f"-2 SE: {fmt(tt['exponent_minus_2se'])})")
    if args.json:
        Path(args.json).write_text(json.dumps({"fp_ppl": FP_PPL, "target_ppl": target, "recipe": RECIPE,
                                               "runs": rows, "fit": f}, indent=1) + "\n")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4))
        ax.scatter([r["tokens"] for r in rows], [r["ppl"] for r in rows], label="RaBiT runs (end of schedule)")
        ts = np.geomspace(min(r["tokens"] for r in rows), tt["fit"] or 1e10, 100)
        ax.plot(ts, FP_PPL + np.exp(f["intercept"]) * ts ** -f["exponent"], "C1-",
                label=f"fit: FP + {np.exp(f['intercept']):.3g} x tokens^-{f['exponent']:.2f}")
        ax.axhline(FP_PPL, color="k", ls="--", lw=1, label=f"FP {FP_PPL}")
        ax.axhline(target, color="gray", ls=":", lw=1, label=f"target 1.5x FP = {target:.1f}")
        ax.set_xscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("WikiText-2 PPL (ctx 2048)")
        ax.set_title("SmolLM2-135M, RaBiT 2-bit: PPL against the token budget")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
