"""Compact training snapshots that a long run can be committed as, and resumed from on another machine.

    python -m modeling_rmt.training.snapshot save runs/rmt-minilm-qa1 snapshots/rmt-minilm-qa1
    python -m modeling_rmt.training.snapshot restore snapshots/rmt-minilm-qa1 runs/rmt-minilm-qa1
    python -m modeling_rmt.training.train ... --output-dir runs/rmt-minilm-qa1   # continues at the snapshot's step

A Trainer checkpoint holds the weights in float32 and the optimizer's two moments: four times the
model in all. A snapshot keeps the weights in float16 (half the model) with the run's state: the
trainer state (step, log history), the curriculum stage and the run clock. The optimizer is not
kept: the resumed run starts fresh Adam moments, continues the learning-rate schedule at the
snapshot's step and warms it up again over the run's `--warmup-steps` (`SnapshotResume`). So a run
resumed from a snapshot is close to, not equal to, an uninterrupted one; a run resumed from its own
Trainer checkpoint is equal.
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

SNAPSHOT_FILE = "snapshot.json"
STATE_FILES = ("config.json", "generation_config.json", "trainer_state.json", "curriculum.json", "run_time.json")
WEIGHTS = "model.safetensors"


def save_snapshot(run_dir: str | Path, snapshot_dir: str | Path) -> Path:
    """Write the newest checkpoint of `run_dir` as a snapshot (replacing an earlier snapshot there)."""
    run_dir, snapshot_dir = Path(run_dir), Path(snapshot_dir)
    checkpoint = get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None
    if checkpoint is None:
        raise SystemExit(f"{run_dir} has no checkpoint-N folder to snapshot; train with --save-steps first.")
    checkpoint = Path(checkpoint)
    if snapshot_dir.exists() and not (snapshot_dir / SNAPSHOT_FILE).is_file():
        raise SystemExit(f"{snapshot_dir} exists and is not a snapshot; pick an empty or new folder.")
    missing = [name for name in (WEIGHTS, "trainer_state.json", "curriculum.json") if not (checkpoint / name).is_file()]
    if missing:
        raise SystemExit(f"{checkpoint} lacks {', '.join(missing)}; it is not a checkpoint of modeling_rmt.training.")
    step = int(checkpoint.name.split("-")[-1])
    with tempfile.TemporaryDirectory(dir=snapshot_dir.parent if snapshot_dir.parent.exists() else None) as tmp:
        staging = Path(tmp) / "snapshot"
        staging.mkdir()
        weights = load_file(checkpoint / WEIGHTS)
        save_file({name: _to_float16(tensor) for name, tensor in weights.items()}, staging / WEIGHTS,
                  metadata={"format": "pt"})  # fmt: skip
        for name in STATE_FILES:
            if (checkpoint / name).is_file():
                shutil.copy2(checkpoint / name, staging / name)
        record = {"step": step, "source": checkpoint.name, "weights_dtype": "float16", "optimizer": "not kept"}
        (staging / SNAPSHOT_FILE).write_text(json.dumps(record, indent=2) + "\n")
        snapshot_dir.parent.mkdir(parents=True, exist_ok=True)
        if snapshot_dir.exists():
            shutil.rmtree(snapshot_dir)  # an earlier snapshot of the run (checked above)
        shutil.move(str(staging), snapshot_dir)
    return snapshot_dir


def restore_snapshot(snapshot_dir: str | Path, run_dir: str | Path) -> Path:
    """Turn a snapshot back into `run_dir/checkpoint-N` (float32 weights) for train.py to resume from."""
    snapshot_dir, run_dir = Path(snapshot_dir), Path(run_dir)
    if not (snapshot_dir / SNAPSHOT_FILE).is_file():
        raise SystemExit(f"{snapshot_dir} is not a snapshot (no {SNAPSHOT_FILE}); make one with `snapshot save`.")
    step = json.loads((snapshot_dir / SNAPSHOT_FILE).read_text())["step"]
    newest = get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None
    if newest is not None and int(Path(newest).name.split("-")[-1]) >= step:
        raise SystemExit(f"{run_dir} already holds {Path(newest).name}, as new as the snapshot (step {step}); "
                         "resume from it instead.")  # fmt: skip
    target = run_dir / f"checkpoint-{step}"
    target.mkdir(parents=True)
    weights = load_file(snapshot_dir / WEIGHTS)
    save_file({name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in weights.items()},
              target / WEIGHTS, metadata={"format": "pt"})  # fmt: skip
    for name in (*STATE_FILES, SNAPSHOT_FILE):
        if (snapshot_dir / name).is_file():
            shutil.copy2(snapshot_dir / name, target / name)
    return target


def _to_float16(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.half() if tensor.dtype == torch.float32 else tensor


def _rewarmed(schedule, resumed_at: int, rewarm_steps: int, step: int) -> float:
    """The schedule's factor at `step`, scaled by k / rewarm_steps on the k-th step after resuming."""
    return schedule(step) * min(1.0, (step - resumed_at + 1) / rewarm_steps)


class SnapshotResume(TrainerCallback):
    """On a run resumed from a snapshot (no optimizer state): continue the learning-rate schedule at
    the resumed step instead of from step 0, warming it up again over `rewarm_steps` while the fresh
    Adam moments fill. Later checkpoints carry the optimizer and resume exactly."""

    def __init__(self, rewarm_steps: int) -> None:
        self.rewarm_steps = max(rewarm_steps, 1)

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps it
        if not hasattr(scheduler, "lr_lambdas"):
            raise SystemExit(f"Resuming from a snapshot needs a LambdaLR schedule (e.g. linear); got "
                             f"{type(scheduler).__name__}.")  # fmt: skip
        step = state.global_step
        scheduler.lr_lambdas = [partial(_rewarmed, f, step, self.rewarm_steps) for f in scheduler.lr_lambdas]
        scheduler.last_epoch = step
        groups = zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
        for group, base_lr, schedule in groups:
            group["lr"] = base_lr * schedule(step)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        return control


def resumed_from_snapshot(checkpoint: str | Path | None) -> bool:
    """True for a checkpoint restored from a snapshot that the run has not yet saved over."""
    return checkpoint is not None and (Path(checkpoint) / SNAPSHOT_FILE).is_file()


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
