"""Callbacks a training run keeps its record with: a stop at a given step, the run clock (time, precision and
learning rate over resumed parts) and the lineage of a run started from another's weights."""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import TrainerCallback, TrainingArguments

from .run_record import LINEAGE_FILE, read_run
from .snapshot import checkpoint_step, lambda_scheduler, set_rates_at


class StopAtStep(TrainerCallback):
    """Save a checkpoint and stop at a given step, as an interrupted run would; rerunning resumes."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_save = control.should_training_stop = True
        return control


class CheckpointRecord(TrainerCallback):
    """A JSON file (`FILE`, from `record()`) written into every checkpoint, and into `final/` by `save`."""

    FILE = ""

    def record(self) -> dict:
        raise NotImplementedError

    def save(self, folder: str | Path) -> None:
        (Path(folder) / self.FILE).write_text(json.dumps(self.record()))

    def on_save(self, args: TrainingArguments, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            self.save(folder)
        return control


class RunClock(CheckpointRecord):
    """Wall-clock time, precision and learning rate of a run over all its resumed parts, kept in each checkpoint
    as `run_time.json`: `seconds` up to that step; `untimed_steps`, the steps done before a resumed part whose
    checkpoint had no clock (a run started by older code); `precision` and `learning_rate`, the parts as
    `{from_step, dtype}` and `{from_step, learning_rate}`.

    A run resumed with a new `--lr` goes on at that rate: the checkpoint's scheduler would otherwise keep
    the old one without a word. The schedule's shape (warm-up, decay) stays; Adam's moments are kept."""

    FILE = "run_time.json"

    def __init__(self, resumed_from: str | None, dtype: str = "float32") -> None:
        saved = Path(resumed_from or "") / self.FILE
        self.resumed_step = checkpoint_step(Path(resumed_from)) if resumed_from else 0
        record = json.loads(saved.read_text()) if resumed_from and saved.is_file() else None
        if record:
            self.seconds, self.untimed_steps = float(record["seconds"]), int(record["untimed_steps"])
        else:
            self.seconds, self.untimed_steps = 0.0, self.resumed_step
        self.precision = [{"from_step": 1, "dtype": dtype}]
        if resumed_from:  # the parts so far (unrecorded by older code), then this one where it differs
            self.precision = list((record or {}).get("precision") or [{"from_step": 1, "dtype": "unrecorded"}])
            if self.precision[-1]["dtype"] != dtype:
                self.precision.append({"from_step": self.resumed_step + 1, "dtype": dtype})
        self.learning_rate: list[dict] = list((record or {}).get("learning_rate", []))
        self.started = time.perf_counter()

    def on_train_begin(self, args: TrainingArguments, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps it
        loaded = float(scheduler.base_lrs[0])  # a resumed checkpoint's rate, else this run's
        if not self.learning_rate:  # a new run, or one whose checkpoint predates this record
            self.learning_rate = [{"from_step": 1, "learning_rate": loaded}]
        if loaded != args.learning_rate:
            what = f"Resuming with --lr {args.learning_rate:g} (the checkpoint ran at {loaded:g}; or resume with that)"
            scheduler = lambda_scheduler(lr_scheduler, what)
            print(f"resuming at learning rate {args.learning_rate:g} (the checkpoint's schedule ran at {loaded:g})")
            scheduler.base_lrs = [args.learning_rate] * len(scheduler.base_lrs)
            for group in optimizer.param_groups:
                group["initial_lr"] = args.learning_rate
            set_rates_at(optimizer, scheduler, state.global_step)
        if self.learning_rate[-1]["learning_rate"] != args.learning_rate:
            self.learning_rate.append({"from_step": self.resumed_step + 1, "learning_rate": args.learning_rate})
        return control

    def record(self) -> dict:
        return {"seconds": round(self.seconds + time.perf_counter() - self.started, 1),
                "untimed_steps": self.untimed_steps, "precision": self.precision,
                "learning_rate": self.learning_rate}  # fmt: skip


class Lineage(CheckpointRecord):
    """The record (`run_record.read_run`) of the run this one started from with `--init-from`, kept in every
    checkpoint and in `final/` as `initialised_from.json`: the card shows both recipes even where the first
    run's folder is gone (a run resumed on another machine from a snapshot)."""

    FILE = LINEAGE_FILE

    def __init__(self, first_run: dict, new_memory: bool | None) -> None:
        self.first_run, self.new_memory = first_run, new_memory

    def record(self) -> dict:
        return self.first_run | {"new_memory": self.new_memory}

    @classmethod
    def for_run(cls, init_from: str | None, last: Path | None, new_memory: bool) -> Lineage | None:
        """The lineage of a new run, or the one its checkpoint `last` kept (`new_memory` None: not recorded)."""
        if not init_from:
            return None
        if last and (last / LINEAGE_FILE).is_file():
            kept = json.loads((last / LINEAGE_FILE).read_text())
            return cls(kept, kept.pop("new_memory", None))
        return cls(read_run(init_from), new_memory)
