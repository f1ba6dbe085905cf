"""Fine-tuning with Trainer on a task that only memory can solve."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CLS, SEP, VOCAB, tiny_backbone_config, tiny_classifier
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

SEGMENT, SEGMENTS, MEMORY = 8, 3, 4
KEYS = (3, 4)  # the label is which of these two tokens opens the document


def memory_task(size: int, seed: int, only_last_segment: bool = False) -> Dataset:
    """Documents of 3 segments of random tokens; the label is fixed by the first token alone."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (size,), generator=generator)
    content = torch.randint(5, VOCAB, (size, SEGMENT * SEGMENTS), generator=generator)
    content[:, 0] = torch.tensor(KEYS)[labels]
    if only_last_segment:
        content = content[:, -SEGMENT:]
    ids = torch.cat([torch.full((size, 1), CLS), content, torch.full((size, 1), SEP)], dim=1)
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": labels.tolist()}
    )


def accuracy(prediction) -> dict[str, float]:
    return {"accuracy": float((np.asarray(prediction.predictions).argmax(-1) == prediction.label_ids).mean())}


def training_args(tmp_path, **overrides) -> TrainingArguments:
    values = dict(output_dir=str(tmp_path), per_device_train_batch_size=32, learning_rate=1e-3, num_train_epochs=12,
                  warmup_steps=20, logging_steps=25, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                  disable_tqdm=True)  # fmt: skip
    return TrainingArguments(**{**values, **overrides})


def train_and_evaluate(model, tmp_path, only_last_segment: bool = False) -> tuple[list[float], float]:
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path),
        train_dataset=memory_task(2000, seed=0, only_last_segment=only_last_segment),
        eval_dataset=memory_task(400, seed=1, only_last_segment=only_last_segment),
        compute_metrics=accuracy,
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, trainer.evaluate()["eval_accuracy"]


def test_rmt_learns_what_only_memory_can_carry_and_the_bare_backbone_cannot(tmp_path):
    rmt = tiny_classifier("bert", num_mem_tokens=MEMORY, segment_size=SEGMENT)
    losses, rmt_accuracy = train_and_evaluate(rmt, tmp_path / "rmt")
    assert losses[0] > 0.6 and losses[-1] < 0.2, losses
    assert rmt_accuracy >= 0.9

    torch.manual_seed(0)
    bare = AutoModelForSequenceClassification.from_config(tiny_backbone_config("bert", num_labels=2))
    _, bare_accuracy = train_and_evaluate(bare, tmp_path / "bare", only_last_segment=True)
    assert 0.4 <= bare_accuracy <= 0.6  # chance: the last segment holds no information about the label


@pytest.mark.parametrize("batch_size, accumulation", [(2, 4), (4, 2)])
def test_gradient_accumulation_reports_the_same_loss_scale(tmp_path, batch_size, accumulation):
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    data = memory_task(64, seed=2)

    def first_step_loss(batch: int, steps: int, folder: str) -> float:
        model = tiny_classifier("bert", num_mem_tokens=MEMORY, segment_size=SEGMENT, backbone_overrides=no_dropout)
        args = training_args(tmp_path / folder, per_device_train_batch_size=batch, gradient_accumulation_steps=steps,
                             max_steps=1, logging_steps=1, warmup_steps=0)  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        return next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)

    whole = first_step_loss(8, 1, "whole")
    accumulated = first_step_loss(batch_size, accumulation, "accumulated")
    assert whole == pytest.approx(0.69, abs=0.05)  # the mean cross-entropy of an untrained binary classifier
    assert accumulated == pytest.approx(whole, rel=1e-4)
