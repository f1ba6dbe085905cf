"""The training snapshots committed under snapshots/ (long CPU runs carried across machines) restore
into checkpoints that load and that train.py would resume from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer

from rmt_tools.backbones import minilm_path
from rmt_training.curriculum import Curriculum
from rmt_training.evaluate_lengths import auto_class_for
from rmt_training.snapshot import Rewarm, last_complete_checkpoint, restore_snapshot

SNAPSHOTS = sorted(p for p in (Path(__file__).resolve().parents[1] / "snapshots").glob("*") if p.is_dir())


@pytest.mark.skipif(not SNAPSHOTS, reason="no snapshot committed")
@pytest.mark.parametrize("snapshot", SNAPSHOTS, ids=lambda p: p.name)
def test_a_committed_snapshot_restores_into_a_resumable_checkpoint(snapshot, tmp_path):
    record = json.loads((snapshot / "snapshot.json").read_text())
    state = json.loads((snapshot / "trainer_state.json").read_text())
    assert record["step"] == state["global_step"] > 0
    with safe_open(snapshot / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.float16}
    checkpoint = restore_snapshot(snapshot, tmp_path / "run")
    assert last_complete_checkpoint(tmp_path / "run") == checkpoint
    assert Curriculum.load(checkpoint).num_segments >= 1
    rewarm = Rewarm.for_checkpoint(checkpoint, warmup_steps=50)
    assert rewarm is not None and rewarm.resumed_at == record["step"]
    config = AutoConfig.from_pretrained(checkpoint)
    model = auto_class_for(checkpoint).from_pretrained(checkpoint).eval()
    assert model.dtype == torch.float32
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    ids = tokenizer("Mary went to the kitchen. Where is Mary?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    if config.architectures[0] == "RMTForSequenceClassification":
        assert logits.shape == (1, config.num_labels)
