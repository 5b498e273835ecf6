"""Offline lm-eval-harness: task configs equal lm-eval's official prompts/metrics, the harness runs on a
packed model, data paths are overridable, errors are clear, and the `eval` CLI works."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="lm-eval-harness not installed (pip install lm_eval==0.4.13)")

import yaml  # noqa: E402

import rabit  # noqa: E402
from rabit import export  # noqa: E402
from rabit.cli import main as cli_main  # noqa: E402
from rabit.lm_eval_tasks import TASKS, hellaswag_items, prepare_task_dir, task_data_dir  # noqa: E402
from rabit.lmeval import as_hf_tokenizer, evaluate  # noqa: E402
from rabit.models import load_stories260k  # noqa: E402

LM_EVAL_TASKS = Path(importlib.util.find_spec("lm_eval").origin).parent / "tasks"
OFFICIAL_YAML = {"boolq": "super_glue/boolq/default.yaml", "piqa": "piqa/piqa.yaml",
                 "hellaswag": "hellaswag/hellaswag.yaml", "winogrande": "winogrande/default.yaml",
                 "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_easy.yaml",
                 "openbookqa": "openbookqa/openbookqa.yaml", "lambada_openai": "lambada/lambada_openai.yaml"}

try:
    task_data_dir()
    HAVE_DATA = True
except FileNotFoundError:
    HAVE_DATA = False
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="task data not found (set RABIT_TASK_DATA)")



@pytest.fixture(scope="module")
def stories():
    return load_stories260k()


@pytest.fixture(scope="module")
def packed_export(stories, tmp_path_factory):
    model = copy.deepcopy(stories[0])
    rabit.quantize_(model, rabit.RabitConfig(), progress=False)
    d = tmp_path_factory.mktemp("lmeval") / "stories-rabit"
    export.save_pretrained(rabit.convert_(model), d, tokenizer=stories[1])
    return d


# -- the llama2.c tokenizer adapter ---------------------------------------------------------------


def test_llama2c_adapter_encodes_exactly(stories):
    tok = stories[1]
    hf = as_hf_tokenizer(tok)
    from transformers import PreTrainedTokenizer

    assert isinstance(hf, PreTrainedTokenizer)
    assert len(hf) == hf.vocab_size == 512 and (hf.bos_token_id, hf.eos_token_id) == (1, 2)
    for s in ["Once upon a time", "Question: x?\nAnswer: yes", "naïve café 🙂", "  two  spaces ", ""]:
        assert hf.encode(s) == tok.encode(s)
        assert hf.encode(s, add_special_tokens=False) == tok.encode(s, bos=False)
        assert hf.decode(hf.encode(s), skip_special_tokens=True) == tok.decode(tok.encode(s))
    assert hf.decode([1]) == "<s>"  # lm-eval's BOS-prefix check needs the token's text
    with pytest.raises(TypeError, match="not supported"):
        as_hf_tokenizer(object())


# -- prompts and metrics equal lm-eval's official tasks ------------------------------------------


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


def official_config(task):
    return yaml.load((LM_EVAL_TASKS / OFFICIAL_YAML[task]).read_text(), Loader=_Loader)


@pytest.fixture(scope="module")
def our_tasks():
    if not HAVE_DATA:
        pytest.skip("task data not found (set RABIT_TASK_DATA)")
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(prepare_task_dir(TASKS)), include_defaults=False)
    return tm.load(list(TASKS))["tasks"]


def first_doc(task):
    docs = task.test_docs() if task.has_test_docs() else task.validation_docs()
    return docs[0]


def official_requests(task, doc):
    """(contexts, continuations, gold) lm-eval's official task would score for an official-format ``doc``."""
    from lm_eval.utils import apply_template

    cfg = official_config(task)
    if task == "winogrande":
        from lm_eval.tasks.winogrande import preprocess_winogrande as w

        ctxs = w.doc_to_choice(doc)
        return ctxs, [" " + w.doc_to_target(doc)] * len(ctxs), w.doc_to_text(doc)
    if task == "lambada_openai":
        return [apply_template(cfg["doc_to_text"], doc)], [apply_template(cfg["doc_to_target"], doc)], None
    if task == "hellaswag":
        import datasets
        from lm_eval.tasks.hellaswag.utils import process_docs

        doc = process_docs(datasets.Dataset.from_list([doc]))[0]
    text = doc[cfg["doc_to_text"]] if cfg["doc_to_text"] in doc else apply_template(cfg["doc_to_text"], doc)
    choice = cfg["doc_to_choice"]
    if isinstance(choice, list):
        choices = choice
    elif choice in doc:
        choices = doc[choice]
    else:
        choices = eval(apply_template(choice, doc))  # noqa: S307 - lm-eval's own literal templates
    target = cfg["doc_to_target"]
    gold = doc[target] if target in doc else int(apply_template(target, doc))
    return [text] * len(choices), [" " + c for c in choices], int(gold)


