"""Sharded training with FSDP2: two CPU processes over gloo train tiny RMT and ARMT models (classifier and causal
LM) to the losses and weights of one process with the same global batch (tests/fsdp_worker.py), grouped as
accelerate's FSDP groups them; accelerate's own FSDP launch, which has no CPU form, is refused with the way out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_classifier
from families import ARMT, tiny_decoder
from safetensors.torch import load_file
from test_training import run_args, tiny_backbone  # noqa: F401 (a fixture)

from rmt_training.sharding import fsdp2_groups, shard_with_fsdp2

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("fsdp_worker.py")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}  # fmt: skip
# Measured: losses agree to 8e-8 relative (the order of float sums differs); after 4 AdamW steps at lr 1e-2 the
# weights differ by at most 4.1e-5 (Adam's normalised steps magnify gradients' last bits).
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 5e-4


def run_worker(folder: Path, processes: int) -> dict:
    folder.mkdir()
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(processes)] if processes > 1 else []
    done = subprocess.run([sys.executable, *launcher, str(WORKER), str(folder)], env=ENV, cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((folder / "rank0.json").read_text())


def test_two_processes_sharded_with_fsdp2_train_to_the_losses_and_weights_of_one(tmp_path):
    one, two = run_worker(tmp_path / "one", 1), run_worker(tmp_path / "two", 2)
    assert one["world"] == 1 and two["world"] == 2
    for name in ("classifier-rmt", "classifier-armt", "causal-lm-rmt", "causal-lm-armt"):
        assert two[name]["losses"] == pytest.approx(one[name]["losses"], rel=LOSS_RTOL), name
        assert len(set(one[name]["losses"])) == 4  # the steps changed the model
        layers = [group for group in two[name]["groups"] if not group.endswith(".layer")]
        assert len(layers) == 2 and all(group.rsplit(".", 1)[-1] in "01" for group in layers), two[name]["groups"]
        if "armt" in name:  # the ARMT layer is a group with its memory weights, around the backbone's layer
            assert two[name]["groups"] == [g for layer in layers for g in (layer, f"{layer}.layer")]
        shapes = two[name]["shapes"]  # each process holds its half of every parameter with more than one row
        assert all(local[0] == (full[0] + 1) // 2 for local, full in shapes.values() if full[0] > 1), name
        full = load_file(tmp_path / "one" / f"{name}.safetensors")
        gathered = load_file(tmp_path / "two" / f"{name}.safetensors")
        assert sorted(gathered) == sorted(full)
        for key in full:
            torch.testing.assert_close(gathered[key], full[key], rtol=0, atol=WEIGHT_ATOL, msg=f"{name}: {key}")


@pytest.mark.parametrize("memory", ["rmt", "armt"])
def test_fsdp_groups_are_the_layers_not_the_embeddings_rmt_reads_directly(memory):
    encoder = tiny_classifier(memory_type=memory)
    # BERT lists BertEmbeddings among its _no_split_modules; RMT calls its word embeddings outside its forward.
    assert "BertEmbeddings" not in encoder._no_split_modules and "BertLayer" in encoder._no_split_modules
    assert "AssociativeLayer" in encoder._no_split_modules
    expected = [f"backbone.bert.encoder.layer.{i}" for i in range(2)]
    if memory == "armt":
        expected = [name for layer in expected for name in (layer, f"{layer}.layer")]
    assert fsdp2_groups(encoder) == expected
    decoder = tiny_decoder("llama", **(ARMT if memory == "armt" else {}))
    assert "LlamaDecoderLayer" in decoder._no_split_modules
    expected = [f"backbone.model.layers.{i}" for i in range(2)]
    if memory == "armt":
        expected = [name for layer in expected for name in (layer, f"{layer}.layer")]
    assert fsdp2_groups(decoder) == expected


def test_sharding_without_a_process_group_names_the_fix():
    with pytest.raises(RuntimeError, match=r"init_process_group\('gloo'\)"):
        shard_with_fsdp2(tiny_classifier())


def test_accelerate_fsdp_on_cpu_processes_is_refused_rather_than_run_as_ddp(tiny_backbone, tmp_path):  # noqa: F811
    command = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "rmt_training.train", *run_args(tiny_backbone, tmp_path / "run", "--max-steps", "2")]  # fmt: skip
    done = subprocess.run(command, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode != 0
    assert "runs FSDP only on accelerator devices" in done.stderr and "MULTI_CPU" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "run" / "final").exists()
