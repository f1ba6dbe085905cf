"""Compact training snapshots that a long run can be committed as, and resumed from on another machine.

    python -m rmt_training.snapshot save runs/rmt-minilm-qa1 snapshots/rmt-minilm-qa1
    python -m rmt_training.snapshot restore snapshots/rmt-minilm-qa1 runs/rmt-minilm-qa1
    python -m rmt_training.train ... --output-dir runs/rmt-minilm-qa1   # continues at the snapshot's step

A Trainer checkpoint holds the weights in float32 and the optimizer's two moments: four times the
model in all. A snapshot keeps the weights in float16 (half the model) with the run's state: the
trainer state (step, log history), the curriculum stage and the run clock (and, in float16 too, the
stage's best weights where a checkpoint keeps them apart from its own). The optimizer is not
kept: the resumed run starts fresh Adam moments, continues the learning-rate schedule at the
snapshot's step and warms it up again over the run's `--warmup-steps` (`Rewarm`; checkpoints saved
during the warm-up carry it in `rewarm.json`). So a run resumed from a snapshot is close to, not
equal to, an uninterrupted one; a run resumed from its own Trainer checkpoint is equal.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from .curriculum import STAGE_BEST_FILE

SNAPSHOT_FILE = "snapshot.json"
REWARM_FILE = "rewarm.json"
COMPLETE = ("trainer_state.json", "curriculum.json")  # what a resumable checkpoint holds, beside its weights
STATE_FILES = (
    "config.json",
    "generation_config.json",
    "trainer_state.json",
    "curriculum.json",
    "run_time.json",
    "initialised_from.json",  # a run started --init-from another (run_record.LINEAGE_FILE)
    "tokenizer.json",  # the tokenizer: what a run started --init-from resumes with
    "tokenizer_config.json",
)
WEIGHTS = "model.safetensors"
WEIGHT_FILES = (WEIGHTS, "adapter_model.safetensors")  # a full run's, or a LoRA run's (--lora-r)
HALVED_WEIGHTS = (WEIGHTS, STAGE_BEST_FILE)  # kept in float16: the model, and its stage's best where that differs


def save_snapshot(run_dir: str | Path, snapshot_dir: str | Path) -> Path:
    """Write the newest checkpoint of `run_dir` as a snapshot (replacing an earlier snapshot there)."""
    run_dir, snapshot_dir = Path(run_dir), Path(snapshot_dir)
    checkpoint = last_complete_checkpoint(run_dir)
    if checkpoint is None:
        raise SystemExit(f"{run_dir} has no complete checkpoint-N folder (with {WEIGHTS}, {', '.join(COMPLETE)}) to "
                         "snapshot; train with --save-steps first.")  # fmt: skip
    if not (checkpoint / WEIGHTS).is_file():
        raise SystemExit(f"{checkpoint} is a LoRA run's (an adapter, no {WEIGHTS}): snapshots carry full runs. Copy "
                         "the checkpoint folder itself to resume it elsewhere.")  # fmt: skip
    if snapshot_dir.exists() and not (snapshot_dir / SNAPSHOT_FILE).is_file():
        raise SystemExit(f"{snapshot_dir} exists and is not a snapshot; pick an empty or new folder.")
    _refuse_foreign_files(snapshot_dir)
    step = checkpoint_step(checkpoint)
    with tempfile.TemporaryDirectory(dir=snapshot_dir.parent if snapshot_dir.parent.exists() else None) as tmp:
        staging = Path(tmp) / "snapshot"
        staging.mkdir()
        for name in HALVED_WEIGHTS:
            if (checkpoint / name).is_file():
                weights = load_file(checkpoint / name)
                save_file({key: _to_float16(tensor) for key, tensor in weights.items()}, staging / name,
                          metadata={"format": "pt"})  # fmt: skip
        for name in STATE_FILES:
            if (checkpoint / name).is_file():
                shutil.copy2(checkpoint / name, staging / name)
        record = {"step": step, "source": checkpoint.name, "weights_dtype": "float16", "optimizer": "not kept"}
        (staging / SNAPSHOT_FILE).write_text(json.dumps(record, indent=2) + "\n")
        snapshot_dir.parent.mkdir(parents=True, exist_ok=True)
        if snapshot_dir.exists():
            _refuse_foreign_files(snapshot_dir)  # again: files may have been added meanwhile
            shutil.rmtree(snapshot_dir)  # an earlier snapshot of the run (checked above)
        shutil.move(str(staging), snapshot_dir)
    return snapshot_dir


def _refuse_foreign_files(snapshot_dir: Path) -> None:
    """SystemExit when an earlier snapshot folder holds files a snapshot never writes (replacing would delete them)."""
    own = {*STATE_FILES, *HALVED_WEIGHTS, SNAPSHOT_FILE}
    foreign = sorted(p.name for p in snapshot_dir.iterdir() if p.name not in own) if snapshot_dir.is_dir() else []
    if foreign:
        raise SystemExit(f"{snapshot_dir} holds {', '.join(foreign)}, which a snapshot does not write; replacing the "
                         "snapshot would delete them: move them away, or snapshot into another folder.")  # fmt: skip


def restore_snapshot(snapshot_dir: str | Path, run_dir: str | Path) -> Path:
    """Turn a snapshot back into `run_dir/checkpoint-N` (float32 weights) for train.py to resume from."""
    snapshot_dir, run_dir = Path(snapshot_dir), Path(run_dir)
    if not (snapshot_dir / SNAPSHOT_FILE).is_file():
        raise SystemExit(f"{snapshot_dir} is not a snapshot (no {SNAPSHOT_FILE}); make one with `snapshot save`.")
    step = json.loads((snapshot_dir / SNAPSHOT_FILE).read_text())["step"]
    newest = get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None
    if newest is not None and checkpoint_step(Path(newest)) >= step:
        raise SystemExit(f"{run_dir} already holds {Path(newest).name}, as new as the snapshot (step {step}); "
                         "resume from it instead.")  # fmt: skip
    target = run_dir / f"checkpoint-{step}"
    target.mkdir(parents=True)
    for name in HALVED_WEIGHTS:
        if (snapshot_dir / name).is_file():
            halved = load_file(snapshot_dir / name)
            weights = {key: t.float() if t.is_floating_point() else t for key, t in halved.items()}
            save_file(weights, target / name, metadata={"format": "pt"})
    for name in (*STATE_FILES, SNAPSHOT_FILE):
        if (snapshot_dir / name).is_file():
            shutil.copy2(snapshot_dir / name, target / name)
    return target


def checkpoint_step(folder: Path) -> int:
    return int(folder.name.split("-")[-1])


def last_complete_checkpoint(run_dir: str | Path, set_aside: bool = False) -> Path | None:
    """The newest `checkpoint-N` of `run_dir` holding weights, trainer state and curriculum. Newer ones
    without them (a run killed while saving) are skipped, and with `set_aside` renamed
    `incomplete-checkpoint-N` so that Trainer ignores them; nothing is deleted. None (and nothing
    renamed) when no checkpoint is complete."""
    run_dir = Path(run_dir)
    folders = [p for p in run_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    incomplete = []
    for folder in sorted(folders, key=checkpoint_step, reverse=True):
        weights = any((folder / name).is_file() for name in WEIGHT_FILES)
        if not weights or not all((folder / name).is_file() for name in COMPLETE):
            incomplete.append(folder)
            continue
        for newer in incomplete if set_aside else []:
            aside = newer.with_name(f"incomplete-{newer.name}")
            print(f"{newer} is incomplete (a save was interrupted); set aside as {aside.name}")
            newer.rename(aside)
        return folder
    return None


def _to_float16(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.half() if tensor.dtype == torch.float32 else tensor


def _rewarmed(schedule, resumed_at: int, rewarm_steps: int, step: int) -> float:
    """The schedule's factor at `step`, scaled by k / rewarm_steps on the k-th step after resuming."""
    return schedule(step) * min(1.0, (step - resumed_at + 1) / rewarm_steps)


