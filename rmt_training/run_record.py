"""What a finished training run records about itself, and the model-card fields made from it.

A run's `final/` folder holds `training_args.json` (its options and Trainer's; runs from before the switch
to `HfArgumentParser` recorded `lr`, `batch_size`, `grad_accum`, which `run_settings` renames),
`curriculum.json`, `log_history.json`, `config.json` and `run_time.json` (`train.py` writes them).
`read_run` gathers them into one record; `describe_run` turns a record into the name, config, recipe
and limitations of a results JSON for `model_cards`.
A run started `--init-from` another run's `final/` copies that run's record into its own folder as
`initialised_from.json` (in every checkpoint, snapshot and its `final/`), so the card can show both
recipes even where the first run's folder is gone. Started from an exported checkpoint, the record is
its name, the `base_model` of its card and the `card_results.json` its export ships, whose training
block is the first recipe.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from rmt_tools.backbones import minilm_path

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
PIPELINE_TAGS = {"RMTForSequenceClassification": "text-classification", "RMTForCausalLM": "text-generation"}
LINEAGE_FILE = "initialised_from.json"
CARD_RESULTS = "card_results.json"  # shipped by conversion.export beside an exported checkpoint's card
# training_args.json of runs before HfArgumentParser (hand-written flags): old key -> TrainingArguments' name.
RENAMED = {"lr": "learning_rate", "batch_size": "per_device_train_batch_size",
           "grad_accum": "gradient_accumulation_steps", "no_progress": "disable_tqdm"}  # fmt: skip
SHORT_FLAGS = {new: f"--{old.replace('_', '-')}" for old, new in RENAMED.items()}  # train's aliases, as cards show
RUN_FILES = {"settings": "training_args.json", "curriculum": "curriculum.json", "history": "log_history.json",
             "config": "config.json", "clock": "run_time.json", "lineage": LINEAGE_FILE}  # fmt: skip


def run_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """A run's recorded settings (`training_args.json`) under the current names, whichever code wrote them."""
    return {RENAMED.get(key, key): value for key, value in settings.items()}


def run_name(folder: Path) -> str:
    """A run's name: NAME for `runs/NAME/final`, else the folder's name."""
    return folder.parent.name if folder.name == "final" else folder.name


def read_run(folder: str | Path) -> dict[str, Any]:
    """The record of the run whose `final/` (or model) folder this is: its name and, for a run's
    `final/`, the contents of its `RUN_FILES` (absent files are left out); for an exported checkpoint,
    the `base_model` its card names and its card's results (`card`), where it ships them."""
    folder = Path(folder).resolve()
    record: dict[str, Any] = {"name": run_name(folder)}
    for key, file in RUN_FILES.items():
        if (folder / file).is_file():
            record[key] = json.loads((folder / file).read_text())
    if "settings" in record:
        return record
    base_model = card_base_model(folder / "README.md")
    card = json.loads((folder / CARD_RESULTS).read_text()) if (folder / CARD_RESULTS).is_file() else None
    return record | ({"base_model": base_model} if base_model else {}) | ({"card": card} if card else {})


def card_base_model(card: Path) -> str | None:
    """`base_model` from a model card's YAML front matter, if it has one."""
    text = card.read_text() if card.is_file() else ""
    if not text.startswith("---\n") or "\n---" not in text[4:]:
        return None
    metadata = yaml.safe_load(text[4 : text.index("\n---", 4)]) or {}
    return metadata.get("base_model") if isinstance(metadata.get("base_model"), str) else None


def render_flag(value: Any) -> str:
    """A command-line value as typed: lists space-separated."""
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def training_command(settings: dict[str, Any], name: str, init_from: str | None) -> str:
    """The `train` command line of a run, from its `training_args.json`, with the flags that shape the model."""
    settings = run_settings(settings)
    shown = ["head", "backbone", "init_from", "new_memory", "tasks", "stages", "advance_at", "max_steps",
             "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "segment_size",
             "num_mem_tokens", "memory_type", "bf16"]  # fmt: skip
    if settings.get("head") == "causal-lm" and not settings.get("backbone") and not settings.get("init_from"):
        shown.append("decoder_preset")  # a decoder from scratch
    values = {key: settings.get(key) for key in shown} | {"init_from": init_from}
    if values["backbone"] and Path(values["backbone"]) == minilm_path():
        values["backbone"] = "minilm"
    flags = [SHORT_FLAGS.get(key, f"--{key.replace('_', '-')}") + ("" if value is True else f" {render_flag(value)}")
             for key, value in values.items() if value not in (None, False)]  # fmt: skip
    run = Path(settings["output_dir"]).name if settings.get("output_dir") else name
    return f"python -m rmt_training.train --output-dir runs/{run} {' '.join(flags)}"


def stage_rows(curriculum: dict[str, Any], steps: int) -> list[dict[str, Any]]:
    """The card's rows of the curriculum: each stage that moved on, then the last stage."""
    rows = [_stage_row(entry, "the next stage started from") for entry in curriculum["history"]]
    return rows + last_stage(curriculum, steps)


