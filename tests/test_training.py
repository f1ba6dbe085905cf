"""Curriculum learning, the training command line, resuming, and several processes under accelerate."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertConfig, BertModel, EvalPrediction

from rmt_tools.backbones import minilm_path
from rmt_training.curriculum import Curriculum, CurriculumTaskDataset
from rmt_training.tasks import TokenizedNoise, make_sample
from rmt_training.train import accuracy_by_task
from rmt_training.train import main as train_main

SEGMENT = 24  # content tokens per segment of the tiny runs
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory) -> Path:
    """A tiny random BERT with MiniLM's vocabulary and tokenizer, saved like a pretrained backbone."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=64)  # fmt: skip
    BertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(minilm_path())).save_pretrained(folder)
    return folder


def run_args(backbone: Path, output: Path, *extra: str) -> list[str]:
    return ["--output-dir", str(output), "--backbone", str(backbone), "--segment-size", str(SEGMENT),
            "--num-mem-tokens", "4", "--batch-size", "4", "--eval-size", "8", "--eval-steps", "2",
            "--save-steps", "2", "--logging-steps", "1", "--warmup-steps", "0", "--lr", "1e-3", "--no-progress",
            "--dropout", "0", *extra]  # fmt: skip


def logged_losses(final: Path) -> dict[int, float]:
    history = json.loads((final / "log_history.json").read_text())
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def test_curriculum_moves_on_at_the_target_on_a_plateau_and_on_a_schedule(tmp_path):
    plan = Curriculum([1, 2, 4], advance_at=0.9, patience=2, min_delta=0.01)
    assert plan.num_segments == 1 and not plan.observe(0.5, step=10)
    assert plan.observe(0.95, step=20) and plan.num_segments == 2  # reached the target
    assert not plan.observe(0.6, step=30) and not plan.observe(0.605, step=40)  # +0.005 < min_delta: no gain
    assert plan.observe(0.6, step=50) and plan.num_segments == 4 and plan.finished  # plateau after 2 evaluations
    assert not plan.observe(1.0, step=60) and plan.num_segments == 4  # the last stage stays
    assert [entry["segments"] for entry in plan.history] == [1, 2]
    plan.save(tmp_path)
    assert Curriculum.load(tmp_path) == plan
    with pytest.raises(ValueError, match="increasing segment counts"):
        Curriculum([2, 1])


def test_curriculum_dataset_follows_the_stage(tiny_backbone):
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    plan = Curriculum([1, 3])
    data = CurriculumTaskDataset(["memorize"], tokenizer, TokenizedNoise(tokenizer), plan, SEGMENT, size=4, seed=0)
    short = [len(data[i]["input_ids"]) - 2 for i in range(4)]
    plan.advance(step=1, reason="test")
    long = [len(data[i]["input_ids"]) - 2 for i in range(4)]
    assert max(short) <= SEGMENT < min(long) and max(long) <= 3 * SEGMENT


def test_training_moves_through_the_curriculum_and_saves_a_loadable_model(tiny_backbone, tmp_path):
    final = train_main(run_args(tiny_backbone, tmp_path / "run", "--max-steps", "6", "--stages", "1", "2", "3",
                                "--advance-at", "0.0"))  # fmt: skip
    plan = Curriculum.load(final)
    assert plan.num_segments == 3 and [entry["step"] for entry in plan.history] == [2, 4]
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(final)
    assert model.config.segment_size == SEGMENT and model.config.id2label[0] == "office"
    assert all(math.isfinite(loss) for loss in logged_losses(final).values())
    evaluations = [entry for entry in json.loads((final / "log_history.json").read_text()) if "eval_accuracy" in entry]
    assert evaluations and all(
        {"eval_accuracy_memorize", "eval_accuracy_detect_memorize"} <= set(e) for e in evaluations
    )


