"""Curriculum learning for RMT with `Trainer`: documents get more segments as training goes on.

A `Curriculum` holds the stages (segments per document) and the current one; the training and
validation datasets read it on every sample, and `CurriculumCallback` moves it on when the validation
metric reaches a target or stops improving (or on a fixed schedule of steps). Its position is saved in
every checkpoint (`curriculum.json`) so a resumed run continues at the same stage.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .decoder import ANSWER_RESERVE, decoder_item
from .tasks import TASKS, TokenizedNoise, make_sample, with_special_tokens

CURRICULUM_FILE = "curriculum.json"
# A stage decided after step k trains from step k + 2: the data loader has already built step k + 1's
# batch when step k's evaluation runs, and a run resumed from checkpoint-k must build the same one.
EFFECT_DELAY = 2


@dataclass
class Curriculum:
    """Stages of segments per document and where training stands.

    Args:
        stages: segments per document, in order (e.g. [1, 2, 3, 5, 7]).
        advance_at: move on as soon as the validation metric reaches this value.
        patience: or after this many evaluations without an improvement of at least `min_delta`.
        every_steps: or, when set, every `every_steps` optimizer steps regardless of the metric.
    """

    stages: list[int]
    advance_at: float = 0.99
    patience: int = 3
    min_delta: float = 0.005
    every_steps: int | None = None
    stage: int = 0
    best: float = -math.inf
    evaluations_without_gain: int = 0
    stage_started_at: int = 0
    history: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.stages or any(s < 1 for s in self.stages) or sorted(self.stages) != list(self.stages):
            raise ValueError(f"Curriculum stages must be increasing segment counts >= 1, got {self.stages}.")

    @property
    def num_segments(self) -> int:
        return self.stages[self.stage]

    def segments_at_step(self, step: int) -> int:
        """Segments per document in the training batch of optimizer step `step` (1-based)."""
        started = sum(1 for entry in self.history if entry["step"] + EFFECT_DELAY <= step)
        return self.stages[started]

    @property
    def finished(self) -> bool:
        return self.stage == len(self.stages) - 1

    def advance(self, step: int, reason: str) -> None:
        self.history.append({"step": step, "segments": self.num_segments, "best": self.best, "reason": reason})
        self.stage += 1
        self.best, self.evaluations_without_gain, self.stage_started_at = -math.inf, 0, step

    def observe(self, metric: float, step: int) -> bool:
        """Record a validation result; return whether the stage moved on."""
        if metric >= self.best + self.min_delta:
            self.best, self.evaluations_without_gain = metric, 0
        else:
            self.best = max(self.best, metric)
            self.evaluations_without_gain += 1
        if self.finished or self.every_steps:
            return False
        if metric >= self.advance_at:
            self.advance(step, f"reached {metric:.4f}")
            return True
        if self.evaluations_without_gain >= self.patience:
            self.advance(step, f"plateau at {self.best:.4f}")
            return True
        return False

    def save(self, folder: str | Path) -> None:
        (Path(folder) / CURRICULUM_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> Curriculum:
        return cls(**json.loads((Path(folder) / CURRICULUM_FILE).read_text()))


class CurriculumCallback(TrainerCallback):
    """Moves a `Curriculum` on from validation results (or a step schedule) and saves it with each
    checkpoint; stops training once the last stage reaches `advance_at` when `stop_when_done`."""

    def __init__(self, curriculum: Curriculum, metric: str = "eval_accuracy", stop_when_done: bool = True) -> None:
        self.curriculum, self.metric, self.stop_when_done = curriculum, metric, stop_when_done

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        plan = self.curriculum
        if plan.every_steps and not plan.finished and state.global_step - plan.stage_started_at >= plan.every_steps:
            plan.advance(state.global_step, f"schedule ({plan.every_steps} steps)")
            control.should_evaluate = True
        return control

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, metrics=None, **kw):
        if metrics is None or self.metric not in metrics:
            return control
        value = float(metrics[self.metric])
        was = self.curriculum.num_segments
        if self.curriculum.observe(value, state.global_step):
            state.log_history.append({"step": state.global_step, "curriculum_segments": self.curriculum.num_segments})
            print(f"curriculum: {was} -> {self.curriculum.num_segments} segments at step {state.global_step}")
            control.should_save = True
        elif self.stop_when_done and self.curriculum.finished and value >= self.curriculum.advance_at:
            control.should_training_stop = True
        return control

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                self.curriculum.save(folder)
        return control


class CurriculumTaskDataset(torch.utils.data.Dataset):
    """Memory-task documents of the curriculum's length, built on access from (seed, index):
    `num_segments * segment_size` tokens, tasks taken in turn. Items are encoder inputs with a label
    (`head="classification"`) or decoder inputs with the answer as labels (`head="causal-lm"`).

    With `global_batch` (training) the data must be read in order (`train_sampling_strategy="sequential"`;
    each document is random anyway): item `index` belongs to optimizer step `index // global_batch + 1`
    and has that step's length, so a resumed run builds exactly the batches an uninterrupted one did.
    Without it (validation) documents have the current stage's length."""

    def __init__(
        self,
        tasks: list[str],
        tokenizer,
        noise: TokenizedNoise,
        curriculum: Curriculum,
        segment_size: int,
        size: int,
        seed: int,
        head: str = "classification",
        global_batch: int | None = None,
    ) -> None:
        unknown = [task for task in tasks if task not in TASKS]
        if unknown:
            raise ValueError(f"Unknown tasks {unknown}: use {TASKS}.")
        self.tasks, self.tokenizer, self.noise = list(tasks), tokenizer, noise
        self.curriculum, self.segment_size, self.size, self.seed = curriculum, segment_size, size, seed
        if head not in ("classification", "causal-lm"):
            raise ValueError(f"Unknown head {head!r}: use 'classification' or 'causal-lm'.")
        if head == "causal-lm" and "no_fact" in tasks:
            raise ValueError("no_fact trains a classifier's label unknown; a decoder answers with places only.")
        self.head, self.global_batch = head, global_batch

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, list[int] | int]:
        task = self.tasks[index % len(self.tasks)]
        if self.global_batch:  # training data, read in order: item `index` belongs to one optimizer step
            length = self.curriculum.segments_at_step(index // self.global_batch + 1) * self.segment_size
        else:  # validation: the current stage
            length = self.curriculum.num_segments * self.segment_size
        if self.head == "causal-lm":  # the answer and end token come after the document, in its last segment
            sample = make_sample(task, self.noise, self.tokenizer, length - ANSWER_RESERVE, self.seed, index)
            return decoder_item(self.tokenizer, sample)
        sample = make_sample(task, self.noise, self.tokenizer, length, self.seed, index)
        ids = with_special_tokens(self.tokenizer, sample.input_ids)
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": sample.label}
