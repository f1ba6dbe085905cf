"""The options of `python -m rmt_training.train`: the project's own (`RunOptions`) beside Trainer's
(`RunTrainingArguments`, `TrainingArguments` with this project's defaults), parsed by `HfArgumentParser`.

Every `TrainingArguments` flag is accepted, as `--learning_rate` or `--learning-rate`; `--lr`, `--batch-size`,
`--grad-accum` and `--no-progress` are short aliases (the spellings of runs before the switch, which
`run_record` still reads).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

import torch
from transformers import HfArgumentParser, TrainingArguments
from transformers.hf_argparser import HfArg
from transformers.trainer_utils import IntervalStrategy


@dataclass
class RunOptions:
    """What a run trains and on what: the model, the tasks and the curriculum (Trainer's options aside)."""

    head: Literal["classification", "causal-lm"] = "classification"
    backbone: str | None = HfArg(
        default=None,
        help="folder or id, or `minilm` for the shipped all-MiniLM-L6-v2 "
        "(classification default; causal-lm: a Llama from scratch)",
    )
    decoder_preset: str | None = HfArg(
        default=None,
        help="causal-lm without --backbone: a Llama from scratch of "
        "this size (default llama-tiny; see decoder.DECODER_PRESETS)",
    )
    init_from: str | None = HfArg(
        default=None,
        help="an RMT model folder (a run's final/ or an exported checkpoint) "
        "whose weights this new run starts from, e.g. to train on longer documents; "
        "instead of --backbone",
    )
    new_memory: bool = HfArg(
        default=False,
        help="with --init-from: keep only its backbone (trained with RMT memory) under a new --memory-type memory",
    )
    tokenizer: str | None = HfArg(default=None, help="tokenizer folder (default: the backbone's or MiniLM's)")
    tasks: list[str] | None = HfArg(default=None, help="default: memorize detect_memorize; qa1 (causal-lm)")
    noise: str = HfArg(default="shakespeare", help="noise corpus for training and validation")
    memory_type: Literal["rmt", "armt"] = "rmt"
    num_mem_tokens: int = 10
    segment_size: int = 115
    stages: list[int] = HfArg(default_factory=lambda: [1, 2, 3, 5, 7], help="segments per document, stage by stage")
    advance_at: float = HfArg(default=0.99, help="validation accuracy that ends a stage")
    patience: int = HfArg(default=4, help="evaluations without gain that end a stage")
    every_steps: int | None = HfArg(default=None, help="end stages on this step schedule instead")
    stage_start: Literal["best", "last"] = HfArg(
        default="best", help="a stage ended by validation starts the next from its best weights (the report's) or last"
    )
    eval_size: int = HfArg(default=200, help="validation documents")
    dropout: float | None = HfArg(default=None, help="override the backbone's dropout")
    stop_at_step: int | None = HfArg(default=None, help="save and stop here (resume later)")
    lora_r: int | None = HfArg(
        default=None,
        help="train LoRA adapters of this rank on the backbone's linear layers instead of every weight (the memory "
        "and a classifier's head train fully; needs peft); final/ gets the merged model, final/adapter/ the adapter",
    )
    lora_alpha: float = HfArg(default=16.0, help="LoRA's scale numerator (with --lora-r)")
    lora_dropout: float = HfArg(default=0.0, help="dropout on the LoRA path (with --lora-r)")
    lora_target_modules: list[str] | None = HfArg(
        default=None, help="modules for LoRA, names or suffixes (default: every linear of the backbone's base model)"
    )


_BASE = {spec.name: spec for spec in dataclasses.fields(TrainingArguments)}


def _default(name: str, default: Any, *aliases: str, help: str | None = None) -> Any:
    """A `TrainingArguments` field with this project's default (and aliases), keeping its help text."""
    metadata = {**_BASE[name].metadata, **({"aliases": list(aliases)} if aliases else {})}
    if help:
        metadata["help"] = help
    return field(default=default, metadata=metadata)


@dataclass
class RunTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the defaults of this project's runs: evaluation and a checkpoint every 100 steps
    (the curriculum and resuming rely on both), the data in order, CUDA or else the CPU."""

    output_dir: str = HfArg(help="the run's folder (checkpoints, then final/); run again with it to resume")
    max_steps: int = _default("max_steps", 20_000)
    per_device_train_batch_size: int = _default("per_device_train_batch_size", 8, "--batch-size")
    per_device_eval_batch_size: int | None = _default(
        "per_device_eval_batch_size", None, help="default: twice --per_device_train_batch_size"
    )
    gradient_accumulation_steps: int = _default("gradient_accumulation_steps", 1, "--grad-accum")
    learning_rate: float = _default("learning_rate", 5e-5, "--lr")
    weight_decay: float = _default("weight_decay", 1e-3)
    warmup_steps: float = _default("warmup_steps", 100)
    max_grad_norm: float = _default("max_grad_norm", 5.0)
    eval_strategy: IntervalStrategy | str = _default("eval_strategy", "steps")
    eval_steps: float | None = _default("eval_steps", 100)
    save_steps: float = _default("save_steps", 100)
    save_total_limit: int | None = _default("save_total_limit", 2)
    logging_steps: float = _default("logging_steps", 10)
    seed: int = _default("seed", 0)
    report_to: None | str | list[str] = _default("report_to", "none")
    disable_tqdm: bool = _default("disable_tqdm", False, "--no-progress", help="no progress bars (logs only)")
    remove_unused_columns: bool = _default("remove_unused_columns", False)
    ddp_find_unused_parameters: bool | None = _default("ddp_find_unused_parameters", False)
    train_sampling_strategy: str = _default("train_sampling_strategy", "sequential")

    def __post_init__(self) -> None:
        if self.per_device_eval_batch_size is None:
            self.per_device_eval_batch_size = 2 * self.per_device_train_batch_size
        if not torch.cuda.is_available():
            self.use_cpu = True  # CUDA or the CPU, as the runs so far (never MPS)
        super().__post_init__()


class _Parser(HfArgumentParser):
    """An `HfArgumentParser` whose errors take one line (its usage lists every Trainer flag: see --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, the description kept as written."""


def parse_options(argv: list[str] | None, description: str | None) -> tuple[RunOptions, RunTrainingArguments]:
    """The run's options from a command line; a bad value or combination exits with one line of usage error."""
    parser = _Parser((RunOptions, RunTrainingArguments), prog="python -m rmt_training.train", description=description,
                     formatter_class=_HelpFormatter)  # fmt: skip
    values = vars(parser.parse_args(argv))
    try:
        options, training = parser.parse_dict(values)
    except ValueError as error:  # TrainingArguments' own checks
        parser.error(" ".join(str(error).split()))
    return options, training
