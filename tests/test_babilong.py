"""BABILong loading (local fixture, name checks, offline Hub) and its answer metric."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import datasets
import huggingface_hub
import pytest

from rmt_training.babilong import (
    BABILONG_LABELS,
    BABILONG_LENGTHS,
    BABILONG_METRIC_PATH,
    BABILONG_TASKS,
    BabilongUnavailableError,
    babilong_correct,
    babilong_prompt,
    load_babilong,
)

FIXTURE = Path(__file__).parent / "fixtures" / "babilong"
METRIC_SCRIPT = BABILONG_METRIC_PATH / "babilong_accuracy.py"


@pytest.mark.parametrize(("length", "rows"), [("0k", 8), ("1k", 6)])
def test_fixture_loads(length, rows):
    dataset = load_babilong(length, "qa1", source=FIXTURE)
    assert isinstance(dataset, datasets.Dataset)
    assert dataset.column_names == ["input", "question", "target"]
    assert dataset.num_rows == rows
    for row in dataset:
        assert row["question"].startswith("Where is ")
        assert row["target"] in BABILONG_LABELS["qa1"]
        assert row["question"][len("Where is ") : -1] in row["input"]  # the person asked about is in the facts
    if length == "1k":
        assert min(len(row["input"]) for row in dataset) > 3000


def test_fixture_1k_holds_the_0k_facts_in_order():
    short, long = load_babilong("0k", "qa1", source=FIXTURE), load_babilong("1k", "qa1", source=FIXTURE)
    for plain, hidden in zip(short.select(range(long.num_rows)), long, strict=True):
        assert (plain["question"], plain["target"]) == (hidden["question"], hidden["target"])
        facts = [fact.strip() + "." for fact in plain["input"].split(".") if fact.strip()]
        positions = [hidden["input"].index(fact) for fact in facts]
        assert positions == sorted(positions)


def test_local_parquet_in_hub_layout(tmp_path):
    rows = load_babilong("0k", "qa1", source=FIXTURE)
    (tmp_path / "0k").mkdir()
    rows.to_parquet(tmp_path / "0k" / "qa1-00000-of-00001.parquet")
    rows.select(range(2)).to_parquet(tmp_path / "0k" / "qa10-00000-of-00001.parquet")  # must not match qa1
    assert load_babilong("0k", "qa1", source=tmp_path).to_list() == rows.to_list()
    assert load_babilong("0k", "qa10", source=tmp_path).num_rows == 2


def test_missing_local_split_and_fields(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No BABILong 0k/qa2 .*qa2\.json"):
        load_babilong("0k", "qa2", source=FIXTURE)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_babilong("0k", "qa1", source=tmp_path / "nowhere")
    (tmp_path / "0k").mkdir()
    (tmp_path / "0k" / "qa1.json").write_text('{"input": "Mary went to the office.", "answer": "office"}\n')
    with pytest.raises(ValueError, match=r"no field\(s\) \['question', 'target'\]"):
        load_babilong("0k", "qa1", source=tmp_path)


@pytest.mark.parametrize(
    ("length", "task", "message"),
    [("3k", "qa1", "Unknown BABILong length '3k': use one of 0k, 1k, 2k"), ("1m", "qa1", "512k, 1M"),
     ("0k", "qa11", "Unknown BABILong task 'qa11': use one of qa1, qa2"), ("0k", "train", "qa9, qa10")],
)  # fmt: skip
def test_bad_names(length, task, message):
    with pytest.raises(ValueError, match=message):
        load_babilong(length, task, source=FIXTURE)
    with pytest.raises(ValueError, match=message):
        load_babilong(length, task)  # checked before any Hub access


def test_offline_hub_without_cache_says_how_to_pass_a_local_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(BabilongUnavailableError, match=r"RMT-team/babilong \(2k/qa3\).*source=DIR") as caught:
        load_babilong("2k", "qa3", cache_dir=str(tmp_path))
    assert "hf download RMT-team/babilong --repo-type dataset" in str(caught.value)
    assert isinstance(caught.value, OSError)


def test_names_and_labels_tables():
    assert BABILONG_LENGTHS == ("0k", "1k", "2k", "4k", "8k", "16k", "32k", "64k", "128k", "256k", "512k", "1M")
    assert set(BABILONG_LABELS) == set(BABILONG_TASKS) == {f"qa{i}" for i in range(1, 11)}
    assert BABILONG_LABELS["qa1"] == ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
    assert BABILONG_LABELS["qa2"] == BABILONG_LABELS["qa3"] == BABILONG_LABELS["qa4"] == BABILONG_LABELS["qa1"]
    assert set(BABILONG_LABELS["qa10"]) == {"yes", "no", "maybe"}


def test_prompt():
    row = {"input": "Mary moved to the bathroom. John went to the hallway. ", "question": "Where is Mary? "}
    assert babilong_prompt(row) == (
        "<context>\nMary moved to the bathroom. John went to the hallway.\n</context>\nQuestion: Where is Mary?"
    )
    assert babilong_prompt(row, "{input} {question}") == (
        "Mary moved to the bathroom. John went to the hallway. Where is Mary?"
    )


# (output, target, question, task, correct)
CASES = [
    ("kitchen", "kitchen", "Where is Mary?", "qa1", True),
    ("Mary is in the kitchen.", "kitchen", "Where is Mary?", "qa1", True),
    ("The most recent location of Mary is KITCHEN", "kitchen", "Where is Mary?", "qa1", True),  # any case
    ("Mary is in the Kitchen", "KITCHEN", "Where is Mary?", "qa1", True),
    ("Mary is in the kitchen or the garden.", "kitchen", "Where is Mary?", "qa1", False),  # extra label
    ("bathroom", "kitchen", "Where is Mary?", "qa1", False),
    ("I do not know.", "kitchen", "Where is Mary?", "qa1", False),
    ("", "kitchen", "Where is Mary?", "qa1", False),
    ("Kitchen. Before that she was in the garden.", "kitchen", "Where is Mary?", "qa1", True),  # first sentence
    ("Garden. Now she is in the kitchen.", "kitchen", "Where is Mary?", "qa1", False),
    ("kitchen <example> Where is John? garden", "kitchen", "Where is Mary?", "qa1", True),
    ("Before the kitchen the apple was in the office.", "office", "Where was the apple before the kitchen?",
     "qa3", True),  # label in the question ignored
    ("The apple was in the office", "kitchen", "Where was the apple before the kitchen?", "qa3", False),
    ("The garden is west of the bedroom", "garden", "What is west of the bedroom?", "qa4", True),
    ("Fred", "Fred", "Who did Mary give the apple to?", "qa5", True),  # Mary and apple ignored
    ("Mary gave it to Fred.", "Fred", "Who did Mary give the apple to?", "qa5", True),
    ("Jeff gave it to Fred", "Fred", "Who did Mary give the apple to?", "qa5", False),
    ("none", "none", "How many objects is Daniel carrying?", "qa7", True),  # not also "one"
    ("one", "none", "How many objects is Daniel carrying?", "qa7", False),
    ("apple, milk", "apple,milk", "What is Daniel carrying?", "qa8", True),
    ("milk and apple.", "apple,milk", "What is Daniel carrying?", "qa8", True),
    ("apple", "apple,milk", "What is Daniel carrying?", "qa8", False),
    ("apple, milk, football", "apple,milk", "What is Daniel carrying?", "qa8", False),
    ("nothing", "nothing", "What is Sandra carrying?", "qa8", True),
    ("Yes.", "yes", "Is John in the garden?", "qa6", True),
    ("No, he is not.", "no", "Is John in the garden?", "qa6", True),
    ("It is not known", "no", "Is John in the garden?", "qa6", False),  # "no" only as a word
    ("maybe", "maybe", "Is Mary in the school?", "qa10", True),
    ("Yes or no", "yes", "Is Bill in the cinema?", "qa10", False),
]  # fmt: skip


@pytest.mark.parametrize(("output", "target", "question", "task", "correct"), CASES)
def test_babilong_correct(output, target, question, task, correct):
    assert babilong_correct(output, target, question, task) is correct


def test_babilong_correct_labels_override_and_unknown_task():
    assert babilong_correct("the balcony", "balcony", "Where is Charlie?", "qa1", labels=["balcony", "shop"])
    assert not babilong_correct("the kitchen", "kitchen", "Where is Mary?", "qa1", labels=["balcony", "shop"])
    with pytest.raises(ValueError, match="Unknown BABILong task 'qa20'"):
        babilong_correct("kitchen", "kitchen", "Where is Mary?", "qa20")


def _script_module():
    spec = importlib.util.spec_from_file_location("babilong_accuracy_script", METRIC_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_metric_script_is_self_contained_and_matches_the_package():
    tree = ast.parse(METRIC_SCRIPT.read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported == {"__future__", "re", "datasets", "evaluate"}  # evaluate.load copies the script alone
    script = _script_module()
    assert script.LABELS == BABILONG_LABELS
    for output, target, question, task, correct in CASES:
        assert script.is_correct(output, target, question, script.LABELS[task]) is correct


@pytest.fixture(scope="module")
def metric(tmp_path_factory):
    import evaluate

    return evaluate.load(str(BABILONG_METRIC_PATH), cache_dir=str(tmp_path_factory.mktemp("metric_cache")))


def test_evaluate_load_agrees_with_babilong_correct(metric):
    for task in ("qa1", "qa3", "qa5", "qa7", "qa8", "qa10"):
        batch = [case for case in CASES if case[3] == task]
        outputs, targets, questions = ([case[index] for case in batch] for index in range(3))
        expected = sum(babilong_correct(*case[:4]) for case in batch) / len(batch)
        result = metric.compute(predictions=outputs, references=targets, questions=questions, task=task)
        assert result == {"accuracy": pytest.approx(expected)}
    outputs, targets, questions, tasks = ([case[index] for case in CASES] for index in range(4))
    result = metric.compute(predictions=outputs, references=targets, questions=questions, task=tasks)
    assert result["accuracy"] == pytest.approx(sum(case[4] for case in CASES) / len(CASES))


def test_evaluate_metric_without_questions_labels_and_errors(metric):
    assert metric.compute(predictions=["In the Kitchen."], references=["kitchen"]) == {"accuracy": 1.0}
    result = metric.compute(
        predictions=["balcony", "shop"], references=["balcony", "balcony"], labels=["balcony", "shop"]
    )
    assert result == {"accuracy": 0.5}
    with pytest.raises(ValueError, match=r"Unknown BABILong task\(s\) \['qa20'\]"):
        metric.compute(predictions=["kitchen"], references=["kitchen"], task="qa20")
    with pytest.raises(ValueError, match="2 predictions, 1 questions"):
        metric.compute(predictions=["a", "b"], references=["a", "b"], questions=["q"])
