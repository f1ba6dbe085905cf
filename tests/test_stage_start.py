"""A curriculum stage ended by validation hands the next stage its best validated weights (the report's recipe),
kept across a resume, a snapshot, and checkpoints written by older code; the last stage ends the run the same
way, so the final model is that stage's best."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_training import run_args, tiny_backbone  # noqa: F401 (a fixture)
from transformers import TrainerControl, TrainerState, TrainingArguments

from rmt_training.curriculum import STAGE_BEST_FILE, Curriculum, CurriculumCallback
from rmt_training.run_record import last_stage, stage_rows
from rmt_training.snapshot import main as snapshot_main
from rmt_training.train import main as train_main

# Validation at steps 2, 4, ...; the tiny model stays at chance, so step 2 is its stage's best and step 4,
# with no gain and a patience of 1, ends the stage. Training goes on in between: steps 3 and 4 change the weights.
PLATEAU = ["--max-steps", "6", "--stages", "1", "2", "--advance-at", "1.0", "--patience", "1"]


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in actual:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0)


def test_observe_records_the_step_of_the_stages_best_and_advance_hands_it_to_the_history():
    plan = Curriculum([1, 2], advance_at=0.9, patience=2, min_delta=0.01)
    plan.observe(0.5, step=10)
    plan.observe(0.505, step=20)  # better, though not by min_delta: still the best weights
    assert (plan.best, plan.best_step, plan.evaluations_without_gain) == (0.505, 20, 1)
    assert plan.observe(0.4, step=30) and plan.history[0]["best_step"] == 20 and plan.best_step is None
    assert not plan.observe(0.3, step=40) and not plan.observe(0.3, step=50) and plan.ended is None
    assert not plan.observe(0.3, step=60) and plan.ended["reason"] == "plateau at 0.3000"  # the last stage ends
    assert plan.num_segments == 2 and (plan.ended["step"], plan.ended["best_step"]) == (60, 40)
    with pytest.raises(ValueError, match="stage_start must be one of"):
        Curriculum([1], stage_start="first")


def test_a_plateau_hands_the_next_stage_its_best_weights_and_a_resumed_run_ends_as_an_uninterrupted_one(
    tiny_backbone,  # noqa: F811
    tmp_path,
):
    whole = train_main(run_args(tiny_backbone, tmp_path / "whole", *PLATEAU))
    ended = Curriculum.load(whole).history[0]
    assert (ended["step"], ended["best_step"], ended["weights_from_step"]) == (4, 2, 2)
    first_row = stage_rows(json.loads((whole / "curriculum.json").read_text()), 6)[0]  # as the card shows it
    assert first_row["reason"].startswith("plateau at")
    assert first_row["reason"].endswith(" (the next stage started from step 2's weights, the stage's best)")

    run = tmp_path / "parts"
    train_main(run_args(tiny_backbone, run, *PLATEAU, "--stop-at-step", "3"))
    best = load_file(run / "checkpoint-2" / "model.safetensors")
    assert_same_weights(load_file(run / "checkpoint-3" / STAGE_BEST_FILE), best)  # kept beside step 3's own
    assert not (run / "checkpoint-2" / STAGE_BEST_FILE).exists()  # step 2's own weights are the best
    train_main(run_args(tiny_backbone, run, *PLATEAU, "--stop-at-step", "4"))  # resumed: the stage ends at 4
    assert_same_weights(load_file(run / "checkpoint-4" / "model.safetensors"), best)
    final = train_main(run_args(tiny_backbone, run, *PLATEAU))
    assert Curriculum.load(final) == Curriculum.load(whole)
    assert_same_weights(load_file(final / "model.safetensors"), load_file(whole / "model.safetensors"))

    last = train_main(run_args(tiny_backbone, tmp_path / "last", *PLATEAU, "--stage-start", "last"))
    assert Curriculum.load(last).history[0]["weights_from_step"] == 4
    handed_on_last, handed_on_best = load_file(last / "model.safetensors"), load_file(final / "model.safetensors")
    assert any(not torch.equal(handed_on_last[name], tensor) for name, tensor in handed_on_best.items())


def test_a_snapshot_carries_the_stages_best_weights_in_float16(tiny_backbone, tmp_path):  # noqa: F811
    part = train_main(run_args(tiny_backbone, tmp_path / "first", *PLATEAU, "--stop-at-step", "3"))
    snapshot = snapshot_main(["save", str(part), str(tmp_path / "snapshot")])
    kept = load_file(snapshot / STAGE_BEST_FILE)
    assert {tensor.dtype for tensor in kept.values() if tensor.is_floating_point()} == {torch.float16}
    restored = snapshot_main(["restore", str(snapshot), str(tmp_path / "second")])
    best, saved = load_file(restored / STAGE_BEST_FILE), load_file(part / "checkpoint-3" / STAGE_BEST_FILE)
    for name in saved:
        assert best[name].dtype == saved[name].dtype
        torch.testing.assert_close(best[name], saved[name], rtol=1e-3, atol=1e-4)
    final = train_main(run_args(tiny_backbone, tmp_path / "second", *PLATEAU, "--stop-at-step", "4"))
    assert Curriculum.load(final / "checkpoint-4").history[0]["weights_from_step"] == 2
    assert_same_weights(load_file(final / "checkpoint-4" / "model.safetensors"), best)


def test_a_lora_run_keeps_only_the_weights_it_trains_as_its_stages_best(tiny_backbone, tmp_path):  # noqa: F811
    pytest.importorskip("peft")
    lora = [*PLATEAU, "--lora-r", "4", "--lora-alpha", "8"]
    whole = train_main(run_args(tiny_backbone, tmp_path / "whole", *lora))
    assert Curriculum.load(whole).history[0]["weights_from_step"] == 2
    run = train_main(run_args(tiny_backbone, tmp_path / "parts", *lora, "--stop-at-step", "3"))
    kept = load_file(run / "checkpoint-3" / STAGE_BEST_FILE)
    assert kept and all("lora_" in name or "memory" in name or "classifier" in name for name in kept)
    assert not any("base_layer" in name for name in kept)  # the frozen backbone is never copied
    final = train_main(run_args(tiny_backbone, run, *lora))
    assert Curriculum.load(final) == Curriculum.load(whole)
    reference = load_file(whole / "model.safetensors")
    for name, value in load_file(final / "model.safetensors").items():
        torch.testing.assert_close(value, reference[name], rtol=1e-5, atol=1e-6)


def test_the_last_stage_ends_on_a_plateau_and_the_final_model_is_its_best(tiny_backbone, tmp_path):  # noqa: F811
    common = ["--max-steps", "8", "--stages", "1", "--advance-at", "1.0", "--patience", "1"]
    final = train_main(run_args(tiny_backbone, tmp_path / "run", *common))
    ended = Curriculum.load(final).ended
    assert (ended["step"], ended["best_step"], ended["weights_from_step"]) == (4, 2, 2)  # stopped at 4 of 8 steps
    steps = [entry["step"] for entry in json.loads((final / "log_history.json").read_text()) if "loss" in entry]
    assert max(steps) == 4
    assert_same_weights(
        load_file(final / "model.safetensors"), load_file(final.parent / "checkpoint-2" / "model.safetensors")
    )
    [row] = last_stage(json.loads((final / "curriculum.json").read_text()), 4)
    assert row["step"] == 4 and "the curriculum is done (the final model is step 2's weights" in row["reason"]

    # Killed after the last checkpoint, before final/ was written: a rerun saves that checkpoint's model, untrained.
    first = final.rename(tmp_path / "first-final")
    again = train_main(run_args(tiny_backbone, tmp_path / "run", *common))
    assert_same_weights(load_file(again / "model.safetensors"), load_file(first / "model.safetensors"))
    history, kept = (json.loads((folder / "log_history.json").read_text()) for folder in (first, again))
    assert kept == [entry for entry in history if "train_runtime" not in entry]  # all but the trainer's summary


def test_an_ended_last_stage_given_more_stages_goes_on_from_its_best_weights(tiny_backbone, tmp_path):  # noqa: F811
    one = ["--max-steps", "8", "--stages", "1", "--advance-at", "1.0", "--patience", "1"]
    run = train_main(run_args(tiny_backbone, tmp_path / "run", *one, "--stop-at-step", "4"))  # it ends at step 4
    best = load_file(run / "checkpoint-2" / "model.safetensors")
    assert_same_weights(load_file(run / "checkpoint-4" / "model.safetensors"), best)
    final = train_main(run_args(tiny_backbone, run, *one[:2], "--stages", "1", "2", *one[4:]))
    plan = Curriculum.load(final)
    assert plan.stages == [1, 2] and plan.num_segments == 2
    assert (plan.ended["step"], plan.ended["weights_from_step"]) == (8, 6)  # the new last stage ends in its turn
    assert [(entry["step"], entry["weights_from_step"]) for entry in plan.history] == [(4, 2)]
    steps = [entry["step"] for entry in json.loads((final / "log_history.json").read_text()) if "loss" in entry]
    assert max(steps) == 8  # trained on after step 4


def evaluate(callback: CurriculumCallback, model: torch.nn.Module, step: int, accuracy: float) -> None:
    state = TrainerState(global_step=step)
    callback.on_evaluate(TrainingArguments("unused", report_to=[]), state, TrainerControl(),
                         metrics={"eval_accuracy": accuracy}, model=model)  # fmt: skip


def test_a_checkpoint_of_older_code_without_the_best_weights_goes_on_from_the_last(tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint-725"
    checkpoint.mkdir()
    plan = Curriculum([5, 7], patience=1, best=0.87, best_step=700)  # best at 700, weights not kept
    callback = CurriculumCallback(plan, resumed_from=checkpoint)
    model = torch.nn.Linear(2, 2)
    callback.on_train_begin(None, None, TrainerControl(), model=model)
    assert callback.best_weights is None
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    evaluate(callback, model, 750, 0.86)
    assert plan.num_segments == 7 and plan.history[0]["weights_from_step"] == 750
    assert_same_weights(model.state_dict(), before)
    assert "were not kept" in capsys.readouterr().out

    # The checkpoint's own weights are the best: they are the ones handed on.
    plan = Curriculum([5, 7], patience=1, best=0.87, best_step=725)
    callback = CurriculumCallback(plan, resumed_from=checkpoint)
    callback.on_train_begin(None, None, TrainerControl(), model=model)
    with torch.no_grad():
        model.weight.add_(1.0)
    evaluate(callback, model, 750, 0.86)
    assert plan.history[0]["weights_from_step"] == 725
    assert_same_weights(model.state_dict(), before)
    assert json.loads(json.dumps(plan.history))  # the record stays plain JSON
