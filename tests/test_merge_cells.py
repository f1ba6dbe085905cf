"""Finished cells of an evaluation kept in its own file move into the card's results JSON, and nothing else."""

from __future__ import annotations

import json

import pytest

from rmt_training.merge_cells import merge_cells


def cell(noise: str, dtype: str, correct: int) -> dict:
    return {"task": "qa1", "noise": noise, "num_tokens": 65536, "segments": 512, "samples": 100, "correct": correct,
            "accuracy": correct / 100, "ci95": [0.0, 1.0], "seconds": 1.0, "device": "cpu", "dtype": dtype}  # fmt: skip


def write(path, evaluated: dict, cells: list[dict], **extra) -> None:
    path.write_text(json.dumps({"name": path.stem, "evaluated": evaluated, "evaluation": cells, **extra}))


IDENTITY = {"tensors_sha256": "abc", "weights_sha256": "def", "seed": 2000003}


def test_finished_cells_move_and_the_cards_own_and_unfinished_ones_stay(tmp_path):
    source, target = tmp_path / "running.json", tmp_path / "card.json"
    card_cell = cell("milton", "bfloat16", 97)
    unfinished = [{"cell": {"task": "qa1", "noise": "milton", "dtype": "float32"}, "done": 8, "correct": 8}]
    write(source, IDENTITY, [cell("milton", "bfloat16", 50), cell("python_docs", "float32", 96)], unfinished=unfinished)
    write(target, IDENTITY, [card_cell])
    copied = merge_cells(source, target)
    merged = json.loads(target.read_text())
    assert copied == [cell("python_docs", "float32", 96)]
    assert merged["evaluation"] == [card_cell, cell("python_docs", "float32", 96)]  # sorted; the card's kept
    assert "unfinished" not in merged and merged["name"] == "card"
    assert merge_cells(source, target) == []  # a second merge copies nothing


def test_another_checkpoint_or_seed_is_refused(tmp_path):
    source, target = tmp_path / "running.json", tmp_path / "card.json"
    write(source, {**IDENTITY, "seed": 1}, [cell("python_docs", "float32", 96)])
    write(target, IDENTITY, [])
    with pytest.raises(SystemExit, match="different checkpoints or seeds \\(seed differ"):
        merge_cells(source, target)
    before = target.read_text()
    with pytest.raises(SystemExit, match="missing or empty"):
        merge_cells(tmp_path / "absent.json", target)
    assert target.read_text() == before
