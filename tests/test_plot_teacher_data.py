"""benchmarks/plot_teacher_data.py renders every committed variant comparison (few rows and many) to a PNG."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
pytest.importorskip("matplotlib")
import plot_teacher_data as P  # noqa: E402


def _is_comparison(path: Path) -> bool:
    """A results file in the script's format: rows named by "run", each with the NLL gap by position."""
    data = json.loads(path.read_text())
    rows = data.get("rows") if isinstance(data, dict) else None
    return isinstance(rows, list) and bool(rows) and all(
        isinstance(r, dict) and "run" in r and "nll_gap_to_fp_by_position" in r for r in rows)


COMPARISONS = sorted(p.name for p in (ROOT / "benchmarks" / "results").glob("*.json") if _is_comparison(p))


def test_the_comparisons_are_found():
    # the init sweep (6 rows) and the recipe sweep (15 rows, the legend beside the axes) at least
    assert {"init_sweep_smollm2_h200_20261127_5M.json",
            "recipe_sweep_smollm2_h200_20261127_5M.json"} <= set(COMPARISONS)


@pytest.mark.parametrize("name", COMPARISONS)
def test_each_comparison_plots(name, tmp_path):
    out = tmp_path / "plot.png"
    P.main([str(ROOT / "benchmarks" / "results" / name), str(out), "--title", "test"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
