"""The local lm-eval task of benchmarks/lm_eval_check.sh loads offline and scores documents like wikitext does.
Needs the optional extra `eval` (lm-eval); skipped without it.  The real check (SmolLM2 and its release through
`lm_eval --model hf ... trust_remote_code=True`) is benchmarks/lm_eval_check.sh, results/lm-eval-smollm2.txt."""

import math
from pathlib import Path

import pytest

TASKS = Path(__file__).resolve().parents[1] / "benchmarks" / "lm_eval_tasks"


def test_local_task_loads_offline(monkeypatch):
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    task = manager.load(["taylormlp_license_ppl"])["tasks"]["taylormlp_license_ppl"]
    docs = list(task.test_docs())
    assert [d["title"] for d in docs] == ["Apache License, Version 2.0", "Creative Commons CC0 1.0 Universal"]
    assert sum(len(d["text"].split()) for d in docs) == 2647
    assert task.doc_to_target(docs[0]) == docs[0]["text"]
    scores = task.process_results(docs[0], [-1000.0])
    assert scores["word_perplexity"] == (-1000.0, len(docs[0]["text"].split()))
    assert math.isclose(math.exp(1000.0 / scores["word_perplexity"][1]), math.exp(1000.0 / 1581))