def official_doc(task, local):
    """The official dataset row that the local row was made from (inverse of the documented conversion)."""
    q = local.get("query")
    if task == "piqa":
        return {"goal": q[len("Question: "):-1], "sol1": local["choices"][0], "sol2": local["choices"][1],
                "label": local["gold"]}
    if task == "boolq":
        passage, question = q[len("Passage: "):].rsplit("\nQuestion: ", 1)
        return {"passage": passage, "question": question[:-1], "label": local["gold"]}
    if task in ("arc_easy", "arc_challenge"):
        labels = "ABCDE"[:len(local["choices"])]
        return {"question": q[len("Question: "):], "choices": {"text": local["choices"], "label": list(labels)},
                "answerKey": labels[local["gold"]]}
    if task == "openbookqa":
        labels = "ABCD"
        return {"question_stem": q, "choices": {"text": local["choices"], "label": list(labels)},
                "answerKey": labels[local["gold"]]}
    if task == "lambada_openai":
        return {"text": local["context"] + " " + local["continuation"]}
    raise AssertionError(task)


def our_requests(task_obj, doc):
    ctx = task_obj.doc_to_text(doc)
    delim = task_obj.config.target_delimiter
    if task_obj.OUTPUT_TYPE == "loglikelihood":
        return [ctx], [task_obj.doc_to_target(doc)], None
    choices = task_obj.doc_to_choice(doc)
    if isinstance(ctx, int):  # winogrande: the choices are the contexts
        return choices, [delim + task_obj.doc_to_target(doc)] * len(choices), ctx
    return [ctx] * len(choices), [delim + c for c in choices], task_obj.doc_to_target(doc)


@needs_data
@pytest.mark.parametrize("task", ["piqa", "boolq", "arc_easy", "arc_challenge", "openbookqa", "lambada_openai"])
def test_prompts_equal_official_on_real_rows(our_tasks, task):
    t = our_tasks[task]
    docs = t.test_docs() if t.has_test_docs() else t.validation_docs()
    for i in (0, 1, len(docs) - 1):
        local = docs[i]
        assert our_requests(t, local) == official_requests(task, official_doc(task, local))


def test_winogrande_prompt_equals_official(our_tasks):
    official = {"sentence": "The trophy didn't fit into the suitcase because the _ was too large.",
                "option1": "trophy", "option2": "suitcase", "answer": "1"}
    idx = official["sentence"].index("_")
    local = {"context_options": [official["sentence"][:idx] + official[f"option{i}"] for i in (1, 2)],
             "continuation": official["sentence"][idx + 1:].strip(), "gold": int(official["answer"]) - 1}
    assert our_requests(our_tasks["winogrande"], local) == official_requests("winogrande", official)


@needs_data
def test_hellaswag_prompt_equals_official(our_tasks):
    local = first_doc(our_tasks["hellaswag"])  # converted from the bz2 text file
    official = {"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
                "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                            "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "label": "3"}
    assert our_requests(our_tasks["hellaswag"], local) == official_requests("hellaswag", official)
    assert local["query"] == "Roof shingle removal: A man is sitting on a roof. He"


@pytest.mark.parametrize("task", TASKS)
def test_metrics_and_output_type_equal_official(our_tasks, task):
    cfg = official_config(task)
    ours = our_tasks[task].config
    assert ours.output_type == cfg["output_type"]
    assert [m["metric"] for m in ours.metric_list] == [m["metric"] for m in cfg["metric_list"]]
    assert ours.target_delimiter == cfg.get("target_delimiter", " ")
    assert ours.metadata["version"] == cfg["metadata"]["version"]