def test_validation_accuracy_is_split_by_task_in_the_order_the_validation_set_takes_them(tiny_backbone):
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    tasks, noise = ["memorize", "detect_memorize", "reasoning"], TokenizedNoise(tokenizer)
    data = CurriculumTaskDataset(tasks, tokenizer, noise, Curriculum([1]), SEGMENT, size=6, seed=3)
    for index in range(6):  # item i is task i mod 3, as accuracy_by_task assumes
        sample = make_sample(tasks[index % 3], noise, tokenizer, SEGMENT, 3, index)
        assert data[index]["labels"] == sample.label
        assert data[index]["input_ids"][1:-1] == list(sample.input_ids)
    labels = np.array([data[i]["labels"] for i in range(6)])
    logits = np.eye(6)[labels]
    logits[[1, 2, 5]] = np.eye(6)[(labels[[1, 2, 5]] + 1) % 6]  # wrong: detect_memorize once, reasoning twice
    metrics = accuracy_by_task(tasks)(EvalPrediction(predictions=logits, label_ids=labels))
    assert metrics == {"accuracy": 0.5, "accuracy_memorize": 1.0, "accuracy_detect_memorize": 0.5,
                       "accuracy_reasoning": 0.0}  # fmt: skip


# 2: the curriculum moves on right at the checkpoint; 3: a step after it
@pytest.mark.parametrize("stop", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_a_stopped_run_resumes_where_it_stopped_and_ends_as_an_uninterrupted_one(tiny_backbone, tmp_path, stop):
    common = ["--max-steps", "6", "--stages", "1", "2", "--advance-at", "0.0"]
    whole = train_main(run_args(tiny_backbone, tmp_path / "whole", *common))
    stopped = train_main(run_args(tiny_backbone, tmp_path / "parts", *common, "--stop-at-step", str(stop)))
    assert not (stopped / "final").exists() and (stopped / f"checkpoint-{stop}").is_dir()
    first_part = json.loads((stopped / f"checkpoint-{stop}" / "run_time.json").read_text())
    resumed = train_main(run_args(tiny_backbone, tmp_path / "parts", *common))
    clock = json.loads((resumed / "run_time.json").read_text())  # the time of both parts
    assert clock["untimed_steps"] == 0 and clock["seconds"] > first_part["seconds"] > 0
    assert Curriculum.load(resumed) == Curriculum.load(whole)
    assert logged_losses(resumed) == pytest.approx(logged_losses(whole), rel=1e-5)
    weights, reference = load_file(resumed / "model.safetensors"), load_file(whole / "model.safetensors")
    assert weights.keys() == reference.keys()
    for name in weights:
        torch.testing.assert_close(weights[name], reference[name], rtol=1e-5, atol=1e-6)
    before = (resumed / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit, match="has finished"):  # a finished run is never trained over
        train_main(run_args(tiny_backbone, tmp_path / "parts", *common))
    assert (resumed / "model.safetensors").read_bytes() == before


@pytest.mark.filterwarnings("ignore:--bf16 on a CPU without AVX512")
def test_a_run_resumed_in_bf16_records_each_parts_precision_for_its_card(tiny_backbone, tmp_path):
    from model_cards.generate import describe_parts

    common = ["--max-steps", "4", "--stages", "1"]
    stopped = train_main(run_args(tiny_backbone, tmp_path / "run", *common, "--stop-at-step", "2"))
    assert json.loads((stopped / "checkpoint-2" / "run_time.json").read_text())["precision"] == [
        {"from_step": 1, "dtype": "float32"}
    ]
    final = train_main(run_args(tiny_backbone, tmp_path / "run", *common, "--bf16"))
    parts = json.loads((final / "run_time.json").read_text())["precision"]
    assert parts == [{"from_step": 1, "dtype": "float32"}, {"from_step": 3, "dtype": "bfloat16 mixed precision"}]
    assert describe_parts(parts, "dtype", 4) == "float32 (steps 1-2), bfloat16 mixed precision (steps 3-4)"
    assert describe_parts(parts[:1], "dtype", 4) == "float32"


def logged_learning_rates(final: Path) -> dict[int, float]:
    history = json.loads((final / "log_history.json").read_text())
    return {entry["step"]: entry["learning_rate"] for entry in history if "learning_rate" in entry}


def test_a_run_resumed_with_a_new_learning_rate_goes_on_at_it_and_its_card_says_so(tiny_backbone, tmp_path):
    from model_cards.generate import render_card
    from rmt_training.evaluate_lengths import main as evaluate_main

    common = ["--max-steps", "4", "--stages", "1"]
    train_main(run_args(tiny_backbone, tmp_path / "run", *common, "--stop-at-step", "2"))  # at --lr 1e-3
    final = train_main(run_args(tiny_backbone, tmp_path / "run", *common, "--lr", "2e-4"))
    throughout = train_main(run_args(tiny_backbone, tmp_path / "throughout", *common, "--lr", "2e-4"))
    resumed_rates, rates = logged_learning_rates(final), logged_learning_rates(throughout)
    assert resumed_rates[1] == pytest.approx(5 * rates[1])  # the first part at 1e-3
    assert [resumed_rates[step] for step in (3, 4)] == pytest.approx([rates[3], rates[4]])  # the same schedule
    parts = json.loads((final / "run_time.json").read_text())["learning_rate"]
    assert parts == [{"from_step": 1, "learning_rate": 1e-3}, {"from_step": 3, "learning_rate": 2e-4}]

    results = evaluate_main([str(final), "--results", str(tmp_path / "results.json"), "--segments", "1",
                             "--samples", "2", "--tasks", "memorize", "--run", str(final)])  # fmt: skip
    assert "--lr 0.001" in results["training"]["command"]  # the command that started the run
    card = render_card(results)
    assert "learning rate 0.001 (steps 1-2), 0.0002 (steps 3-4)" in card
    assert "Resumed from its step-2 checkpoint with `--lr 0.0002`" in card


def test_a_run_resumed_with_more_stages_goes_on_to_them_and_other_changes_are_ignored(tiny_backbone, tmp_path):
    common = ["--max-steps", "4", "--advance-at", "0.0", "--eval-steps", "1"]
    train_main(run_args(tiny_backbone, tmp_path / "run", *common, "--stages", "1", "2", "--stop-at-step", "2"))
    assert Curriculum.load(tmp_path / "run" / "checkpoint-2").finished  # at 2 segments, the last stage
    final = train_main(run_args(tiny_backbone, tmp_path / "run", *common, "--stages", "1", "2", "3"))
    curriculum = Curriculum.load(final)
    assert curriculum.stages == [1, 2, 3] and curriculum.num_segments == 3
    assert [entry["segments"] for entry in curriculum.history] == [1, 2]

    train_main(run_args(tiny_backbone, tmp_path / "other", *common, "--stages", "1", "2", "--stop-at-step", "1"))
    final = train_main(run_args(tiny_backbone, tmp_path / "other", *common, "--stages", "2", "4"))  # not a sequel
    assert Curriculum.load(final).stages == [1, 2]


def test_a_run_carried_as_a_snapshot_resumes_at_its_step_stage_and_schedule(tiny_backbone, tmp_path):
    from rmt_training.snapshot import main as snapshot_main

    # A stage change on a schedule (at step 2) and no early stop (accuracy 1.0 is out of reach here).
    common = ["--max-steps", "8", "--stages", "1", "2", "--every-steps", "2", "--advance-at", "1.0",
              "--warmup-steps", "4"]  # fmt: skip
    whole = train_main(run_args(tiny_backbone, tmp_path / "whole", *common))
    part = train_main(run_args(tiny_backbone, tmp_path / "first", *common, "--stop-at-step", "3"))
    snapshot = snapshot_main(["save", str(part), str(tmp_path / "snapshot")])
    checkpoint = part / "checkpoint-3"
    assert not (snapshot / "optimizer.pt").exists() and (checkpoint / "optimizer.pt").is_file()
    assert (snapshot / "model.safetensors").stat().st_size < 0.6 * (checkpoint / "model.safetensors").stat().st_size
    restored = snapshot_main(["restore", str(snapshot), str(tmp_path / "second")])  # as on another machine
    weights, saved = load_file(restored / "model.safetensors"), load_file(checkpoint / "model.safetensors")
    assert weights.keys() == saved.keys()
    for name in weights:
        assert weights[name].dtype == saved[name].dtype
        torch.testing.assert_close(weights[name], saved[name], rtol=1e-3, atol=1e-4)  # float16 on the way
    # Stopped again during the new warm-up (steps 4 to 7), then resumed from that ordinary checkpoint.
    train_main(run_args(tiny_backbone, tmp_path / "second", *common, "--stop-at-step", "5"))
    final = train_main(run_args(tiny_backbone, tmp_path / "second", *common))
    assert Curriculum.load(final) == Curriculum.load(whole)  # the stage went on from the snapshot's
    losses, reference = logged_losses(final), logged_losses(whole)
    assert sorted(losses) == sorted(reference) == list(range(1, 9))  # the first part's log came along
    assert [losses[step] for step in (1, 2, 3)] == pytest.approx([reference[step] for step in (1, 2, 3)])
    rates, scheduled = logged_learning_rates(final), logged_learning_rates(whole)
    for step, share in {4: 1 / 4, 5: 2 / 4, 6: 3 / 4, 7: 1.0, 8: 1.0}.items():  # warming up over 4 steps
        assert rates[step] == pytest.approx(scheduled[step] * share), step
    with pytest.raises(SystemExit, match="as new as the snapshot"):
        snapshot_main(["restore", str(snapshot), str(part)])
    with pytest.raises(SystemExit, match="is not a snapshot"):
        snapshot_main(["save", str(part), str(tiny_backbone)])


def test_a_checkpoint_whose_save_was_interrupted_is_set_aside_and_the_one_before_resumed(tiny_backbone, tmp_path):
    common = ["--max-steps", "6", "--stages", "1", "2", "--advance-at", "0.0"]
    whole = train_main(run_args(tiny_backbone, tmp_path / "whole", *common))
    run = train_main(run_args(tiny_backbone, tmp_path / "run", *common, "--stop-at-step", "4"))
    (run / "checkpoint-4" / "curriculum.json").unlink()  # killed after Trainer's save, before the curriculum's
    final = train_main(run_args(tiny_backbone, tmp_path / "run", *common))
    assert (run / "incomplete-checkpoint-4" / "model.safetensors").is_file()  # kept, out of the way
    assert logged_losses(final) == pytest.approx(logged_losses(whole), rel=1e-5)
    foreign = tmp_path / "foreign"
    shutil.copytree(run / "incomplete-checkpoint-4", foreign / "checkpoint-4")  # no curriculum anywhere
    with pytest.raises(SystemExit, match="holds no complete checkpoint"):
        train_main(run_args(tiny_backbone, foreign, *common))
    assert [p.name for p in foreign.iterdir()] == ["checkpoint-4"]


def test_training_documents_take_the_length_of_their_step(tiny_backbone):
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    plan = Curriculum([1, 3])
    data = CurriculumTaskDataset(["memorize"], tokenizer, TokenizedNoise(tokenizer), plan, SEGMENT, size=40, seed=0,
                                 global_batch=4)  # fmt: skip
    plan.advance(step=2, reason="test")  # decided after step 2: step 3's batch was already built
    lengths = [len(data[i]["input_ids"]) - 2 for i in range(16)]  # steps 1..4, four documents each
    assert max(lengths[:12]) <= SEGMENT < min(lengths[12:])
    assert plan.segments_at_step(3) == 1 and plan.segments_at_step(4) == 3


def test_two_processes_under_accelerate_give_the_loss_of_one_with_the_same_global_batch(tiny_backbone, tmp_path):
    common = ["--max-steps", "3", "--stages", "2", "--eval-steps", "100", "--save-steps", "100"]
    one = train_main(run_args(tiny_backbone, tmp_path / "one", *common))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # Several CPU processes: accelerate's torchrun launcher (`--multi_gpu`) with the gloo backend, no GPU needed.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "rmt_training.train",
               *run_args(tiny_backbone, tmp_path / "two", *common, "--batch-size", "2")]  # fmt: skip
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    two = tmp_path / "two" / "final"
    record = json.loads((two / "training_args.json").read_text())
    assert record["world_size"] == 2 and record["distributed_type"] == "MULTI_CPU"  # DDP over gloo
    assert logged_losses(two) == pytest.approx(logged_losses(one), rel=1e-4)
    assert len(logged_losses(one)) == 3


