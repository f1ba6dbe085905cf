"""The training command line: every `TrainingArguments` flag through `HfArgumentParser` with the project's defaults,
the short flags of earlier runs, one-line errors, and run records of older code read as current ones."""

from __future__ import annotations

import json
import shlex

import pytest

from rmt_training.run_record import describe_run, run_settings, training_command
from rmt_training.train import parse_args, recorded_settings


def test_trainer_flags_take_the_projects_defaults():
    options, training = parse_args(["--output-dir", "runs/x"])
    assert training.output_dir == "runs/x" and options.head == "classification" and options.stages == [1, 2, 3, 5, 7]
    assert (training.max_steps, training.learning_rate, training.weight_decay, training.warmup_steps) == (
        20_000, 5e-5, 1e-3, 100,
    )  # fmt: skip
    assert (training.per_device_train_batch_size, training.per_device_eval_batch_size) == (8, 16)
    assert (training.eval_strategy, training.eval_steps, training.save_steps, training.save_total_limit) == (
        "steps", 100, 100, 2,
    )  # fmt: skip
    assert (training.seed, training.max_grad_norm, training.logging_steps, training.report_to) == (0, 5.0, 10, [])
    assert training.train_sampling_strategy == "sequential" and not training.remove_unused_columns
    assert not training.disable_tqdm and not training.bf16


def test_the_short_flags_of_earlier_runs_are_trainers_own():
    short = ["--output-dir", "r", "--lr", "1e-3", "--batch-size", "4", "--grad-accum", "2", "--no-progress"]
    long = ["--output_dir", "r", "--learning_rate", "1e-3", "--per_device_train_batch_size", "4",
            "--gradient-accumulation-steps", "2", "--disable_tqdm", "true"]  # fmt: skip
    (_, a), (_, b) = parse_args(short), parse_args(long)
    assert a.to_dict() == b.to_dict()
    assert (a.learning_rate, a.per_device_train_batch_size, a.per_device_eval_batch_size) == (1e-3, 4, 8)
    assert a.gradient_accumulation_steps == 2 and a.disable_tqdm
    _, cosine = parse_args(["--output-dir", "r", "--lr_scheduler_type", "cosine", "--per_device_eval_batch_size", "3"])
    assert cosine.lr_scheduler_type == "cosine" and cosine.per_device_eval_batch_size == 3  # any Trainer setting


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "1e-3"], "required: --output_dir"),
        (["--output-dir", "r", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--output-dir", "r", "--head", "decoder"], "invalid choice: 'decoder'"),
        (["--output-dir", "r", "--load_best_model_at_end", "--save_strategy", "epoch"], "save and eval strategy"),
    ],
)
def test_a_bad_command_line_fails_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as error:
        parse_args(argv)
    assert error.value.code == 2
    printed = capsys.readouterr().err
    assert message in printed and printed.count("\n") == 1 and "usage" not in printed


def test_a_runs_record_gives_back_its_command_and_an_older_record_the_same_one():
    command = ("python -m rmt_training.train --output-dir runs/qa1 --head causal-lm --backbone org/decoder "
               "--tasks qa1 --stages 1 2 --advance-at 0.95 --max-steps 300 --lr 0.0001 --batch-size 16 "
               "--grad-accum 2 --segment-size 128 --num-mem-tokens 10 --memory-type rmt --bf16")  # fmt: skip
    record = json.loads(json.dumps(recorded_settings(*parse_args(shlex.split(command)[3:]))))  # as written
    assert record["learning_rate"] == 1e-4 and record["per_device_train_batch_size"] == 16 and record["world_size"] == 1
    assert record["stages"] == [1, 2] and record["lr_scheduler_type"] == "linear"  # Trainer's settings too
    assert training_command(record, "qa1", None) == command
    older = {
        "output_dir": "runs/qa1",
        "head": "causal-lm",
        "backbone": "org/decoder",
        "tasks": ["qa1"],
        "stages": [1, 2],
        "advance_at": 0.95,
        "max_steps": 300,
        "lr": 1e-4,
        "batch_size": 16,
        "grad_accum": 2,
        "segment_size": 128,
        "num_mem_tokens": 10,
        "memory_type": "rmt",
        "bf16": True,
        "no_progress": False,
        "noise": "shakespeare",
        "seed": 0,
    }  # fmt: skip (train.py's vars(args) before HfArgumentParser)
    assert training_command(older, "qa1", None) == command
    assert run_settings(older) == {key: record[key] for key in run_settings(older)}


def test_an_older_record_describes_its_run_as_a_current_one():
    curriculum = {"stages": [1], "stage": 0, "best": 0.9, "advance_at": 0.99, "history": []}
    config = {"architectures": ["RMTForSequenceClassification"], "memory_type": "rmt", "num_mem_tokens": 4,
              "segment_size": 24}  # fmt: skip
    argv = ["--output-dir", "runs/r", "--backbone", "org/b", "--lr", "2e-4", "--batch-size", "4", "--grad-accum", "3",
            "--tasks", "memorize"]  # fmt: skip
    current = recorded_settings(*parse_args(argv))
    older = {"output_dir": "runs/r", "backbone": "org/b", "head": "classification", "tasks": ["memorize"],
             "noise": "shakespeare", "lr": 2e-4, "batch_size": 4, "grad_accum": 3, "stages": [1, 2, 3, 5, 7],
             "advance_at": 0.99, "max_steps": 20_000, "segment_size": 115, "num_mem_tokens": 10,
             "memory_type": "rmt", "bf16": False, "world_size": 1}  # fmt: skip
    described = [describe_run({"settings": settings, "curriculum": curriculum, "config": config,
                               "history": [{"step": 5, "train_runtime": 36.0}]}, "r", "org/r", "CPU")
                 for settings in (current, older)]  # fmt: skip
    assert described[0] == described[1]
    assert described[0]["training"]["batch_size"] == 12 and described[0]["training"]["learning_rate"] == 2e-4
    assert "--lr 0.0002 --batch-size 4 --grad-accum 3" in described[0]["training"]["command"]
