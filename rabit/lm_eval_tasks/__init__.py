"""Offline lm-eval-harness task configs over the project's local task files.

The YAMLs here copy the prompts and metrics of lm-eval's official tasks (boolq, piqa, hellaswag,
winogrande, arc_easy, arc_challenge, openbookqa, lambada_openai) but read local JSONL files. Their
data paths are placeholders; :func:`prepare_task_dir` writes resolved copies (plus ``utils.py`` and,
for HellaSwag, a JSONL converted from the bz2 text file) into an include directory for
``lm_eval.tasks.TaskManager(include_path=...)``.

Data location: the ``data_dir`` argument, else ``$RABIT_TASK_DATA``, else
``$RABIT_SHARED/data/tasks``, else ``<repo>/../shared/data/tasks``.

HellaSwag note: the local file stores ``activity_label: ctx`` with lm-eval's tag cleaning already
applied, but not lm-eval's ``ctx_b.capitalize()``. The ctx_a / ctx_b boundary is not stored, so it is
reconstructed: when the context's last fragment (after the last ". ", "! " or "? ") starts with a
lowercase letter it is taken as ctx_b and capitalized the way lm-eval does (3,243 of 10,042 items,
the ActivityNet share of the split). A ctx_b that already started with a capital letter is left as is,
where lm-eval would lowercase the rest of it; this is the one known deviation from lm-eval's prompts.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "lambada_openai")
DATA_FILES = {"boolq": "boolq.jsonl", "piqa": "piqa.jsonl", "hellaswag": "hellaswag_val_full.txt.bz2",
              "winogrande": "winogrande.jsonl", "arc_easy": "arc_easy.jsonl", "arc_challenge": "arc_challenge.jsonl",
              "openbookqa": "openbook_qa.jsonl", "lambada_openai": "lambada_openai.jsonl"}
DATA_ENV = "RABIT_TASK_DATA"
CACHE_ENV = "RABIT_CACHE_DIR"
DATA_PLACEHOLDER = "@RABIT_TASK_DATA@"
CACHE_PLACEHOLDER = "@RABIT_TASK_CACHE@"
HELLASWAG_JSONL = "hellaswag.jsonl"
_HERE = Path(__file__).resolve().parent
_VERSION = "1"  # bump when a YAML or the HellaSwag conversion changes, to get a fresh include dir

__all__ = ["DATA_ENV", "TASKS", "hellaswag_items", "prepare_task_dir", "task_data_dir"]


def task_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the task files (see the module docstring for the lookup order)."""
    if data_dir is not None:
        d, src = Path(data_dir), "data_dir"
    elif os.environ.get(DATA_ENV):
        d, src = Path(os.environ[DATA_ENV]), f"${DATA_ENV}"
    elif os.environ.get("RABIT_SHARED"):
        d, src = Path(os.environ["RABIT_SHARED"]) / "data" / "tasks", "$RABIT_SHARED"
    else:
        d, src = _HERE.parent.parent.parent / "shared" / "data" / "tasks", "the default"
    if not d.is_dir():
        raise FileNotFoundError(f"rabit: task data folder {str(d)!r} (from {src}) not found; set ${DATA_ENV} or "
                                "pass task_data= to the folder holding piqa.jsonl, boolq.jsonl, ...")
    return d.resolve()


def _check_tasks(tasks) -> list[str]:
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise ValueError(f"rabit: no tasks given; choose from {', '.join(TASKS)}")
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise ValueError(f"rabit: unknown task(s) {bad}; rabit ships offline configs for {', '.join(TASKS)}")
    return tasks


def _preprocess(text: str) -> str:
    """lm-eval's hellaswag ``preprocess``."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_query(line: str) -> str:
    label, sep, ctx = line.partition(": ")
    cut = max(ctx.rfind(". "), ctx.rfind("! "), ctx.rfind("? "))
    ctx_a, ctx_b = (ctx[:cut + 1], ctx[cut + 2:]) if cut >= 0 else ("", ctx)
    if ctx_b[:1].islower():
        ctx = (ctx_a + " " + ctx_b.capitalize()) if ctx_a else ctx_b.capitalize()
    return _preprocess(label + sep + ctx)


def hellaswag_items(path: str | os.PathLike):
    """Yield ``{"query", "choices", "gold"}`` from llama.cpp's HellaSwag text file (6 lines per item)."""
    with bz2.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"rabit: {path}: {len(lines)} lines is not a multiple of 6 (context, gold, 4 endings); "
                         "the file is truncated or not llama.cpp's hellaswag_val_full.txt")
    for i in range(0, len(lines), 6):
        gold = lines[i + 1].strip()
        if gold not in ("0", "1", "2", "3"):
            raise ValueError(f"rabit: {path}: line {i + 2} should be the gold ending 0-3, got {gold!r}")
        yield {"query": _hellaswag_query(lines[i]), "choices": [_preprocess(e) for e in lines[i + 2:i + 6]],
               "gold": int(gold)}


def _write_if_changed(path: Path, text: str) -> None:
    """Atomic write that leaves an identical file untouched (keeps the datasets cache valid)."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _default_out_dir(data: Path) -> Path:
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rabit")
    key = hashlib.sha1(f"{_VERSION}:{data}".encode()).hexdigest()[:12]
    return root / "lm_eval_tasks" / key


def prepare_task_dir(tasks=TASKS, data_dir: str | os.PathLike | None = None,
                     out_dir: str | os.PathLike | None = None) -> Path:
    """Write resolved task YAMLs for ``tasks`` into an include dir and return it.

    Checks that each task's data file exists (naming the missing file). ``out_dir`` defaults to a
    cache folder keyed by the data folder (``$RABIT_CACHE_DIR`` or ``~/.cache/rabit``), reused across runs.
    """
    tasks = _check_tasks(tasks)
    data = task_data_dir(data_dir)
    for t in tasks:
        if not (data / DATA_FILES[t]).is_file():
            raise FileNotFoundError(f"rabit: task {t!r} needs {str(data / DATA_FILES[t])!r}, which does not exist; "
                                    f"point ${DATA_ENV} (or task_data=) at the folder holding the task files")
    out = Path(out_dir) if out_dir is not None else _default_out_dir(data)
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    _write_if_changed(out / "utils.py", (_HERE / "utils.py").read_text(encoding="utf-8"))
    for t in tasks:
        text = (_HERE / f"{t}.yaml").read_text(encoding="utf-8")
        text = text.replace(DATA_PLACEHOLDER, data.as_posix()).replace(CACHE_PLACEHOLDER, out.as_posix())
        _write_if_changed(out / f"{t}.yaml", text)
    if "hellaswag" in tasks:
        rows = "".join(json.dumps(r) + "\n" for r in hellaswag_items(data / DATA_FILES["hellaswag"]))
        _write_if_changed(out / HELLASWAG_JSONL, rows)
    return out