def test_a_run_can_start_from_another_runs_weights_and_its_card_shows_both(tiny_backbone, tmp_path):
    from model_cards.generate import render_card
    from rmt_training.evaluate_lengths import main as evaluate_main
    from rmt_training.snapshot import restore_snapshot, save_snapshot

    first = train_main(run_args(tiny_backbone, tmp_path / "short", "--max-steps", "2", "--stages", "1"))
    continued = ["--output-dir", str(tmp_path / "long"), "--init-from", str(first), "--segment-size", str(2 * SEGMENT),
                 "--num-mem-tokens", "4", "--batch-size", "4", "--eval-size", "4", "--eval-steps", "1",
                 "--save-steps", "1", "--stages", "2", "--lr", "0", "--weight-decay", "0", "--no-progress"]  # fmt: skip
    start = load_file(first / "model.safetensors")
    stopped = train_main([*continued, "--max-steps", "2", "--stop-at-step", "1"])
    assert (stopped / "checkpoint-1" / "initialised_from.json").is_file()
    # carried to another machine as a snapshot, where the first run's folder is gone
    save_snapshot(stopped, tmp_path / "snapshot")
    shutil.rmtree(tmp_path / "short")
    shutil.rmtree(stopped)
    restore_snapshot(tmp_path / "snapshot", stopped)
    second = train_main([*continued, "--max-steps", "2"])
    weights = load_file(second / "model.safetensors")
    assert weights.keys() == start.keys()  # lr 0: the first run's weights (through a float16 snapshot)
    assert all(torch.equal(weights[k], start[k].half().float()) for k in weights)
    assert json.loads((second / "config.json").read_text())["segment_size"] == 2 * SEGMENT

    results = evaluate_main([str(second), "--results", str(tmp_path / "results.json"), "--segments", "1",
                             "--samples", "2", "--tasks", "memorize", "--run", str(second)])  # fmt: skip
    training = results["training"]
    assert "--init-from runs/short/final" in training["command"] and "--backbone" not in training["command"]
    assert training["initialised_from"]["name"] == "short" and training["initialised_from"]["steps"] == 2
    assert "--backbone" in training["initialised_from"]["command"]
    assert results["base_model"] == str(tiny_backbone)  # the first run's backbone
    assert training["curriculum_history"][-1] | {"best": None, "reason": None} == {
        "step": 2,
        "segments": 2,
        "best": None,
        "reason": None,
    }  # the last stage ends the history

    from rmt_training.run_record import last_stage

    done = {"stages": [1, 5], "stage": 1, "best": 0.95, "advance_at": 0.95}
    assert last_stage(done, 3900) == [{"step": 3900, "segments": 5, "best": 0.95,
                                       "reason": "reached 0.9500: the curriculum is done"}]  # fmt: skip
    assert last_stage(done | {"best": 0.9}, 5000)[0]["reason"] == "the run's last step"
    assert last_stage(done | {"best": -math.inf}, 5000) == []  # no validation in that stage
    card = render_card(results)
    assert "First, the run `short`" in card and card.index("runs/short") < card.index("--init-from runs/short")

    def refused(*changed: str) -> str:
        with pytest.raises(SystemExit) as error:
            train_main([*continued, "--max-steps", "1", "--output-dir", str(tmp_path / "refused"), *changed])
        return str(error.value)

    first.parent.mkdir(parents=True)
    shutil.copytree(second, first)  # a saved RMT classifier to be refused by other settings
    assert "pass --memory-type rmt" in refused("--memory-type", "armt")
    assert "pass --num-mem-tokens 4" in refused("--num-mem-tokens", "6")
    assert "trains an RMTForCausalLM" in refused("--head", "causal-lm")
    assert "leave out --backbone" in refused("--backbone", str(tiny_backbone))
    assert not (tmp_path / "refused").exists()


