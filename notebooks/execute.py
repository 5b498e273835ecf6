"""Execute a notebook in this Python process and write its outputs back into the .ipynb.

    python notebooks/execute.py notebooks/02_smollm2_rabit.ipynb

For machines without a Jupyter kernel (the lent GPU machine has no ipykernel and no network): the code
cells run in order in one namespace, as a kernel would run them; stdout/stderr become stream outputs,
the value of a cell's last expression an execute_result, and each figure shown with plt.show() a PNG
display_data. The first failing cell is recorded with its traceback and the script exits with status 1.
Where Jupyter is installed, `jupyter nbconvert --execute` or nbclient (as tests/test_notebooks.py does for
01_quickstart) is the usual way.
"""

from __future__ import annotations

import argparse
import ast
import base64
import contextlib
import io
import json
import sys
import time
import traceback
from pathlib import Path


def _figures_to_outputs(plt):
    outs = []
    for num in plt.get_fignums():
        buf = io.BytesIO()
        plt.figure(num).savefig(buf, format="png", bbox_inches="tight", dpi=90)
        outs.append({"output_type": "display_data", "metadata": {},
                     "data": {"image/png": base64.b64encode(buf.getvalue()).decode(), "text/plain": "<Figure>"}})
    plt.close("all")
    return outs


def run(path: Path) -> int:
    nb = json.loads(path.read_text())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pending: list[dict] = []
    plt.show = lambda *a, **k: pending.extend(_figures_to_outputs(plt))  # noqa: E731
    ns: dict = {"__name__": "__main__"}
    count, status = 0, 0
    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        count += 1
        src = "".join(cell["source"])
        out, err = io.StringIO(), io.StringIO()
        outputs: list[dict] = []
        result = None
        t0 = time.time()
        try:
            tree = ast.parse(src)
            # like IPython: the last expression is the cell's result, unless the cell ends with ';'
            show = not src.rstrip().endswith(";")
            last = tree.body.pop() if show and tree.body and isinstance(tree.body[-1], ast.Expr) else None
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                exec(compile(tree, f"<cell {count}>", "exec"), ns)
                if last is not None:
                    result = eval(compile(ast.Expression(last.value), f"<cell {count}>", "eval"), ns)
            failed = None
        except (Exception, SystemExit, KeyboardInterrupt) as e:  # recorded in the notebook like a kernel error
            failed = e
        for name, buf in (("stdout", out), ("stderr", err)):
            if buf.getvalue():
                outputs.append({"output_type": "stream", "name": name, "text": buf.getvalue()})
        outputs.extend(pending)
        pending.clear()
        outputs.extend(_figures_to_outputs(plt))
        if result is not None and failed is None:
            outputs.append({"output_type": "execute_result", "execution_count": count, "metadata": {},
                            "data": {"text/plain": repr(result)}})
        if failed is not None:
            tb = traceback.format_exception(type(failed), failed, failed.__traceback__)
            outputs.append({"output_type": "error", "ename": type(failed).__name__, "evalue": str(failed),
                            "traceback": tb})
        cell["outputs"], cell["execution_count"] = outputs, count
        print(f"cell {count}: {time.time() - t0:.1f} s{' FAILED' if failed else ''}", flush=True)
        if failed is not None:
            print("".join(tb), file=sys.stderr)
            status = 1
            break
    if status:  # cells after the failure did not run: no stale outputs from an earlier run
        for cell in nb["cells"][index + 1:]:  # index: the failed cell's
            if cell["cell_type"] == "code":
                cell["outputs"], cell["execution_count"] = [], None
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return status


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebook", type=Path)
    sys.exit(run(ap.parse_args().notebook))
