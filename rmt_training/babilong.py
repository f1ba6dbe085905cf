"""BABILong (Kuratov et al., 2024): bAbI facts hidden in PG19 book text, read from the RMT-team format.

- `load_babilong(length, task)`: the Hub dataset `RMT-team/babilong` (configs `BABILONG_LENGTHS`, splits
  `BABILONG_TASKS`, 100 rows each, fields input, question, target), or a local copy (`source=`) laid out
  as `{source}/{length}/{task}.json` (JSON lines), `.jsonl`, `.parquet`, or the Hub's own files
  `{source}/{length}/{task}-*.parquet` (what `hf download RMT-team/babilong --repo-type dataset` gives).
- `babilong_prompt(row)`: the text a model reads, BABILong's template with no instruction or examples.
- `babilong_correct(output, target, question, task)`: the benchmark's answer rule; the same rule is the
  `evaluate` metric at `BABILONG_METRIC_PATH` (`evaluate.load(str(BABILONG_METRIC_PATH))`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import datasets

BABILONG_HUB_ID = "RMT-team/babilong"
BABILONG_LENGTHS = ("0k", "1k", "2k", "4k", "8k", "16k", "32k", "64k", "128k", "256k", "512k", "1M")
BABILONG_TASKS = tuple(f"qa{index}" for index in range(1, 11))
BABILONG_FIELDS = ("input", "question", "target")
BABILONG_METRIC_PATH = Path(__file__).parent / "metrics" / "babilong_accuracy"

_PLACES = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
BABILONG_LABELS: dict[str, tuple[str, ...]] = {
    "qa1": _PLACES,  # single supporting fact: where is a person
    "qa2": _PLACES,  # two supporting facts: where is an object a person carried
    "qa3": _PLACES,  # three supporting facts: where was an object before a place
    "qa4": _PLACES,  # two-argument relations: what is north of a place
    "qa5": ("Bill", "Fred", "Jeff", "Mary", "apple", "football", "milk"),  # three-argument relations
    "qa6": ("no", "yes"),  # yes/no questions
    "qa7": ("none", "one", "two", "three"),  # counting
    "qa8": ("apple", "football", "milk", "nothing"),  # lists/sets: targets like "apple,milk"
    "qa9": ("no", "yes"),  # simple negation
    "qa10": ("maybe", "no", "yes"),  # indefinite knowledge
}
"""The answer labels of each task, as the BABILong benchmark's metric defines them (qa5 names capitalized
as in the data; matching ignores case)."""

BABILONG_TEMPLATE = "<context>\n{input}\n</context>\nQuestion: {question}"
"""BABILong's prompt template with empty instruction, examples and post-prompt."""


class BabilongUnavailableError(OSError):
    """The Hub copy of BABILong can be neither downloaded nor found in the cache."""


def _check_names(length: str, task: str) -> None:
    if length not in BABILONG_LENGTHS:
        raise ValueError(f"Unknown BABILong length {length!r}: use one of {', '.join(BABILONG_LENGTHS)}.")
    if task not in BABILONG_TASKS:
        raise ValueError(f"Unknown BABILong task {task!r}: use one of {', '.join(BABILONG_TASKS)}.")


def _local_files(source: Path, length: str, task: str) -> tuple[str, list[Path]]:
    """The loader (`json` or `parquet`) and the files of one config/split in a local copy."""
    folder = source / length
    for name in (f"{task}.json", f"{task}.jsonl"):
        if (folder / name).is_file():
            return "json", [folder / name]
    for pattern in (f"{task}.parquet", f"{task}-*.parquet"):
        if files := sorted(folder.glob(pattern)):
            return "parquet", files
    if files := sorted((source / task).glob(f"{length}-*.parquet")):  # an older Hub layout
        return "parquet", files
    raise FileNotFoundError(
        f"No BABILong {length}/{task} under {source}: expected {folder}/{task}.json (JSON lines with fields "
        f"{', '.join(BABILONG_FIELDS)}), {task}.jsonl, {task}.parquet or the Hub's {task}-*.parquet files."
    )


def load_babilong(
    length: str = "0k", task: str = "qa1", source: str | Path | None = None, **load_kwargs
) -> datasets.Dataset:
    """The rows (input, question, target) of one BABILong length and task.

    With `source=None` it reads `RMT-team/babilong` from the Hub or the `datasets` cache; otherwise the local
    folder `source` (see the module docstring for its layout). `load_kwargs` go to `datasets.load_dataset`
    (e.g. `cache_dir`)."""
    _check_names(length, task)
    if source is None:
        try:
            dataset = datasets.load_dataset(BABILONG_HUB_ID, length, split=task, **load_kwargs)
        except OSError as error:  # offline (ConnectionError) or not found / not cached (FileNotFoundError)
            raise BabilongUnavailableError(
                f"Could not load {BABILONG_HUB_ID} ({length}/{task}) from the Hugging Face Hub or the local cache "
                f"({type(error).__name__}: {error}). Where there is network, run `hf download {BABILONG_HUB_ID} "
                f"--repo-type dataset --local-dir DIR` (or write DIR/{length}/{task}.json as JSON lines with "
                f"fields {', '.join(BABILONG_FIELDS)}), then call load_babilong({length!r}, {task!r}, source=DIR)."
            ) from error
    else:
        source = Path(source)
        if not source.is_dir():
            raise FileNotFoundError(
                f"BABILong source {source} is not a folder (expected {source}/{length}/{task}.json)."
            )
        builder, files = _local_files(source, length, task)
        dataset = datasets.load_dataset(builder, data_files=[str(path) for path in files], split="train", **load_kwargs)
    missing = [field for field in BABILONG_FIELDS if field not in dataset.column_names]
    if missing:
        raise ValueError(f"BABILong {length}/{task} has no field(s) {missing} (columns: {dataset.column_names}).")
    return dataset


def babilong_prompt(row: Mapping[str, str], template: str = BABILONG_TEMPLATE) -> str:
    """The text a model reads for one row: its input, then its question (no instruction, no examples)."""
    return template.format(input=row["input"].strip(), question=row["question"].strip()).strip()


def _first_sentence(output: str) -> str:
    """The lowercased output up to its first '.', or an '<example>' / '<context>' tag the model repeats."""
    return re.split(r"\.|<example>|<context>", output.lower(), maxsplit=1)[0]


def _mentioned(labels: set[str], text: str) -> set[str]:
    """The labels that occur in `text` as whole words."""
    return {label for label in labels if re.search(rf"\b{re.escape(label)}\b", text)}


def babilong_correct(output: str, target: str, question: str, task: str, labels: Sequence[str] | None = None) -> bool:
    """BABILong's answer rule: lowercase `output` and keep its first sentence; it is correct iff `target` is
    the only label of the task's set it mentions, ignoring labels named in `question`.

    Labels match as whole words (so qa7's "none" does not also count as "one", nor qa6's "no" inside "not").
    A comma-separated target (qa8: "apple,milk") must be exactly the labels mentioned. `labels` overrides
    the task's label set."""
    if labels is None:
        if task not in BABILONG_LABELS:
            raise ValueError(f"Unknown BABILong task {task!r}: use one of {', '.join(BABILONG_LABELS)}.")
        labels = BABILONG_LABELS[task]
    label_set = {label.lower() for label in labels}
    found = _mentioned(label_set, _first_sentence(output)) - _mentioned(label_set, question.lower())
    target = target.lower().strip()
    wanted = {target} if target in label_set else {part.strip() for part in target.split(",")}
    return bool(found) and found == wanted