def test_a_run_can_start_an_armt_on_a_trained_rmts_backbone_and_resume(tiny_backbone, tmp_path):
    import re

    decoder = ["--head", "causal-lm", "--segment-size", "32", "--num-mem-tokens", "4", "--batch-size", "2",
               "--eval-size", "2", "--eval-steps", "1", "--save-steps", "1", "--no-progress"]  # fmt: skip
    first = train_main([*decoder, "--backbone", str(tiny_backbone), "--output-dir", str(tmp_path / "rmt"),
                        "--stages", "2", "--max-steps", "2", "--lr", "1e-3"])  # fmt: skip
    armt = [*decoder, "--init-from", str(first), "--new-memory", "--memory-type", "armt", "--num-mem-tokens", "3",
            "--output-dir", str(tmp_path / "armt"), "--stages", "2", "--max-steps", "2", "--lr", "0",
            "--weight-decay", "0"]  # fmt: skip
    stopped = train_main([*armt, "--stop-at-step", "1"])
    with pytest.raises(SystemExit, match="This run's checkpoint .* pass --num-mem-tokens 3"):
        train_main([*armt, "--num-mem-tokens", "4"])  # a resume keeps the memory it started with
    assert sorted(path.name for path in stopped.glob("checkpoint-*")) == ["checkpoint-1"]
    resumed = [flag for flag in armt if flag != "--new-memory"]  # the checkpoint remembers it
    final = train_main(resumed)  # from its own checkpoint: still ARMT, not rebuilt from the RMT
    config = json.loads((final / "config.json").read_text())
    assert (config["memory_type"], config["num_mem_tokens"], config["segment_size"]) == ("armt", 3, 32)
    rmt_weights, armt_weights = load_file(first / "model.safetensors"), load_file(final / "model.safetensors")
    backbone = {key: value for key, value in rmt_weights.items() if key.startswith("backbone.")}
    assert backbone and len(backbone) < len(rmt_weights)  # the RMT's memory tokens stay behind
    for key, value in backbone.items():  # lr 0: the trained RMT's backbone, its layers inside ARMT's wrappers
        assert torch.equal(armt_weights[re.sub(r"(\.layer\.\d+)\.", r"\1.layer.", key, count=1)], value), key
    assert armt_weights["memory.memory_tokens"].shape[0] == 3
    assert all(not value.any() for key, value in armt_weights.items() if key.endswith("W_mv.weight"))
    from rmt_training.run_record import training_command

    command = training_command(json.loads((final / "training_args.json").read_text()), "armt", "runs/rmt/final")
    assert "--init-from runs/rmt/final --new-memory" in command and "--memory-type armt" in command
    from model_cards.generate import render_card
    from rmt_training.evaluate_lengths import main as evaluate_main

    results = evaluate_main([str(final), "--results", str(tmp_path / "results.json"), "--segments", "2",
                             "--samples", "1", "--tasks", "qa1", "--run", str(final)])  # fmt: skip
    assert results["training"]["new_memory"] and results["config"]["memory_type"] == "armt"
    card = render_card(results)
    assert "Then a second run, starting from its backbone (its memory left behind) under a new memory:" in card
    assert "an associative memory in every layer" in card

    def refused(*arguments: str) -> str:
        with pytest.raises(SystemExit) as error:
            train_main([*decoder, "--output-dir", str(tmp_path / "refused"), "--max-steps", "1", *arguments])
        return str(error.value)

    assert "or --new-memory" in refused("--init-from", str(first), "--memory-type", "armt")
    assert "goes with --init-from" in refused("--backbone", str(tiny_backbone), "--new-memory")
    assert "has armt memory" in refused("--init-from", str(final), "--new-memory", "--memory-type", "rmt")
    assert not (tmp_path / "refused").exists()


