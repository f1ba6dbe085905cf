"""Cells list the documents answered wrong, and two cells on the same documents compare document by document."""

from __future__ import annotations

import json
import math

import pytest

from rmt_training import evaluate_lengths
from rmt_training.paired import comparable_pairs, main, mcnemar_exact, paired_comparison


def cell(noise: str, dtype: str, wrong: list[int] | None, samples: int = 10) -> dict:
    entry = {"task": "qa1", "num_tokens": 1024, "samples": samples, "noise": noise, "dtype": dtype,
             "correct": samples - len(wrong or [])}  # fmt: skip
    return entry if wrong is None else {**entry, "wrong": wrong}


def test_mcnemar_exact_matches_the_binomial_tail():
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9) == pytest.approx(2 * (1 + 10) / 2**10)
    by_hand = 2 * sum(math.comb(12, k) for k in range(3)) / 2**12
    assert mcnemar_exact(2, 10) == pytest.approx(by_hand)


def test_paired_comparison_counts_each_kind_of_document():
    comparison = paired_comparison(cell("milton", "float32", [1, 2]), cell("milton", "float16", [2, 5, 7, 8]))
    assert comparison["both_right"] == 5 and comparison["both_wrong"] == 1
    assert comparison["only_first"] == 3 and comparison["only_second"] == 1
    assert comparison["p_value"] == pytest.approx(mcnemar_exact(3, 1))


def test_cells_without_a_list_of_wrong_documents_are_refused_or_skipped(tmp_path, capsys):
    with pytest.raises(ValueError, match="lists no documents answered wrong: measure it again"):
        paired_comparison(cell("milton", "float32", None), cell("milton", "float16", [1]))
    with pytest.raises(ValueError, match="same task, length and number of documents"):
        paired_comparison(cell("milton", "float32", [1]), cell("milton", "float16", [1], samples=20))
    cells = [cell("milton", "float32", None), cell("milton", "bfloat16", [0]), cell("python_docs", "bfloat16", [0, 3])]
    results = {"evaluation": [*cells, cell("milton", "float16", [], samples=20)]}
    (pair,) = comparable_pairs(results)
    assert {pair[0]["noise"], pair[1]["noise"]} == {"milton", "python_docs"}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    (printed,) = main([str(path)])
    assert printed["only_first"] == 1 and "milton/bfloat16 vs python_docs/bfloat16" in capsys.readouterr().out


def test_an_evaluated_cell_lists_its_wrong_documents_and_keeps_them_across_a_resume(monkeypatch):
    def every_third_wrong(model, tokenizer, batch):
        return [index % 3 != 0 for index in batch]

    monkeypatch.setattr(evaluate_lengths, "classifier_verdicts", every_third_wrong)
    monkeypatch.setattr(evaluate_lengths, "cell_samples", lambda *args: list(args[5]))  # the indices
    kept = []
    correct, _, wrong = evaluate_lengths.evaluate_cell(object(), None, None, "memorize", 64, 10, 4, 1,
                                                       on_batch=kept.append)  # fmt: skip
    assert wrong == [0, 3, 6, 9] and correct == 6
    resumed = evaluate_lengths.evaluate_cell(object(), None, None, "memorize", 64, 10, 4, 1, kept[0])
    assert resumed[0] == 6 and resumed[2] == [0, 3, 6, 9]
    older = {key: kept[0][key] for key in ("done", "correct", "seconds")}  # kept by a version without `wrong`
    fresh = {"done": 0, "correct": 0, "seconds": 0.0}
    assert evaluate_lengths.evaluate_cell(object(), None, None, "memorize", 64, 10, 4, 1, fresh)[2] == [0, 3, 6, 9]
    assert evaluate_lengths.evaluate_cell(object(), None, None, "memorize", 64, 10, 4, 1, older)[2] is None
