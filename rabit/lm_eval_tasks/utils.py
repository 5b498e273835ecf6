"""Prompt functions for rabit's offline lm-eval tasks: each reproduces lm-eval's official prompt from
the local file's fields (/work/shared/data/tasks; formats in shared/README.md)."""

_PASSAGE = "Passage: "


def boolq_text(doc):
    """lm-eval: "{{passage}}\\nQuestion: {{question}}?\\nAnswer:"; local query = "Passage: P\\nQuestion: Q?"."""
    query = doc["query"]
    if not query.startswith(_PASSAGE):
        raise ValueError(f"boolq: expected the query to start with {_PASSAGE!r}: {query[:60]!r}")
    return query[len(_PASSAGE):] + "\nAnswer:"


def piqa_text(doc):
    """lm-eval: "Question: {{goal}}\\nAnswer:"; local query = "Question: <goal>\\n"."""
    return doc["query"] + "Answer:"


def winogrande_text(doc):
    """lm-eval's doc_to_text returns the gold option index (the contexts are the choices)."""
    return int(doc["gold"])


def winogrande_target(doc):
    return doc["continuation"]


def winogrande_choices(doc):
    return list(doc["context_options"])


def _lambada_full(doc):
    return doc["context"] + " " + doc["continuation"]


def lambada_text(doc):
    """lm-eval: "{{text.split(' ')[:-1]|join(' ')}}"."""
    return " ".join(_lambada_full(doc).split(" ")[:-1])


def lambada_target(doc):
    """lm-eval: "{{' '+text.split(' ')[-1]}}"."""
    return " " + _lambada_full(doc).split(" ")[-1]