def test_a_run_started_from_an_exported_checkpoint_takes_its_base_model_from_its_card(tmp_path):
    from rmt_training.run_record import read_run

    exported = tmp_path / "rmt-exported"
    exported.mkdir()
    (exported / "config.json").write_text("{}")
    assert "base_model" not in read_run(exported)  # no card
    (exported / "README.md").write_text("---\nbase_model: org/backbone\nlicense: mit\n---\n\n# rmt-exported\n")
    assert read_run(exported) == {"name": "rmt-exported", "config": {}, "base_model": "org/backbone"}


def test_a_run_started_from_an_exported_checkpoint_shows_the_recipe_its_export_ships(tmp_path):
    from model_cards.generate import render_card
    from rmt_training.run_record import describe_run, read_run

    exported = tmp_path / "rmt-minilm-qa1"  # an export made with --card model_cards/rmt-minilm-qa1.md
    exported.mkdir()
    (exported / "config.json").write_text("{}")
    shipped = json.loads((REPO / "model_cards" / "rmt-minilm-qa1.json").read_text())
    (exported / "card_results.json").write_text(json.dumps(shipped))
    lineage = read_run(exported)
    assert lineage["card"] == shipped and "base_model" not in lineage  # no README.md here
    record = {
        "settings": {"head": "causal-lm", "init_from": str(exported), "tasks": ["qa1"], "noise": "gutenberg",
                     "lr": 3e-5, "batch_size": 8, "grad_accum": 2, "output_dir": "runs/rmt-long"},
        "curriculum": {"stages": [32], "stage": 0, "best": 0.97, "advance_at": 0.99, "history": []},
        "config": {"architectures": ["RMTForCausalLM"], "memory_type": "rmt", "num_mem_tokens": 10,
                   "segment_size": 128},
        "history": [{"step": 40, "train_runtime": 3600.0}],
        "lineage": lineage,
    }  # fmt: skip
    results = describe_run(record, "rmt-long", "org/rmt-long", "2 CPU cores")
    assert results["training"]["initialised_from"] == {"name": "rmt-minilm-qa1", **shipped["training"]}
    assert results["base_model"] == shipped["base_model"]  # the first run's, from its results
    assert "--init-from rmt-minilm-qa1 " in results["training"]["command"]
    results |= {key: shipped[key] for key in ("evaluated", "evaluation")}
    card = render_card(results)
    first = shipped["training"]["command"]
    assert "First, the run `rmt-minilm-qa1`" in card and card.index(first) < card.index("--output-dir runs/rmt-long")


