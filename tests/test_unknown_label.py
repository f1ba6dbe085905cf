"""Documents that do not answer (task no_fact) and a classifier's 7th label, `unknown`: a model of the six places
gains it with its six logits unchanged, and the training command line goes on from such a model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import encode, random_documents, tiny_rmt_config
from test_training import run_args, tiny_backbone  # noqa: F401 (a fixture)
from transformers import AutoTokenizer

from modeling_rmt import RMTForSequenceClassification
from rmt_training.labels import add_unknown_label, labels_for
from rmt_training.tasks import ID2LABEL, NAMES, TokenizedNoise, make_sample
from rmt_training.train import main as train_main


def test_a_no_fact_document_asks_the_question_over_noise_alone(tiny_backbone):  # noqa: F811
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    noise = TokenizedNoise(tokenizer, "milton")
    samples = [make_sample("no_fact", noise, tokenizer, 60, seed=0, index=i) for i in range(12)]
    assert all(s.facts == [] and s.target == "unknown" and s.label == 6 for s in samples)
    assert all(len(s.input_ids) <= 60 and not any(name in s.input for name in NAMES) for s in samples)
    assert {s.question.split()[-1].rstrip("?") for s in samples} <= set(NAMES)
    assert labels_for(["memorize", "no_fact"])[6] == "unknown" and len(labels_for(["memorize"])) == 6


def test_a_classifier_of_the_six_places_gains_unknown_with_its_six_logits_unchanged(tmp_path):
    config = tiny_rmt_config(num_labels=6)
    config.id2label, config.label2id = dict(ID2LABEL), {label: i for i, label in ID2LABEL.items()}
    torch.manual_seed(0)
    model = RMTForSequenceClassification(config).eval()
    inputs = encode(random_documents([20, 9]))
    with torch.no_grad():
        before = model(**inputs).logits
        add_unknown_label(model)
        after = model(**inputs).logits
    assert after.shape == (2, 7) and torch.equal(after[:, :6], before)
    assert model.config.id2label[6] == "unknown" and model.config.text_config.id2label[6] == "unknown"
    model.save_pretrained(tmp_path / "seven")
    reloaded = RMTForSequenceClassification.from_pretrained(tmp_path / "seven").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, after)
    with pytest.raises(ValueError, match="extends a classifier of"):
        add_unknown_label(reloaded)  # already has it


def test_training_goes_on_from_six_places_to_no_fact_documents(tiny_backbone, tmp_path):  # noqa: F811
    six = train_main(run_args(tiny_backbone, tmp_path / "six", "--max-steps", "2", "--stages", "1",
                              "--tasks", "memorize"))  # fmt: skip
    assert len(json.loads((six / "config.json").read_text())["id2label"]) == 6
    common = ["--output-dir", str(tmp_path / "seven"), "--init-from", str(six), "--segment-size", "24",
              "--num-mem-tokens", "4", "--batch-size", "4", "--eval-size", "8", "--eval-steps", "2", "--save-steps",
              "2", "--logging-steps", "1", "--warmup-steps", "0", "--lr", "1e-3", "--no-progress", "--max-steps", "2",
              "--stages", "1", "--tasks", "memorize", "no_fact"]  # fmt: skip
    start = RMTForSequenceClassification.from_pretrained(six)
    add_unknown_label(start)  # what the run starts from: the six rows as trained, then a new one
    (rows,) = [value for key, value in start.state_dict().items() if key.endswith("classifier.weight")]
    assert torch.equal(rows[:6], RMTForSequenceClassification.from_pretrained(six).state_dict()[
        next(k for k in start.state_dict() if k.endswith("classifier.weight"))])  # fmt: skip
    seven = train_main(common)
    config = json.loads((seven / "config.json").read_text())
    assert config["id2label"]["6"] == "unknown" and len(config["id2label"]) == 7
    trained = RMTForSequenceClassification.from_pretrained(seven).state_dict()
    assert trained[next(k for k in trained if k.endswith("classifier.weight"))].shape[0] == 7
