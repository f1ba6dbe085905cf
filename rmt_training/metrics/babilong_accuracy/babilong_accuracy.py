"""BABILong answer accuracy as an `evaluate` metric.

Self-contained on purpose: `evaluate.load(path)` copies this script into its modules cache and imports it
from there, so it cannot import `modeling_rmt`. The label table and the rule below duplicate
`rmt_training.babilong` (`BABILONG_LABELS`, `babilong_correct`); the tests check that both agree.

Usage::

    metric = evaluate.load("rmt_training/metrics/babilong_accuracy")
    metric.compute(predictions=outputs, references=targets, questions=questions, task="qa1")
"""

from __future__ import annotations

import re

import datasets
import evaluate

_CITATION = """\
@inproceedings{kuratov2024babilong,
  title={BABILong: Testing the Limits of LLMs with Long Context Reasoning-in-a-Haystack},
  author={Kuratov, Yuri and Bulatov, Aydar and Anokhin, Petr and Rodkin, Ivan and Sorokin, Dmitry
          and Sorokin, Artyom and Burtsev, Mikhail},
  booktitle={Advances in Neural Information Processing Systems},
  year={2024}
}
"""

_DESCRIPTION = """\
BABILong accuracy: the output is lowercased and cut to its first sentence (up to the first '.', or an
'<example>' / '<context>' tag the model starts to repeat); it is correct iff the target is the only label
of the task's label set it mentions, labels named in the question being ignored. Labels match as whole
words. A comma-separated target (qa8: 'apple,milk') needs exactly its labels.
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (list of str): the model outputs.
    references (list of str): the targets.
    questions (list of str, optional): the questions; labels they mention are ignored in the output.
    task (str or list of str, default "qa1"): the bAbI task (qa1..qa10) of all samples, or one per sample.
    labels (list of str, optional): a label set to use instead of the task's.
Returns:
    accuracy (float): the fraction of correct outputs.
Examples:
    >>> metric = evaluate.load("rmt_training/metrics/babilong_accuracy")
    >>> metric.compute(predictions=["The kitchen."], references=["kitchen"], questions=["Where is Mary?"])
    {'accuracy': 1.0}
"""

PLACES = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
LABELS: dict[str, tuple[str, ...]] = {
    "qa1": PLACES,
    "qa2": PLACES,
    "qa3": PLACES,
    "qa4": PLACES,
    "qa5": ("Bill", "Fred", "Jeff", "Mary", "apple", "football", "milk"),
    "qa6": ("no", "yes"),
    "qa7": ("none", "one", "two", "three"),
    "qa8": ("apple", "football", "milk", "nothing"),
    "qa9": ("no", "yes"),
    "qa10": ("maybe", "no", "yes"),
}


def first_sentence(output: str) -> str:
    """The lowercased output up to its first '.', or an '<example>' / '<context>' tag."""
    return re.split(r"\.|<example>|<context>", output.lower(), maxsplit=1)[0]


def mentioned(labels: set[str], text: str) -> set[str]:
    """The labels that occur in `text` as whole words."""
    return {label for label in labels if re.search(rf"\b{re.escape(label)}\b", text)}


def is_correct(output: str, target: str, question: str, labels: tuple[str, ...] | list[str]) -> bool:
    """The BABILong rule for one output."""
    label_set = {label.lower() for label in labels}
    found = mentioned(label_set, first_sentence(output)) - mentioned(label_set, question.lower())
    target = target.lower().strip()
    wanted = {target} if target in label_set else {part.strip() for part in target.split(",")}
    return bool(found) and found == wanted


class BabilongAccuracy(evaluate.Metric):
    """BABILong answer accuracy (the rule of the BABILong benchmark's `compare_answers`)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            reference_urls=["https://github.com/booydar/babilong"],
        )

    def _compute(
        self,
        predictions: list[str],
        references: list[str],
        questions: list[str] | None = None,
        task: str | list[str] = "qa1",
        labels: list[str] | None = None,
    ) -> dict[str, float]:
        count = len(predictions)
        questions = [""] * count if questions is None else list(questions)
        tasks = [task] * count if isinstance(task, str) else list(task)
        if len(questions) != count or len(tasks) != count:
            raise ValueError(f"Got {count} predictions, {len(questions)} questions and {len(tasks)} tasks.")
        unknown = sorted({name for name in tasks if name not in LABELS}) if labels is None else []
        if unknown:
            raise ValueError(f"Unknown BABILong task(s) {unknown}: use one of {list(LABELS)} or pass labels=.")
        correct = [
            is_correct(output, target, question, LABELS[name] if labels is None else labels)
            for output, target, question, name in zip(predictions, references, questions, tasks, strict=True)
        ]
        return {"accuracy": sum(correct) / count if count else 0.0}
