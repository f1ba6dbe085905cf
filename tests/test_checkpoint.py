"""The committed trained checkpoints are Hub-ready and small; `checkpoints/rmt-minilm` answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

from conversion.export import HUB_FILES
from rmt_training.tasks import PLACES, TokenizedNoise, make_sample, with_special_tokens

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
CHECKPOINT = CHECKPOINTS / "rmt-minilm"
TEST_SEED = 5_000_011  # documents neither training, validation, the length evaluation nor the demo used
# Every committed checkpoint, with the Auto class its config maps to the remote code.
COMMITTED = {
    "rmt-minilm": ("AutoModelForSequenceClassification", "RMTForSequenceClassification"),
    "rmt-minilm-unknown": ("AutoModelForSequenceClassification", "RMTForSequenceClassification"),
    "rmt-minilm-qa1": ("AutoModelForCausalLM", "RMTForCausalLM"),
    "armt-minilm-qa1": ("AutoModelForCausalLM", "RMTForCausalLM"),
}


@pytest.fixture(scope="module")
def model_and_tokenizer():
    model = AutoModelForSequenceClassification.from_pretrained(CHECKPOINT, trust_remote_code=True, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(CHECKPOINT)


def predictions_on_held_out_documents(model, tokenizer, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted, true) labels of 20 held-out documents of `task` on Milton, 7 segments long (its training length)."""
    noise = TokenizedNoise(tokenizer, "milton")
    samples = [make_sample(task, noise, tokenizer, 7 * model.config.segment_size, TEST_SEED, i) for i in range(20)]
    rows = [with_special_tokens(tokenizer, sample.input_ids) for sample in samples]
    inputs = tokenizer.pad({"input_ids": rows}, return_tensors="pt")
    with torch.no_grad():
        predicted = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.argmax(-1)
    return predicted, torch.tensor([sample.label for sample in samples])


def test_every_checkpoint_folder_is_listed_here():
    assert {folder.name for folder in CHECKPOINTS.iterdir() if folder.is_dir()} == set(COMMITTED)


@pytest.mark.parametrize("name", COMMITTED)
def test_the_folder_is_hub_ready_float16_and_under_60_mb(name):
    folder = CHECKPOINTS / name
    files = {path.name for path in folder.iterdir()}
    assert set(HUB_FILES) | {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= files
    weights = folder / "model.safetensors"
    assert weights.stat().st_size < 60 * 2**20
    with safe_open(weights, "pt") as handle:
        assert {handle.get_tensor(name).dtype for name in handle.keys()} == {torch.float16}
    config = json.loads((folder / "config.json").read_text())
    auto_class, model_class = COMMITTED[name]
    assert config["auto_map"][auto_class] == f"modeling_rmt.{model_class}"
    assert config["architectures"] == [model_class]
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert "local_files_only" not in tokenizer_config and "is_local" not in tokenizer_config  # this machine's


@pytest.mark.parametrize("name", COMMITTED)
def test_its_card_and_card_results_are_the_current_ones(name):
    cards = Path(__file__).resolve().parents[1] / "model_cards"
    assert (CHECKPOINTS / name / "README.md").read_text() == (cards / f"{name}.md").read_text(), "re-export"
    shipped = json.loads((CHECKPOINTS / name / "card_results.json").read_text())
    assert shipped == json.loads((cards / f"{name}.json").read_text()), "re-export: the card's results changed"


@pytest.mark.parametrize("name", COMMITTED)
def test_its_model_code_is_the_current_code(name):
    package = Path(__file__).resolve().parents[1] / "modeling_rmt"
    for file in HUB_FILES:
        assert (CHECKPOINTS / name / file).read_text() == (package / file).read_text(), f"re-export: {file} changed"


def test_the_classifier_names_the_six_places():
    config = json.loads((CHECKPOINT / "config.json").read_text())
    assert [config["id2label"][str(i)] for i in range(6)] == list(PLACES)


@pytest.mark.parametrize("task, least_correct", [("memorize", 19), ("detect_memorize", 17)])
def test_it_answers_held_out_documents_of_its_training_length(model_and_tokenizer, task, least_correct):
    predicted, labels = predictions_on_held_out_documents(*model_and_tokenizer, task)
    assert int((predicted == labels).sum()) >= least_correct  # chance: about 3 of 20


def test_the_text_classification_pipeline_reads_a_long_document_whole():
    classifier = pipeline("text-classification", model=str(CHECKPOINT), trust_remote_code=True, dtype=torch.float32)
    sample = make_sample("memorize", TokenizedNoise(classifier.tokenizer, "milton"), classifier.tokenizer, 3_000,
                         TEST_SEED, 99)  # fmt: skip
    assert classifier(f"{sample.input} {sample.question}")[0]["label"] == sample.target


def test_the_unknown_classifier_answers_unknown_without_a_fact_and_the_place_with_one():
    folder = CHECKPOINTS / "rmt-minilm-unknown"
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.id2label[6] == "unknown" and model.config.num_labels == 7
    for task, least_correct in [("no_fact", 19), ("detect_memorize", 17)]:
        predicted, labels = predictions_on_held_out_documents(model, tokenizer, task)
        assert (labels == 6).all() == (task == "no_fact")
        assert int((predicted == labels).sum()) >= least_correct, task
