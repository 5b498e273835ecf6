"""benchmarks/fit_token_budget.py: the recipe filter and the power-law fit, on synthetic result files."""

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import fit_token_budget as F  # noqa: E402


def _result(tokens, ppl, seed=0, **cfg):
    return {"method": "rabit", "model": "smollm2-135m", "train_tokens": tokens, "device": "test",
            "config": {**F.RECIPE, "seed": seed, "data_seqs": 4096, **cfg}, "wikitext2_ppl": {"2048": {"ppl": ppl}}}


def test_the_fit_recovers_a_power_law_and_skips_other_recipes(tmp_path):
    c, amp = 0.3, 1e3
    runs = [_result(t, F.FP_PPL + amp * t ** -c, seed=i) for i, t in enumerate((2e6, 5e6, 1e7, 4e7))]
    # the same run inside a table file counts once; other recipes and methods are left out
    (tmp_path / "a.json").write_text(json.dumps({"rows": runs}))
    (tmp_path / "b.json").write_text(json.dumps(runs[0]))
    others = [_result(1e7, 40.0, batch_size=16), _result(1e7, 40.0, data_dtype="float16"),
              {**_result(1e7, 40.0), "method": "independent"}]
    (tmp_path / "c.json").write_text(json.dumps(others))
    rows = F.recipe_runs(tmp_path)
    assert [r["tokens"] for r in rows] == [2e6, 5e6, 1e7, 4e7]
    f = F.fit(rows, 1.5 * F.FP_PPL)
    assert math.isclose(f["exponent"], c, rel_tol=1e-9) and f["exponent_se"] < 1e-9
    expected = (amp / (0.5 * F.FP_PPL)) ** (1 / c)  # where FP + amp * t^-c = 1.5 FP
    assert math.isclose(f["tokens_to_target"]["fit"], expected, rel_tol=1e-6)


def test_a_run_from_before_a_config_field_existed_counts_as_its_default(tmp_path):
    old = _result(5e6, 60.0)
    for k in F.LATER_FIELDS:
        del old["config"][k]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert len(F.recipe_runs(tmp_path)) == 1


def test_runs_that_name_the_model_in_their_config_count_and_other_settings_do_not(tmp_path):
    # the variant comparisons' results (init and recipe sweeps) carry the model in their config only
    inner = {k: v for k, v in _result(5e6, 61.0, seed=1, model="smollm2-135m").items() if k != "model"}
    others = [_result(5e6, 50.0, seed=2, train_embeddings=True), _result(5e6, 50.0, seed=3, muon_momentum=0.9),
              _result(5e6, 50.0, seed=4, latent_init="reconstruction"), _result(5e6, 50.0, seed=5, init_iters=1)]
    (tmp_path / "sweep.json").write_text(json.dumps({"rows": [], "results": [inner, *others]}))
    assert [(r["seed"], r["ppl"]) for r in F.recipe_runs(tmp_path)] == [(1, 61.0)]