def test_decoder_documents_put_the_loss_on_the_answer_only(tiny_backbone):
    from rmt_training.decoder import IGNORE, DecoderCollator, decoder_item
    from rmt_training.tasks import make_sample

    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    sample = make_sample("qa1", TokenizedNoise(tokenizer), tokenizer, 200, seed=0, index=3)
    item = decoder_item(tokenizer, sample)
    answer = [label for label in item["labels"] if label != IGNORE]
    assert item["input_ids"][: len(sample.input_ids)] == sample.input_ids
    assert item["input_ids"][-len(answer) :] == answer and answer[-1] == tokenizer.sep_token_id
    assert tokenizer.decode(answer[:-1]).strip() == sample.target
    other = decoder_item(tokenizer, make_sample("qa1", TokenizedNoise(tokenizer), tokenizer, 120, seed=0, index=4))
    batch = DecoderCollator(tokenizer.pad_token_id)([item, other])
    assert (
        batch["labels"].shape == batch["input_ids"].shape
        and (batch["labels"][1, len(other["labels"]) :] == IGNORE).all()
    )
    assert batch["attention_mask"].sum(1).tolist() == [len(item["input_ids"]), len(other["input_ids"])]
    first_answer_column = min(
        row.index(next(x for x in row if x != IGNORE)) for row in (item["labels"], other["labels"])
    )
    assert batch["logits_to_keep"] == batch["input_ids"].shape[1] - first_answer_column + 1


