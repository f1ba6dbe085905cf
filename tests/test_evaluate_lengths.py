"""evaluate_lengths: accuracy against length, cell by cell and resumable; each cell's wrong documents, and two cells
on the same documents compared document by document (rmt_training.paired)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_training import SEGMENT, run_args, tiny_backbone  # noqa: F401 (a fixture)
from transformers import AutoTokenizer

from rmt_tools.backbones import minilm_path
from rmt_training import evaluate_lengths
from rmt_training.paired import comparable_pairs, mcnemar_exact, paired_comparison
from rmt_training.paired import main as paired_main
from rmt_training.tasks import HELD_OUT_SEED, VALIDATION_SEED_OFFSET, TokenizedNoise
from rmt_training.train import main as train_main


def cell(noise: str, dtype: str, wrong: list[int] | None, samples: int = 10) -> dict:
    entry = {"task": "qa1", "num_tokens": 1024, "samples": samples, "noise": noise, "dtype": dtype,
             "correct": samples - (0 if wrong is None else len(wrong))}  # fmt: skip
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
    identity = {"tensors_sha256": "ab", "seed": 1}
    card, rerun = tmp_path / "card.json", tmp_path / "rerun.json"
    card.write_text(json.dumps({"evaluated": identity, "evaluation": results["evaluation"][:2]}))
    rerun.write_text(json.dumps({"evaluated": identity, "evaluation": results["evaluation"][2:]}))
    (printed,) = paired_main([str(card), str(rerun)])  # a cell measured again into a file of its own pairs too
    assert printed["only_first"] == 1 and "milton/bfloat16 vs python_docs/bfloat16" in capsys.readouterr().out
    rerun.write_text(json.dumps({"evaluated": {**identity, "seed": 2}, "evaluation": results["evaluation"][2:]}))
    with pytest.raises(SystemExit, match="another checkpoint or seed"):
        paired_main([str(card), str(rerun)])


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


def test_length_evaluation_is_resumable_and_feeds_a_model_card(tiny_backbone, tmp_path):  # noqa: F811
    from model_cards.generate import render_card, validate
    from rmt_training.evaluate_lengths import main as evaluate_main
    from rmt_training.evaluate_lengths import wilson_interval

    final = train_main(run_args(tiny_backbone, tmp_path / "rmt-tiny", "--max-steps", "2", "--stages", "1"))
    assert json.loads((final / "run_time.json").read_text())["untimed_steps"] == 0
    # as if resumed after step 1 from a checkpoint of code that kept no clock
    (final / "run_time.json").write_text(json.dumps({"seconds": 5400.0, "untimed_steps": 1}))
    results_path = tmp_path / "results.json"
    common = [str(final), "--results", str(results_path), "--tasks", "memorize", "--batch-size", "3"]
    first = evaluate_main([*common, "--segments", "1", "--samples", "5", "--run", str(final)])
    assert first["name"] == "rmt-tiny" and first["model_class"] == "RMTForSequenceClassification"
    assert first["training"]["hours"] == 1.5 and first["training"]["hours_from_step"] == 2
    assert "--stages 1" in first["training"]["command"] and first["training"]["steps"] == 2
    (cell,) = first["evaluation"]
    assert cell["num_tokens"] == SEGMENT and cell["samples"] == 5 and cell["noise"] == "milton"
    assert cell["accuracy"] == cell["correct"] / 5 and cell["ci95"] == list(wilson_interval(cell["correct"], 5))
    cell["seconds"] = -1.0  # a marker: a rerun must keep finished cells, not recompute them
    results_path.write_text(json.dumps(first))
    second = evaluate_main([*common, "--segments", "1", "3", "--samples", "5", "4"])
    assert [(c["segments"], c["samples"]) for c in second["evaluation"]] == [(1, 5), (3, 4)]
    assert second["evaluation"][0]["seconds"] == -1.0
    card = render_card(validate(json.loads(results_path.read_text())))
    assert "rmt-tiny" in card and f"{3 * SEGMENT:,}" in card
    assert "1.5 h (steps 2 to 2; the parts before were not timed)" in card
    assert "Precision" not in card  # a clock of older code records no precision: none is claimed
    kept = results_path.read_text()
    with pytest.raises(SystemExit, match="another seed"):  # cells of another measurement never mix in
        evaluate_main([*common, "--segments", "2", "--samples", "2", "--seed", "7"])
    other = evaluate_main([*common, "--segments", "1", "--samples", "3", "--noise", "python_docs"])  # another genre
    assert [(c["noise"], c["samples"]) for c in other["evaluation"]] == [
        ("milton", 5),
        ("milton", 4),
        ("python_docs", 3),
    ]
    mixed = render_card(validate(other))  # one curve per (task, noise): the table's columns, the plot's lines
    assert "| tokens | segments | memorize, milton | memorize, python_docs |" in mixed
    assert "the Python documentation" in mixed and "the Python documentation" not in card
    results_path.write_text(kept)
    with pytest.raises(SystemExit, match="validation seed of a run trained with --seed 0"):  # not held out
        evaluate_main([str(final), "--results", str(tmp_path / "leak.json"), "--segments", "1", "--samples", "2",
                       "--run", str(final), "--seed", str(VALIDATION_SEED_OFFSET)])  # fmt: skip
    assert results_path.read_text() == kept and not (tmp_path / "leak.json").exists()
    with pytest.raises(SystemExit, match="training seed"):  # a run whose training documents are evaluation's
        train_main(run_args(tiny_backbone, tmp_path / "leaky", "--seed", str(HELD_OUT_SEED)))
    assert not (tmp_path / "leaky").exists()


def test_wilson_interval_covers_the_measured_accuracy():
    from rmt_training.evaluate_lengths import wilson_interval

    low, high = wilson_interval(95, 100)
    assert low < 0.95 < high and 0.88 < low < 0.9 and 0.97 < high < 0.99
    assert wilson_interval(8, 8)[1] == 1.0 and wilson_interval(8, 8)[0] > 0.6


def test_decoder_answers_are_generated_from_left_padded_prompts_and_scored_by_the_babilong_rule():
    from rmt_training.decoder import end_token_id
    from rmt_training.evaluate_lengths import decoder_correct, decoder_verdicts
    from rmt_training.tasks import make_sample

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    noise = TokenizedNoise(tokenizer, "milton")
    batch = [make_sample("qa1", noise, tokenizer, 60 + 7 * i, seed=5, index=i) for i in range(4)]
    seen = {}

    class Answering(torch.nn.Module):  # answers right on even rows and names another place on odd rows
        device = torch.device("cpu")

        def generate(self, input_ids, attention_mask, **kwargs):
            seen.update(mask=attention_mask, kwargs=kwargs)
            answers = [s.target if i % 2 == 0 else ("garden" if s.target != "garden" else "office")
                       for i, s in enumerate(batch)]  # fmt: skip
            ids = tokenizer([f" the {a}." for a in answers], add_special_tokens=False, padding=True,
                            return_tensors="pt")["input_ids"]  # fmt: skip
            return torch.cat([input_ids, ids, torch.full((len(batch), 1), end_token_id(tokenizer))], dim=1)

    assert decoder_correct(Answering(), tokenizer, batch) == 2
    assert decoder_verdicts(Answering(), tokenizer, batch) == [True, False, True, False]
    lengths = [len(s.input_ids) for s in batch]
    assert seen["mask"].sum(1).tolist() == lengths and (seen["mask"][:, -1] == 1).all()  # padded on the left
    assert seen["kwargs"]["do_sample"] is False and seen["kwargs"]["eos_token_id"] == end_token_id(tokenizer)


def test_an_interrupted_length_cell_goes_on_from_its_last_batch(tiny_backbone, tmp_path, monkeypatch):  # noqa: F811
    from rmt_training import evaluate_lengths

    final = train_main(run_args(tiny_backbone, tmp_path / "rmt-tiny", "--max-steps", "2", "--stages", "1"))
    common = [str(final), "--tasks", "memorize", "--segments", "2", "--samples", "7", "--batch-size", "3"]
    whole = evaluate_lengths.main([*common, "--results", str(tmp_path / "whole.json")])["evaluation"][0]
    calls, score = [], evaluate_lengths.classifier_verdicts

    def stopped_after_two_batches(*args):
        calls.append(len(args[2]))
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if the process were stopped
        return score(*args)

    monkeypatch.setattr(evaluate_lengths, "classifier_verdicts", stopped_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        evaluate_lengths.main([*common, "--results", str(tmp_path / "cut.json")])
    (kept,) = json.loads((tmp_path / "cut.json").read_text())["unfinished"]
    assert kept["done"] == 6 and kept["cell"]["samples"] == 7 and not json.loads(
        (tmp_path / "cut.json").read_text()).get("evaluation")  # fmt: skip
    calls.clear()
    resumed = evaluate_lengths.main([*common, "--results", str(tmp_path / "cut.json")])
    assert calls == [1]  # only the document not yet scored
    assert resumed["evaluation"][0]["correct"] == whole["correct"] and "unfinished" not in resumed
    assert resumed["evaluation"][0]["wrong"] == whole["wrong"]  # the resumed cell lists every wrong document
    assert len(whole["wrong"]) == 7 - whole["correct"] and set(whole["wrong"]) <= set(range(7))
