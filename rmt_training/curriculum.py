"""Curriculum learning for RMT with `Trainer`: documents get more segments as training goes on.

A `Curriculum` holds the stages (segments per document) and the current one; the training and
validation datasets read it on every sample, and `CurriculumCallback` moves it on when the validation
metric reaches a target or stops improving (or on a fixed schedule of steps). Its position is saved in
every checkpoint (`curriculum.json`) so a resumed run continues at the same stage.

As in the 1M-token report, a stage ended by the metric starts the next one from the best validated weights of
the stage (`stage_start="best"`), not from its last: the callback keeps a copy of those weights, and each
checkpoint saved after them holds it (`stage_best.safetensors`) so that a resumed run keeps it too.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .decoder import ANSWER_RESERVE, decoder_item
from .tasks import TASKS, TokenizedNoise, make_sample, with_special_tokens

CURRICULUM_FILE = "curriculum.json"
STAGE_BEST_FILE = "stage_best.safetensors"  # in a checkpoint saved after its stage's best weights
STAGE_STARTS = ("best", "last")
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
        stage_start: a stage ended by the metric hands the next one its best validated weights ("best", the
            report's recipe) or its last ("last"); a stage ended by `every_steps` hands on its last.
    """

    stages: list[int]
    advance_at: float = 0.99
    patience: int = 3
    min_delta: float = 0.005
    every_steps: int | None = None
    stage_start: str = "best"
    stage: int = 0
    best: float = -math.inf
    best_step: int | None = None  # the step of `best` (None: not yet measured, or recorded by older code)
    evaluations_without_gain: int = 0
    stage_started_at: int = 0
    history: list[dict] = field(default_factory=list)
    ended: dict | None = None  # the last stage's end, as a history entry: the curriculum is done

    def __post_init__(self) -> None:
        if not self.stages or any(s < 1 for s in self.stages) or sorted(self.stages) != list(self.stages):
            raise ValueError(f"Curriculum stages must be increasing segment counts >= 1, got {self.stages}.")
        if self.stage_start not in STAGE_STARTS:
            raise ValueError(f"stage_start must be one of {STAGE_STARTS}, got {self.stage_start!r}.")

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
        self._next_stage(self._stage_end(step, reason))

    def _stage_end(self, step: int, reason: str) -> dict:
        return {"step": step, "segments": self.num_segments, "best": self.best, "best_step": self.best_step,
                "reason": reason}  # fmt: skip

    def _next_stage(self, ended: dict) -> None:
        """Record the current stage's end in the history and start the next stage."""
        self.history.append(ended)
        self.stage, self.stage_started_at = self.stage + 1, ended["step"]
        self.best, self.best_step, self.evaluations_without_gain = -math.inf, None, 0

    def extend(self, stages: list[int]) -> None:
        """Go on to more stages after these (`stages` starts with them): a last stage that ended moves on."""
        self.stages = list(stages)
        if self.ended is not None:
            ended, self.ended = self.ended, None
            self._next_stage(ended)

    def observe(self, metric: float, step: int) -> bool:
        """Record a validation result; return whether the stage moved on. The last stage does not move on: it
        ends (`ended`) where another stage would have."""
        if metric > self.best:
            self.best_step = step
        if metric >= self.best + self.min_delta:
            self.best, self.evaluations_without_gain = metric, 0
        else:
            self.best = max(self.best, metric)
            self.evaluations_without_gain += 1
        reached = metric >= self.advance_at
        plateau = self.evaluations_without_gain >= self.patience and not self.every_steps
        if (self.every_steps and not self.finished) or not (reached or plateau):
            return False
        reason = f"reached {metric:.4f}" if reached else f"plateau at {self.best:.4f}"
        if self.finished:
            if self.ended is None:
                self.ended = self._stage_end(step, reason)
            return False
        self.advance(step, reason)
        return True

    def save(self, folder: str | Path) -> None:
        (Path(folder) / CURRICULUM_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, folder: str | Path, **unsaved: object) -> Curriculum:
        """The curriculum saved in `folder`; `unsaved` gives fields that older code did not save."""
        return cls(**(unsaved | json.loads((Path(folder) / CURRICULUM_FILE).read_text())))


