"""`model_cards.measure_inference` builds documents without an answer from the task builders and measures what
the committed classifier answers on them."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from model_cards.measure_inference import (
    NO_ANSWER_SEED,
    absent_name,
    load,
    measure_no_answer,
    no_answer_prompts,
    stored_dtypes,
    without_facts,
)
from rmt_tools.backbones import minilm_path
from rmt_training.tasks import NAMES, TokenizedNoise, make_sample

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(minilm_path()))


def test_without_facts_takes_out_every_fact_and_keeps_the_noise(tokenizer):
    noise = TokenizedNoise(tokenizer, "milton")
    for index in range(10):
        sample = make_sample("qa1", noise, tokenizer, 300, NO_ANSWER_SEED, index)
        text = without_facts(sample)
        assert not any(name in text for name in NAMES)  # the noise never names them; the facts always do
        assert len(text) == len(sample.input) - sum(len(fact) + 1 for fact in sample.facts)
        name = absent_name(sample)
        assert name is None or not any(name in fact for fact in sample.facts)


def test_no_answer_prompts_hold_no_fact_or_ask_about_someone_absent(tokenizer):
    for prompt, answered, places in no_answer_prompts("detect_memorize", "no_fact", tokenizer, 200, 5):
        assert prompt.endswith("?") and answered.endswith("?") and len(places) == 1
        assert sum(name in prompt for name in NAMES) == 1  # only the question names someone
    for prompt, answered, _ in no_answer_prompts("qa1", "other_person", tokenizer, 200, 5):
        asked = prompt.rsplit("Where is ", 1)[1].rstrip("?")
        assert prompt.count(asked) == 1 and prompt.rsplit(" Where is", 1)[0] == answered.rsplit(" Where is", 1)[0]


def test_the_classifier_answers_documents_without_the_fact_and_the_weights_are_float16():
    assert stored_dtypes(CHECKPOINTS / "rmt-minilm") == ["float16"]
    model, tokenizer = load(CHECKPOINTS / "rmt-minilm", "float32")
    cell = measure_no_answer(model, tokenizer, "detect_memorize", "no_fact", 115, 4)
    assert (cell["segments"], cell["samples"], cell["dtype"]) == (1, 4, "float32")
    assert sum(cell["answers"].values()) == 4 and set(cell["answers"]) <= set(model.config.id2label.values())
    assert 0 < cell["confidence_min"] <= cell["confidence_mean"] <= cell["confidence_max"] <= 1
    assert 0 < cell["answered_confidence_min"] <= cell["answered_confidence_mean"] <= 1
