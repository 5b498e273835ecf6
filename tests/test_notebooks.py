"""The CPU quickstart notebook runs top to bottom (nbclient), as a user would run it."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def test_quickstart_notebook_executes(tmp_path):
    nb = nbformat.read(NOTEBOOKS / "01_quickstart.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "reloaded logits identical: True" in outputs
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors


def test_gpu_notebooks_are_committed_executed():
    """02 (GPU) and 03 are committed with the outputs of a real run: every code cell ran, none failed."""
    for name in ("02_smollm2_rabit.ipynb", "03_path_correlation.ipynb"):
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and all(c.get("execution_count") for c in code), name
        assert all(o.output_type != "error" for c in code for o in c.get("outputs", [])), name
    text = "".join(o.get("text", "") for c in nbformat.read(NOTEBOOKS / "02_smollm2_rabit.ipynb", as_version=4).cells
                   if c.cell_type == "code" for o in c.get("outputs", []))
    assert "NVIDIA" in text and "reloaded vs in-memory packed logits, max |diff|: 0.0" in text


def test_execute_script_records_outputs_and_stops_at_an_error(tmp_path):
    """notebooks/execute.py (for machines without a Jupyter kernel): streams, results, figures, errors."""
    import subprocess
    import sys

    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("x = 6 * 7\nprint('hello', x)"),
        nbformat.v4.new_code_cell("import matplotlib.pyplot as plt\nplt.plot([1, 2]); plt.show()\nx + 1"),
        nbformat.v4.new_code_cell("x;"),
        nbformat.v4.new_code_cell("raise ValueError('boom')"),
        nbformat.v4.new_code_cell("print('never')"),
    ])
    nb.cells[4].outputs = [nbformat.v4.new_output("stream", text="stale")]  # from an earlier run
    path = tmp_path / "t.ipynb"
    nbformat.write(nb, path)
    r = subprocess.run([sys.executable, str(NOTEBOOKS / "execute.py"), str(path)], capture_output=True, text=True)
    assert r.returncode == 1 and "boom" in r.stderr
    cells = nbformat.read(path, as_version=4).cells
    assert cells[0].outputs[0].text == "hello 42\n"
    kinds = [o.output_type for o in cells[1].outputs]
    assert kinds == ["display_data", "execute_result"] and cells[1].outputs[1].data["text/plain"] == "43"
    assert cells[2].outputs == []  # a trailing ';' hides the result
    assert cells[3].outputs[-1].output_type == "error" and cells[3].outputs[-1].ename == "ValueError"
    assert not cells[4].outputs and cells[4].execution_count is None