class CurriculumCallback(TrainerCallback):
    """Moves a `Curriculum` on from validation results (or a step schedule) and saves it with each
    checkpoint; with `stop_when_done`, stops training once the last stage ends (reaches `advance_at`, or
    plateaus), with that stage's best weights where `stage_start="best"`, so the run's final model is its best.

    With `stage_start="best"` it keeps a CPU copy of the stage's best validated weights and loads them
    into the model when the metric ends the stage; `resumed_from` is the checkpoint a resumed run starts
    from, whose `stage_best.safetensors` (or own weights, when they are the best) it takes that copy from."""

    def __init__(
        self,
        curriculum: Curriculum,
        metric: str = "eval_accuracy",
        stop_when_done: bool = True,
        resumed_from: str | Path | None = None,
    ) -> None:
        self.curriculum, self.metric, self.stop_when_done = curriculum, metric, stop_when_done
        self.resumed_from = Path(resumed_from) if resumed_from else None
        self.best_weights: dict[str, torch.Tensor] | None = None  # the weights of `curriculum.best_step`

    @property
    def keeps_best(self) -> bool:
        """Whether the current stage's best weights are kept: to hand on when validation ends the stage (a stage
        ended by `every_steps` hands on its last)."""
        plan = self.curriculum
        return plan.stage_start == "best" and (not plan.every_steps or plan.finished)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kw):
        plan, checkpoint = self.curriculum, self.resumed_from
        if not self.keeps_best or checkpoint is None or plan.best_step is None:
            return control
        if (checkpoint / STAGE_BEST_FILE).is_file():
            self.best_weights = load_file(checkpoint / STAGE_BEST_FILE)
        elif plan.best_step == int(checkpoint.name.split("-")[-1]):  # the checkpoint's own weights are the best
            self.best_weights = _cpu_copy(model)
        return control

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        plan = self.curriculum
        if plan.every_steps and not plan.finished and state.global_step - plan.stage_started_at >= plan.every_steps:
            plan.advance(state.global_step, f"schedule ({plan.every_steps} steps)")
            plan.history[-1]["weights_from_step"] = state.global_step
            control.should_evaluate = True
        return control

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, metrics=None, **kw):
        if metrics is None or self.metric not in metrics:
            return control
        plan, step = self.curriculum, state.global_step
        value = float(metrics[self.metric])
        was = plan.num_segments
        if plan.observe(value, step):
            plan.history[-1]["weights_from_step"] = self._hand_on_weights(kw.get("model"), plan.history[-1], step)
            self.best_weights = None
            state.log_history.append({"step": step, "curriculum_segments": plan.num_segments})
            print(f"curriculum: {was} -> {plan.num_segments} segments at step {step}")
            control.should_save = True
            return control
        if self.keeps_best and plan.best_step == step:
            self.best_weights = _cpu_copy(kw.get("model"))
        if self.stop_when_done and plan.ended is not None and plan.ended["step"] == step:
            plan.ended["weights_from_step"] = self._hand_on_weights(kw.get("model"), plan.ended, step)
            self.best_weights = None  # now the model's own
            print(f"curriculum: done at step {step} ({plan.ended['reason']})")
            control.should_save = control.should_training_stop = True
        return control

    def _hand_on_weights(self, model: torch.nn.Module | None, ended: dict, step: int) -> int:
        """Put the best weights of the stage that `ended` (its history entry) into `model` where asked and kept;
        return the step they are from."""
        best_step = ended["best_step"]
        if self.curriculum.stage_start != "best" or best_step in (None, step):
            return step
        if self.best_weights is None:
            print(f"curriculum: the best weights of this stage (step {best_step}) were not kept (a checkpoint of "
                  f"older code); going on with the weights of step {step}")  # fmt: skip
            return step
        unexpected = model.load_state_dict(self.best_weights, strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"The stage's best weights name {unexpected[:3]}, which this model lacks.")
        print(f"curriculum: going on with the best weights of this stage, step {best_step}")
        return best_step

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                if self.best_weights is not None and self.curriculum.best_step != state.global_step:
                    save_file(self.best_weights, folder / STAGE_BEST_FILE, metadata={"format": "pt"})
                self.curriculum.save(folder)  # last: its presence marks a complete checkpoint
        return control


def _cpu_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights training changes (those that need gradients: a LoRA run's adapter, not its frozen base)."""
    return {name: tensor.detach().to("cpu", copy=True).contiguous()
            for name, tensor in model.named_parameters() if tensor.requires_grad}  # fmt: skip


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
