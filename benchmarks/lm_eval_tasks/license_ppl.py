"""Local documents for the taylormlp_license_ppl lm-eval task: read from license_texts.jsonl beside this file, so the
task needs no network, no hub and no dataset builder (HF_DATASETS_OFFLINE=1 is fine)."""

import json
from pathlib import Path

DATA = Path(__file__).with_name("license_texts.jsonl")


def load_docs(**_metadata):
    """{"test": Dataset} of {"title", "source", "text"}; lm-eval passes its metadata and model args, ignored here."""
    import datasets

    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def process_results(doc, results):
    (loglikelihood,) = results
    words = len(doc["text"].split())
    nbytes = len(doc["text"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, nbytes),
            "bits_per_byte": (loglikelihood, nbytes)}