@needs_data
def test_hellaswag_conversion():
    items = list(hellaswag_items(task_data_dir() / "hellaswag_val_full.txt.bz2"))
    assert len(items) == 10042
    assert {i["gold"] for i in items} == {0, 1, 2, 3} and all(len(i["choices"]) == 4 for i in items)
    assert all("[" not in i["query"] and "  " not in i["query"] for i in items)


@needs_data
def test_local_row_counts_equal_lm_eval_splits(our_tasks):
    want = {"boolq": 3270, "piqa": 1838, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 2376,
            "arc_challenge": 1172, "openbookqa": 500, "lambada_openai": 5153}
    for task, n in want.items():
        t = our_tasks[task]
        assert len(t.test_docs() if t.has_test_docs() else t.validation_docs()) == n, task


# -- running the harness --------------------------------------------------------------------------


@needs_data
def test_evaluate_all_tasks_on_packed_model(packed_export):
    model, tok = export.load_pretrained(packed_export)
    res = evaluate(model, tok, list(TASKS), limit=3, batch_size=8)
    r = res["results"]
    assert set(r) == set(TASKS)
    assert res["n_samples"] == {t: 3 for t in TASKS}
    for t in TASKS:
        assert 0.0 <= r[t]["acc"] <= 1.0 and "acc_stderr" in r[t]
    for t in ("piqa", "hellaswag", "arc_easy", "arc_challenge", "openbookqa"):
        assert 0.0 <= r[t]["acc_norm"] <= 1.0
    assert r["lambada_openai"]["perplexity"] > 1.0
    assert res["config"]["lm_eval_version"]


def test_task_data_override(tmp_path, monkeypatch, stories):
    rows = [{"query": "Question: How do I open a door?\n", "choices": ["Turn the handle.", "Eat the door."],
             "gold": 0}] * 4
    data = tmp_path / "data"
    data.mkdir()
    (data / "piqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("RABIT_TASK_DATA", str(data))
    assert task_data_dir() == data.resolve()
    res = evaluate(stories[0], stories[1], "piqa", batch_size=4, task_dir=tmp_path / "inc")
    assert res["n_samples"] == {"piqa": 4} and res["results"]["piqa"]["acc"] in (0.0, 1.0)
    assert str(data.resolve()) in (tmp_path / "inc" / "piqa.yaml").read_text()
    monkeypatch.delenv("RABIT_TASK_DATA")
    res = evaluate(stories[0], stories[1], ["piqa"], limit=2, task_data=data, task_dir=tmp_path / "inc2")
    assert res["n_samples"] == {"piqa": 2}


def test_errors_are_clear(tmp_path, stories):
    with pytest.raises(ValueError, match="unknown task"):
        prepare_task_dir(["mmlu"])
    with pytest.raises(FileNotFoundError, match="RABIT_TASK_DATA"):
        prepare_task_dir(["piqa"], data_dir=tmp_path / "nope")
    (tmp_path / "d").mkdir()
    with pytest.raises(FileNotFoundError, match="boolq.jsonl"):
        prepare_task_dir(["boolq"], data_dir=tmp_path / "d")
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(stories[0], stories[1], ["piqa"], batch_size=0)
    with pytest.raises(ValueError, match="limit"):
        evaluate(stories[0], stories[1], ["piqa"], limit=0)


# -- CLI ------------------------------------------------------------------------------------------


@needs_data
def test_cli_eval_tasks_and_ppl(packed_export, tmp_path, capsys):
    wiki = tmp_path / "wiki.test.raw"
    wiki.write_text("Once upon a time there was a little girl.\nShe liked to play in the park with her dog.\n" * 20)
    # lambada_openai: lm-eval prints while it bootstraps the perplexity's stderr; --json's stdout must stay JSON
    argv = ["eval", str(packed_export), "--tasks", "piqa,winogrande,lambada_openai", "--limit", "2", "--ppl", "--ctx",
            "64", "--wikitext", str(wiki), "--quiet", "--json"]
    assert cli_main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "rabit-export"
    assert set(out["lm_eval"]["results"]) == {"piqa", "winogrande", "lambada_openai"}
    assert out["wikitext2"]["ppl"] > 1 and out["wikitext2"]["ctx"] == 64
    assert cli_main(["eval", str(packed_export), "--ppl", "--wikitext", str(tmp_path / "missing.raw")]) == 1
    assert "missing.raw" in capsys.readouterr().err