def test_answer_accuracy_is_the_same_from_the_last_logits_as_from_all():
    from rmt_training.decoder import IGNORE, answer_accuracy, answer_predictions

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 9, 5, generator=generator)
    labels = torch.full((3, 9), IGNORE)
    labels[:, 6:8] = logits[:, 5:7].argmax(-1)  # rows 0 and 1 answered right, row 2 wrong in one token
    labels[2, 7] = (labels[2, 7] + 1) % 5

    def accuracy(kept: torch.Tensor) -> float:
        predicted = answer_predictions(kept, labels)
        assert predicted.shape == labels.shape
        return answer_accuracy(EvalPrediction(predictions=predicted.numpy(), label_ids=labels.numpy()))["accuracy"]

    assert accuracy(logits[:, -4:]) == accuracy(logits) == pytest.approx(2 / 3)


def test_answer_accuracy_needs_every_answer_token_and_skips_padding_rows():
    from rmt_training.decoder import IGNORE, answer_accuracy

    labels = np.array([[IGNORE, IGNORE, 7, 8], [IGNORE, IGNORE, 7, 8], [IGNORE, 5, 6, IGNORE], [IGNORE] * 4])
    predictions = np.array([[0, 7, 8, 0], [0, 7, 9, 0], [5, 6, 0, 0], [0, 0, 0, 0]])  # row t predicts label t+1
    assert answer_accuracy(EvalPrediction(predictions=predictions, label_ids=labels))["accuracy"] == pytest.approx(
        2 / 3
    )