def _stage_row(entry: dict[str, Any], handed_on_to: str, done: str = "") -> dict[str, Any]:
    """A history entry as a card row, naming the step whose weights went on where that is not its last."""
    handed_on = entry.get("weights_from_step", entry["step"])
    weights = f" ({handed_on_to} step {handed_on:,}'s weights, the stage's best)" if handed_on != entry["step"] else ""
    return {key: entry[key] for key in ("step", "segments", "best")} | {"reason": entry["reason"] + done + weights}


def last_stage(curriculum: dict[str, Any], steps: int) -> list[dict[str, Any]]:
    """The curriculum's last stage as a history row (the history lists the stages that moved on)."""
    if curriculum.get("ended"):
        return [_stage_row(curriculum["ended"], "the final model is", done=": the curriculum is done")]
    best = curriculum.get("best")
    if best is None or not math.isfinite(best):
        return []
    reached = curriculum["stage"] == len(curriculum["stages"]) - 1 and best >= curriculum["advance_at"]
    reason = f"reached {best:.4f}: the curriculum is done" if reached else "the run's last step"
    return [{"step": steps, "segments": curriculum["stages"][curriculum["stage"]], "best": best, "reason": reason}]


def describe_run(record: dict[str, Any], name: str, repo_id: str, hardware: str) -> dict[str, Any]:
    """The card fields of a results JSON from a run's record (`read_run`); a run started `--init-from`
    another run describes that one too, as `training.initialised_from`."""
    settings, curriculum, config = run_settings(record["settings"]), record["curriculum"], record["config"]
    history, clock = record.get("history", []), record.get("clock")
    rates = clock.get("learning_rate", []) if clock else []  # parts at different rates, where resumed so
    runtime = clock["seconds"] if clock else sum(entry.get("train_runtime", 0.0) for entry in history)
    steps = max((entry.get("step", 0) for entry in history), default=0)
    lineage = record.get("lineage")
    prior, previous, init_from = {}, None, None
    if lineage is not None and "settings" in lineage:  # a run's final/ folder
        prior = describe_run(lineage, lineage["name"], repo_id, hardware)
        previous, init_from = {"name": lineage["name"], **prior["training"]}, f"runs/{lineage['name']}/final"
    elif lineage is not None:  # an exported checkpoint: its recipe is in the results its card was made from
        card = lineage.get("card", {})
        previous, init_from = {"name": lineage["name"], **card.get("training", {})}, lineage["name"]
        prior = {key: card[key] for key in ("base_model", "config") if key in card}
        prior |= {"base_model": lineage["base_model"]} if "base_model" in lineage else {}
    model_class = config["architectures"][0]
    batch = settings["per_device_train_batch_size"] * settings.get("world_size", 1)
    batch *= settings["gradient_accumulation_steps"]
    first_rate = {"learning_rate": rates[0]["learning_rate"]} if rates else {}  # the rate the run started at
    backbone = settings.get("backbone")
    base_model = MINILM_ID if backbone is None or Path(backbone) == minilm_path() else backbone
    described = {key: config[key] for key in ("memory_type", "num_mem_tokens", "segment_size")}
    if lineage is not None:
        base_model = prior.get("base_model")
        described |= {"backbone": prior["config"]["backbone"]} if "backbone" in prior.get("config", {}) else {}
    elif settings.get("head") == "causal-lm" and backbone is None:
        base_model, text = None, config["text_config"]
        described["backbone"] = (
            f"a {text['model_type'].capitalize()} decoder trained from scratch ({text['num_hidden_layers']} layers, "
            f"hidden size {text['hidden_size']}, a vocabulary of {text['vocab_size']:,} tokens)"
        )
    return {
        "name": name, "repo_id": repo_id, "model_class": model_class,
        "pipeline_tag": PIPELINE_TAGS[model_class], **({"base_model": base_model} if base_model else {}),
        "license": "apache-2.0", "datasets": [], "plot": f"{name}_accuracy.png", "config": described,
        "training": {
            "tasks": settings["tasks"], "noise": f"{settings['noise']} (Project Gutenberg)",
            "stages": curriculum["stages"], "steps": steps, "learning_rate": settings["learning_rate"],
            "hardware": hardware, "batch_size": batch,
            "hours": round(runtime / 3600, 2), **({"hours_from_step": clock["untimed_steps"] + 1}
                                                  if clock and clock["untimed_steps"] else {}),
            "command": training_command(settings | first_rate, name, init_from),
            "curriculum_history": stage_rows(curriculum, steps),
            **({"precision": clock["precision"]} if clock and "precision" in clock else {}),
            **({"learning_rate_parts": rates} if len(rates) > 1 else {}),
            **({"initialised_from": previous} if previous else {}),
            **({"new_memory": True} if previous and settings.get("new_memory") else {}),
        },
        "limitations": [
            "Trained and evaluated on synthetic memory tasks only: bAbI-style facts hidden in public-domain "
            "literary text. It is not a general question-answering or retrieval model.",
            "The answer is one of six places (office, bathroom, garden, hallway, kitchen, bedroom) for questions "
            "like 'Where is Mary?' about the people of the bAbI templates (Mary, John, Daniel, Sandra).",
            "Accuracy at the longest lengths is measured on few documents (see n and the 95% intervals).",
        ]
        + (["A decoder trained only to answer these questions: it is not a language model of general text."]
           if settings.get("head") == "causal-lm" else []),
    }  # fmt: skip
