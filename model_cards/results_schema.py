"""The results JSON a model card is made from: its fields and their types, checked with errors that name the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from model_cards.inference import inference_problem

NUMBER = (int, float)
# field -> accepted type(s); a missing or mistyped one is an error naming the field.
REQUIRED: dict[str, dict[str, Any]] = {
    "": {"name": str, "repo_id": str, "model_class": str, "pipeline_tag": str, "license": str,
         "config": dict, "training": dict, "evaluation": list, "limitations": list},
    "config": {"memory_type": str, "num_mem_tokens": int, "segment_size": int},
    "training": {"tasks": list, "steps": int, "batch_size": int, "learning_rate": NUMBER, "hardware": str,
                 "command": str},
    "evaluation": {"task": str, "noise": str, "num_tokens": int, "segments": int, "samples": int, "accuracy": NUMBER},
    "training.curriculum_history": {"step": int, "segments": int, "best": NUMBER, "reason": str},
    "harness": {"tool": str, "num_tokens": int, "samples": int, "dtype": str, "lm_eval_accuracy": NUMBER,
                "our_accuracy": NUMBER, "same_answers": int, "command": str},
}  # fmt: skip
OPTIONAL: dict[str, dict[str, Any]] = {
    "": {
        "base_model": str,
        "datasets": list,
        "plot": str,
        "notes": str,
        "example": bool,
        "inference": dict,
        "harness": dict,
    },
    "config": {"backbone": str},  # what it was built on when there is no base model (trained from scratch)
    "training": {
        "noise": str,
        "stages": list,
        "hours": NUMBER,
        "hours_from_step": int,
        "curriculum_history": list,
        "precision": list,
        "learning_rate_parts": list,
        "initialised_from": dict,
        "new_memory": bool,  # started from the first model's backbone only, under a new memory
    },
}
MODEL_CLASSES = {"text-classification": "RMTForSequenceClassification", "text-generation": "RMTForCausalLM"}


class ResultsError(ValueError):
    """The results JSON lacks a field or has a wrong value; the message names it."""


def _check_fields(record: Any, where: str, section: str) -> None:
    """`record` is an object with the REQUIRED fields of `section`, and OPTIONAL ones of the right type."""
    if not isinstance(record, dict):
        raise ResultsError(f"{where or 'the results'} must be a JSON object")
    prefix = f"{where}." if where else ""
    for required, fields in ((True, REQUIRED.get(section, {})), (False, OPTIONAL.get(section, {}))):
        for field, kind in fields.items():
            if field not in record:
                if required:
                    raise ResultsError(f"missing field '{prefix}{field}' in the results JSON")
                continue
            value = record[field]
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
                names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
                raise ResultsError(f"field '{prefix}{field}' must be {names}, not {type(value).__name__}: {value!r}")


def validate(results: dict[str, Any]) -> dict[str, Any]:
    """Check a results dict; returns it, or raises ResultsError naming the missing or wrong field."""
    _check_fields(results, "", "")
    _check_fields(results["config"], "config", "config")
    _check_fields(results["training"], "training", "training")
    for index, step in enumerate(results["training"].get("curriculum_history", [])):
        _check_fields(step, f"training.curriculum_history[{index}]", "training.curriculum_history")
    if not results["evaluation"]:
        raise ResultsError("field 'evaluation' must list at least one result")
    seen = set()
    for index, entry in enumerate(results["evaluation"]):
        where = f"evaluation[{index}]"
        _check_fields(entry, where, "evaluation")
        if not 0 <= entry["accuracy"] <= 1:
            raise ResultsError(f"field '{where}.accuracy' must lie in [0, 1], not {entry['accuracy']}")
        for field in ("num_tokens", "segments", "samples"):
            if entry[field] < 1:
                raise ResultsError(f"field '{where}.{field}' must be positive, not {entry[field]}")
        key = (entry["task"], entry["num_tokens"], entry["noise"], entry.get("dtype"))
        if key in seen:
            raise ResultsError(
                f"{where}: a second result for task {key[0]!r} at {key[1]} tokens on {key[2]} noise in {key[3]}"
            )
        seen.add(key)
    expected_class = MODEL_CLASSES.get(results["pipeline_tag"])
    if expected_class is None:
        raise ResultsError(f"field 'pipeline_tag' must be one of {', '.join(MODEL_CLASSES)}")
    if results["model_class"] != expected_class:
        raise ResultsError(
            f"field 'model_class' is {results['model_class']}; {results['pipeline_tag']} needs {expected_class}"
        )
    if "plot" in results and ("/" in results["plot"] or "\\" in results["plot"]):
        raise ResultsError("field 'plot' must be a file name beside the card (no folders)")
    if not results["training"]["tasks"] or any(not isinstance(task, str) for task in results["training"]["tasks"]):
        raise ResultsError("field 'training.tasks' must be a non-empty list of task names")
    if any(not isinstance(item, str) for item in results["limitations"]) or not results["limitations"]:
        raise ResultsError("field 'limitations' must be a non-empty list of strings")
    if "inference" in results and (problem := inference_problem(results["inference"])):
        raise ResultsError(problem)
    if "harness" in results:
        _check_fields(results["harness"], "harness", "harness")
    return results


def load_results(path: str | Path) -> dict[str, Any]:
    """Read and validate a results JSON file."""
    try:
        results = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ResultsError(f"{path} is not valid JSON: {error}") from error
    return validate(results)