def test_a_decoder_trains_on_qa1_from_scratch_and_loads_as_a_causal_lm(tmp_path):
    from transformers import AutoModelForCausalLM

    final = train_main(["--head", "causal-lm", "--output-dir", str(tmp_path / "decoder"), "--segment-size", "96",
                        "--num-mem-tokens", "4", "--stages", "1", "--max-steps", "2", "--eval-steps", "2",
                        "--eval-size", "4", "--batch-size", "2", "--no-progress"])  # fmt: skip
    history = json.loads((final / "log_history.json").read_text())
    assert any("eval_accuracy" in entry for entry in history)
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.config.memory_type == "rmt" and model.config.text_config.model_type == "llama"
    prompt = torch.tensor([[101, 2073, 2003, 2984, 1029]])
    assert model.generate(prompt, max_new_tokens=3, do_sample=False).shape == (1, 8)
    tokenizer = AutoTokenizer.from_pretrained(final)  # adds no [CLS]/[SEP]: prompts look like training documents
    assert tokenizer("Where is Mary?")["input_ids"] == [2073, 2003, 2984, 1029]
    assert (tokenizer.sep_token_id, tokenizer.pad_token_id, tokenizer.model_max_length) == (102, 0, 2**24)

    from model_cards.generate import render_card, validate
    from rmt_training.evaluate_lengths import main as evaluate_main

    results = evaluate_main([str(final), "--results", str(tmp_path / "results.json"), "--segments", "1", "2",
                             "--samples", "3", "--batch-size", "2", "--run", str(final)])  # fmt: skip
    assert results["model_class"] == "RMTForCausalLM" and results["pipeline_tag"] == "text-generation"
    assert "base_model" not in results and "Llama decoder trained from scratch" in results["config"]["backbone"]
    assert [(c["task"], c["num_tokens"], c["samples"]) for c in results["evaluation"]] == [
        ("qa1", 96, 3),
        ("qa1", 192, 3),
    ]
    card = render_card(validate(results))
    assert "trained from scratch" in card and "base_model" not in card and "huggingface.co/None" not in card


def test_a_decoder_on_an_encoder_backbone_saves_generation_that_stops_at_the_answers_end(tiny_backbone, tmp_path):
    from transformers import GenerationConfig

    final = train_main(["--head", "causal-lm", "--backbone", str(tiny_backbone), "--output-dir", str(tmp_path / "run"),
                        "--segment-size", "32", "--num-mem-tokens", "4", "--stages", "2", "--max-steps", "1",
                        "--eval-steps", "1", "--eval-size", "2", "--batch-size", "2", "--no-progress"])  # fmt: skip
    assert BertConfig.from_pretrained(tiny_backbone).eos_token_id is None  # nothing to inherit from the backbone
    generation = GenerationConfig.from_pretrained(final)
    ends = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
    # [SEP] ends every training answer (5.17 saves a list, naming it twice once the tokenizer names it too)
    assert (set(ends), generation.pad_token_id) == ({102}, 0)


def test_a_prompt_tokenizer_adds_no_special_tokens_and_keeps_that_when_saved(tmp_path):
    from rmt_training.decoder import prompt_tokenizer

    encoder_tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    text = "Mary went to the Kitchen. Where is Mary?"
    plain = encoder_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert encoder_tokenizer(text)["input_ids"] != plain
    prompt_tokenizer(encoder_tokenizer).save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(text)["input_ids"] == plain and reloaded.decode(plain) == encoder_tokenizer.decode(plain)
    assert reloaded.special_tokens_map == encoder_tokenizer.special_tokens_map
    assert prompt_tokenizer(reloaded) is reloaded  # already plain: returned as it is