class Rewarm(TrainerCallback):
    """After resuming from a snapshot (no optimizer state) at step `resumed_at`: continue the
    learning-rate schedule at the current step instead of from step 0, warmed up again over
    `rewarm_steps` while the fresh Adam moments fill. Checkpoints saved later keep the warm-up in
    `rewarm.json`, so a run resumed from one during the warm-up goes on with it."""

    def __init__(self, resumed_at: int, rewarm_steps: int) -> None:
        self.resumed_at, self.rewarm_steps = resumed_at, max(rewarm_steps, 1)

    @classmethod
    def for_checkpoint(cls, checkpoint: str | Path | None, warmup_steps: int) -> Rewarm | None:
        """The warm-up a run resuming from `checkpoint` needs: a new one after a snapshot, the saved one
        after a checkpoint written during a warm-up, else None."""
        if checkpoint is None:
            return None
        checkpoint = Path(checkpoint)
        if (checkpoint / SNAPSHOT_FILE).is_file() and not (checkpoint / "optimizer.pt").is_file():
            return cls(checkpoint_step(checkpoint), warmup_steps)
        if (checkpoint / REWARM_FILE).is_file():
            return cls(**json.loads((checkpoint / REWARM_FILE).read_text()))
        return None

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        warming = state.global_step < self.resumed_at + self.rewarm_steps
        if state.is_world_process_zero and folder.is_dir() and warming:
            record = {"resumed_at": self.resumed_at, "rewarm_steps": self.rewarm_steps}
            (folder / REWARM_FILE).write_text(json.dumps(record) + "\n")
        return control

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        scheduler = lambda_scheduler(lr_scheduler, "Resuming from a snapshot")
        step = state.global_step
        scheduler.lr_lambdas = [partial(_rewarmed, f, self.resumed_at, self.rewarm_steps) for f in scheduler.lr_lambdas]
        scheduler.last_epoch = step
        set_rates_at(optimizer, scheduler, step)
        return control


def lambda_scheduler(lr_scheduler, what: str):
    """The `LambdaLR` under Trainer's scheduler (accelerate wraps it); `what` needs one to change its rates."""
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)
    if not hasattr(scheduler, "lr_lambdas"):
        raise SystemExit(f"{what} needs a LambdaLR schedule (e.g. linear); got {type(scheduler).__name__}.")
    return scheduler


def set_rates_at(optimizer, scheduler, step: int) -> None:
    """Set each parameter group's rate to the schedule's at `step`, and what the logs report with it."""
    for group, base_lr, schedule in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base_lr * schedule(step)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    save = commands.add_parser("save", help="newest checkpoint of RUN_DIR -> SNAPSHOT_DIR")
    save.add_argument("run_dir")
    save.add_argument("snapshot_dir")
    restore = commands.add_parser("restore", help="SNAPSHOT_DIR -> RUN_DIR/checkpoint-N")
    restore.add_argument("snapshot_dir")
    restore.add_argument("run_dir")
    args = parser.parse_args(argv)
    if args.command == "save":
        written = save_snapshot(args.run_dir, args.snapshot_dir)
    else:
        written = restore_snapshot(args.snapshot_dir, args.run_dir)
    print(f"wrote {written}")
    return written


if __name__ == "__main__":
    main()
