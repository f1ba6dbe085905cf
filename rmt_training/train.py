"""Train an RMT on the memory tasks with a segment curriculum; resumes where it stopped.

    python -m rmt_training.train --output-dir runs/rmt-minilm            # MiniLM, memorize + detect
    python -m rmt_training.train --head causal-lm --output-dir runs/rmt-qa1 --segment-size 256
                                                                    # a small Llama from scratch on qa1
    accelerate launch --multi_gpu --num_processes 2 -m rmt_training.train ...  # several processes

Each run writes Trainer checkpoints (`checkpoint-N/`, with `curriculum.json`) every `--save-steps`
steps; started again with the same `--output-dir` it continues from the newest one: same weights,
optimizer, schedule, data position and curriculum stage. The final model, its code and tokenizer are
saved to `OUTPUT_DIR/final`; once it exists the run is finished and a rerun refuses to touch it.
`--init-from RUN/final` starts a new run from a trained RMT's weights (e.g. on longer documents);
with `--new-memory` it keeps only that model's backbone under a new memory (e.g. `--memory-type armt`).
Flags: the run's own options and every `TrainingArguments` one, with this project's defaults
(`options.py`; `--lr`, `--batch-size`, `--grad-accum`, `--no-progress` are short for Trainer's names).
A run can also continue from a compact snapshot (`rmt_training.snapshot`), e.g. one committed
to carry a long CPU run across machines.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import os
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    DataCollatorWithPadding,
    PretrainedConfig,
    Trainer,
    TrainerState,
    TrainingArguments,
    set_seed,
)

from conversion.from_backbone import long_document_tokenizer, write_new_folder
from modeling_rmt import RMTForCausalLM, RMTForSequenceClassification
from rmt_tools.backbones import minilm_path
from rmt_tools.hardware import slow_bfloat16_warning

from .curriculum import Curriculum, CurriculumCallback, CurriculumTaskDataset
from .decoder import (
    DecoderCollator,
    answer_accuracy,
    answer_predictions,
    build_decoder,
    end_answers_at_end_token,
    pad_token_id,
    prompt_tokenizer,
)
from .labels import add_unknown_label, labels_for
from .options import RunOptions, RunTrainingArguments, parse_options
from .run_callbacks import Lineage, RunClock, StopAtStep
from .snapshot import Rewarm, checkpoint_step, last_complete_checkpoint
from .tasks import HELD_OUT_SEED, VALIDATION_SEED_OFFSET, TokenizedNoise, check_held_out


def accuracy_by_task(tasks: list[str], world_size: int = 1):
    """Classifier metrics: mixed accuracy, and each task's (`accuracy_<task>`) when several are mixed.

    The validation set takes tasks in turn (item i is task i mod len(tasks)), and one process gets its
    predictions back in that order; several processes (`world_size`) interleave them, so there only the mixed
    figure is given."""

    def compute(prediction) -> dict[str, float]:
        correct = np.asarray(prediction.predictions).argmax(-1) == np.asarray(prediction.label_ids)
        metrics = {"accuracy": float(correct.mean())}
        if len(tasks) > 1 and world_size == 1:
            for offset, task in enumerate(tasks):
                metrics[f"accuracy_{task}"] = float(correct[offset :: len(tasks)].mean())
        return metrics

    return compute


def parse_args(argv: list[str] | None = None) -> tuple[RunOptions, RunTrainingArguments]:
    """The run's own options and Trainer's (`options.py`): every `TrainingArguments` flag, with this project's
    defaults."""
    return parse_options(argv, __doc__)


def recorded_settings(
    options: RunOptions, training_args: TrainingArguments, distributed_type: str = "NO"
) -> dict[str, Any]:
    """What a run's `training_args.json` records: its own options, every Trainer argument, and the processes
    (`distributed_type`: accelerate's, e.g. NO, MULTI_CPU (DDP), MULTI_GPU, FSDP)."""
    trainer_settings = json.loads(training_args.to_json_string())
    processes = {"world_size": training_args.world_size, "distributed_type": distributed_type}
    return {**dataclasses.asdict(options), **trainer_settings, **processes}


def check_fsdp_launch(trainer: Trainer) -> None:
    """`accelerate launch --use_fsdp` on processes without an accelerator gets DDP from accelerate, silently:
    refuse it, with what to do instead. ARMT needs FSDP2 (its write is registered as an FSDP2 forward method)."""
    requested = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if requested and os.environ.get("FSDP_VERSION", "1") != "2" and trainer.model.config.memory_type == "armt":
        raise SystemExit("ARMT trains under FSDP2 only (accelerate's default is FSDP1, whose flat parameters ARMT's "
                         "memory write cannot read): add --fsdp_version 2.")  # fmt: skip
    if requested and not trainer.is_fsdp_enabled:
        raise SystemExit(
            f"accelerate was launched with FSDP, but it runs FSDP only on accelerator devices and would train these "
            f"{trainer.accelerator.device.type} processes with {trainer.accelerator.distributed_type.value} instead. "
            "Drop --use_fsdp to train with DDP (`accelerate launch --multi_gpu`), or shard a loop of your own with "
            "rmt_training.sharding.shard_with_fsdp2, which runs FSDP2 over gloo on CPUs (README: Train on several "
            "devices)."
        )


def model_to_continue(
    args: RunOptions, source: str | Path, *, resuming: bool = False
) -> RMTForSequenceClassification | RMTForCausalLM:
    """The RMT model of `--init-from` (or of the checkpoint `source` of a resumed run started so), in float32,
    with this run's segment size; its memory must match, unless `--new-memory` asks for its backbone only."""
    model_class = RMTForCausalLM if args.head == "causal-lm" else RMTForSequenceClassification
    if not Path(source).is_dir():
        raise SystemExit(f"--init-from {source}: no such folder; give a run's final/ folder or a saved RMT model.")
    config = AutoConfig.from_pretrained(source)
    architecture = (getattr(config, "architectures", None) or ["?"])[0]
    if config.model_type != "rmt" or architecture != model_class.__name__:
        raise SystemExit(
            f"--init-from {args.init_from} holds a {config.model_type} {architecture}, but --head {args.head} trains "
            f"an {model_class.__name__}: give a folder saved from one (or start from a plain model with --backbone)."
        )
    differing = [f"--{name.replace('_', '-')} {getattr(config, name)}" for name in ("memory_type", "num_mem_tokens")
                 if getattr(args, name) != getattr(config, name)]  # fmt: skip
    if differing and resuming:
        raise SystemExit(f"This run's checkpoint {source} has a different memory: pass {' '.join(differing)}.")
    if differing and not args.new_memory:
        raise SystemExit(
            f"--init-from {args.init_from} has a different memory: pass {' '.join(differing)}, or --new-memory to "
            "start a new memory on its backbone."
        )
    if args.dropout is not None:
        raise SystemExit("--dropout applies when starting from a backbone, not with --init-from.")
    if args.new_memory and not resuming:
        model = backbone_with_new_memory(args, model_class, source, config)
    else:
        model = model_class.from_pretrained(source, segment_size=args.segment_size, dtype=torch.float32)
    if args.head == "classification" and len(labels_for(args.tasks)) > model.config.num_labels:
        add_unknown_label(model)  # a model of the six places goes on to no_fact documents
    return model


def backbone_with_new_memory(
    args: RunOptions,
    model_class: type[RMTForSequenceClassification] | type[RMTForCausalLM],
    source: str | Path,
    config: PretrainedConfig,
) -> RMTForSequenceClassification | RMTForCausalLM:
    """The backbone of a trained RMT-memory model (its memory tokens left behind) under a new memory of
    `--memory-type` with `--num-mem-tokens`, initialised as `from_backbone` does; of the trained model's
    RMT settings only its special tokens carry over (the others are `RMTConfig`'s defaults, as for any
    run started from a backbone)."""
    if config.memory_type != "rmt":
        raise SystemExit(
            f"--new-memory keeps the backbone of a model with RMT memory, and {source} has {config.memory_type} "
            "memory inside its layers: give an RMT-memory model, or leave out --new-memory to go on with its memory."
        )
    trained = model_class.from_pretrained(source, dtype=torch.float32)
    tokens = {name: getattr(config, name) for name in ("cls_token_id", "sep_token_id", "pad_token_id")}
    model = model_class.from_backbone(
        trained.backbone, tokenizer=SimpleNamespace(**tokens), num_mem_tokens=args.num_mem_tokens,
        segment_size=args.segment_size, memory_type=args.memory_type,
    )  # fmt: skip
    model.generation_config = copy.deepcopy(trained.generation_config)
    return model


def build_model(args: RunOptions, tokenizer, last: Path | None = None) -> RMTForSequenceClassification | RMTForCausalLM:
    if args.init_from:
        return model_to_continue(args, last or args.init_from, resuming=last is not None)
    if args.head == "causal-lm":
        if args.dropout is not None:
            raise SystemExit("--dropout applies to encoder backbones; set a decoder's dropout in its config.")
        if args.backbone is None:
            preset = args.decoder_preset or "llama-tiny"
            return build_decoder(preset, tokenizer, args.num_mem_tokens, args.segment_size, args.memory_type)
        return RMTForCausalLM.from_backbone(args.backbone, tokenizer=tokenizer, num_mem_tokens=args.num_mem_tokens,
                                            segment_size=args.segment_size, memory_type=args.memory_type)  # fmt: skip
    backbone_kwargs = {}
    if args.dropout is not None:
        backbone_kwargs = {"hidden_dropout_prob": args.dropout, "attention_probs_dropout_prob": args.dropout}
    id2label = labels_for(args.tasks)
    return RMTForSequenceClassification.from_backbone(
        args.backbone, tokenizer=tokenizer, num_labels=len(id2label), id2label=id2label,
        label2id={label: index for index, label in id2label.items()},
        num_mem_tokens=args.num_mem_tokens, segment_size=args.segment_size, memory_type=args.memory_type,
        backbone_kwargs=backbone_kwargs,
    )  # fmt: skip


def with_lora(model: RMTForSequenceClassification | RMTForCausalLM, args: RunOptions) -> Any:
    """The model under LoRA adapters (`rmt_training.lora`): the backbone's linear layers get adapters, the
    memory and a classifier's head train fully."""
    if importlib.util.find_spec("peft") is None:
        raise SystemExit('--lora-r needs peft: pip install -e ".[peft]"')
    from peft import get_peft_model

    from .lora import lora_config

    config = lora_config(model, r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                         target_modules=args.lora_target_modules)  # fmt: skip
    return get_peft_model(model, config)


def check_lora_options(args: RunOptions) -> None:
    """LoRA's other options go with --lora-r, and the rank is a positive integer."""
    if args.lora_r is None:
        others = [
            spec for spec in dataclasses.fields(RunOptions) if spec.name.startswith("lora_") and spec.name != "lora_r"
        ]
        given = [f"--{spec.name.replace('_', '-')}" for spec in others if getattr(args, spec.name) != spec.default]
        if given:
            raise SystemExit(f"{' '.join(given)} set LoRA up: add --lora-r (the adapters' rank) to train with LoRA.")
    elif isinstance(args.lora_r, bool) or args.lora_r < 1:
        raise SystemExit(f"--lora-r must be an integer >= 1 (the adapters' rank), got {args.lora_r}.")


def main(argv: list[str] | None = None) -> Path:
    args, training_args = parse_args(argv)
    check_lora_options(args)
    device = "cpu" if training_args.use_cpu else "cuda"  # what the Trainer will use
    if training_args.bf16 and (warning := slow_bfloat16_warning(device, "--bf16")):
        warnings.warn(warning, stacklevel=2)
    decoder = args.head == "causal-lm"
    if args.init_from and (args.backbone or args.decoder_preset):
        raise SystemExit("--init-from starts from a trained RMT model: leave out --backbone and --decoder-preset.")
    if args.new_memory and not args.init_from:
        raise SystemExit("--new-memory goes with --init-from (a trained model whose backbone it keeps).")
    if args.init_from:
        args.init_from = str(Path(args.init_from).resolve())
    elif args.backbone == "minilm" or (args.backbone is None and not decoder):
        args.backbone = str(minilm_path())
    args.tasks = args.tasks or (["qa1"] if decoder else ["memorize", "detect_memorize"])
    check_held_out(training_args.seed, HELD_OUT_SEED)  # evaluate_lengths' default documents stay unseen
    output_dir = Path(training_args.output_dir)
    set_seed(training_args.seed)
    if (output_dir / "final").exists():
        raise SystemExit(
            f"{output_dir / 'final'} exists: this run has finished. Use a new --output-dir (or move that "
            "folder away) to train again; nothing was changed."
        )
    last = last_complete_checkpoint(output_dir, set_aside=True) if output_dir.is_dir() else None
    curriculum = Curriculum(list(args.stages), args.advance_at, args.patience, every_steps=args.every_steps,
                            stage_start=args.stage_start)  # fmt: skip
    if last is None and output_dir.is_dir() and any(output_dir.glob("checkpoint-*")):
        raise SystemExit(
            f"{output_dir} holds no complete checkpoint (one with its weights, trainer_state.json and "
            "curriculum.json): they were written by other code, or the first save was interrupted. Train into a new "
            "--output-dir, or move those checkpoint folders away."
        )
    resumed_tokenizer = last is not None and (last / "tokenizer_config.json").is_file()
    continued_from = (str(last) if resumed_tokenizer else args.init_from) if args.init_from else None
    tokenizer_source = args.tokenizer or continued_from or args.backbone or str(minilm_path())
    tokenizer = long_document_tokenizer(AutoTokenizer.from_pretrained(tokenizer_source))
    if decoder:
        tokenizer = prompt_tokenizer(tokenizer)  # documents carry no [CLS] or [SEP]
    lineage = Lineage.for_run(args.init_from, last, args.new_memory)
    if lineage:  # as the run started, whether or not a resume repeats the flag (older records: as given now)
        lineage.new_memory = args.new_memory = args.new_memory if lineage.new_memory is None else lineage.new_memory
    if last:
        saved = Curriculum.load(last, stage_start=curriculum.stage_start)  # older code saved no stage_start
        longer = curriculum.stages[: len(saved.stages)] == saved.stages and len(curriculum.stages) > len(saved.stages)
        if longer:  # more stages after the saved ones: train on longer documents once these are done
            print(f"resuming with the stages extended from {saved.stages} to {curriculum.stages}")
            saved.extend(curriculum.stages)
        settings = ("stages", "advance_at", "patience", "every_steps", "stage_start")
        changed = [name for name in settings if getattr(saved, name) != getattr(curriculum, name)]
        if changed:
            print(f"resuming with the checkpoint's curriculum settings; ignoring the new {', '.join(changed)}")
        curriculum = saved
    noise = TokenizedNoise(tokenizer, args.noise)
    common = dict(tasks=args.tasks, tokenizer=tokenizer, noise=noise, curriculum=curriculum,
                  segment_size=args.segment_size, head=args.head)  # fmt: skip
    # One epoch = max_steps global batches of distinct documents (the same for any number of processes).
    global_batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    global_batch *= int(os.environ.get("WORLD_SIZE", "1"))
    train_data = CurriculumTaskDataset(**common, size=training_args.max_steps * global_batch, seed=training_args.seed,
                                       global_batch=global_batch)  # fmt: skip
    validation = CurriculumTaskDataset(**common, size=args.eval_size, seed=training_args.seed + VALIDATION_SEED_OFFSET)
    clock = RunClock(last, "bfloat16 mixed precision" if training_args.bf16 else "float32")
    rewarm = Rewarm.for_checkpoint(last, int(training_args.warmup_steps))
    lora = args.lora_r is not None  # a LoRA checkpoint holds the adapter: the base is built anew, as at the start
    model = build_model(args, tokenizer, None if lora else last)
    # The curriculum ended at this checkpoint, but final/ was not written: nothing is left to train.
    ended = last is not None and curriculum.ended is not None and curriculum.ended["step"] == checkpoint_step(last)
    if ended and lora:
        raise SystemExit(f"This LoRA run ended at step {curriculum.ended['step']} before final/ was written: its "
                         f"adapter is in {last} (load it with peft's PeftModel.from_pretrained).")  # fmt: skip
    if ended:
        model = model.from_pretrained(last, dtype=torch.float32)  # the checkpoint's model is the final one
    if decoder:
        end_answers_at_end_token(model, tokenizer)
    if lora:
        model = with_lora(model, args)
    trainer = Trainer(
        model=model, args=training_args, train_dataset=train_data, eval_dataset=validation,
        data_collator=DecoderCollator(pad_token_id(tokenizer)) if decoder else DataCollatorWithPadding(tokenizer),
        compute_metrics=answer_accuracy if decoder else accuracy_by_task(args.tasks, training_args.world_size),
        processing_class=tokenizer,
        preprocess_logits_for_metrics=answer_predictions if decoder else None,
        callbacks=[CurriculumCallback(curriculum, resumed_from=last), clock]
        + ([StopAtStep(args.stop_at_step)] if args.stop_at_step else [])
        + ([rewarm] if rewarm else [])
        + ([lineage] if lineage else []),
    )  # fmt: skip
    check_fsdp_launch(trainer)
    if trainer.is_fsdp_enabled and curriculum.stage_start == "best":
        raise SystemExit(
            "--stage-start best keeps a whole copy of each stage's best weights, which a model sharded with FSDP does "
            "not give: pass --stage-start last (stages go on from their last weights)."
        )
    if last:
        kind = f" (learning rate warming up again from step {rewarm.resumed_at})" if rewarm else ""
        print(f"resuming from {last}{kind} at {curriculum.num_segments} segments per document")
    if ended:
        trainer.state = TrainerState.load_from_json(str(last / "trainer_state.json"))
        print(f"the curriculum ended at step {curriculum.ended['step']}: saving {last}'s model as the final one")
    else:
        trainer.train(resume_from_checkpoint=str(last) if last else None)
    if args.stop_at_step and trainer.state.global_step >= args.stop_at_step < training_args.max_steps:
        print(f"stopped at step {trainer.state.global_step}; run again with the same --output-dir to resume")
        return output_dir
    final = output_dir / "final"
    if trainer.is_world_process_zero():

        def write(folder: Path) -> None:
            if lora:  # the adapter (with the trained memory) beside the merged model, which every tool reads
                trainer.model.save_pretrained(folder / "adapter")
                trainer.model.merge_and_unload().save_pretrained(folder)
            else:
                trainer.save_model(str(folder))
            tokenizer.save_pretrained(folder)
            curriculum.save(folder)
            clock.save(folder)
            if lineage:
                lineage.save(folder)
            settings = recorded_settings(args, trainer.args, trainer.accelerator.distributed_type.value)
            (folder / "training_args.json").write_text(json.dumps(settings, indent=2))
            (folder / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2))

        try:  # built beside final/ and renamed: a file someone put in final/ meanwhile is never written over
            write_new_folder(final, write)
        except ValueError as error:
            raise SystemExit(
                f"{error} The trained model is in the run's last checkpoint: move {final} away and run again with "
                "the same --output-dir to save it."
            ) from None
        print(f"saved the trained model to {final}")
    return final


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
