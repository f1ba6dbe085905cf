"""The training command line with LoRA (`--lora-r`): adapters on the backbone, the memory and head in full; a run
stopped and resumed ends as an uninterrupted one; `final/` holds the merged model and `final/adapter/` the
adapter, which loads onto the backbone wrapped anew with the same logits."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_training import SEGMENT, logged_losses, run_args, tiny_backbone  # noqa: F401 (a fixture)
from transformers import AutoTokenizer, BertModel

from modeling_rmt import RMTForSequenceClassification
from rmt_training.train import main as train_main

pytest.importorskip("peft")
from rmt_training.lora import load_lora  # noqa: E402

LORA = ["--max-steps", "6", "--stages", "1", "2", "--advance-at", "0.0", "--lora-r", "4", "--lora-alpha", "8"]


def test_a_lora_run_resumes_as_uninterrupted_and_saves_the_merged_model_and_its_adapter(tiny_backbone, tmp_path):  # noqa: F811
    whole = train_main(run_args(tiny_backbone, tmp_path / "whole", *LORA))
    stopped = train_main(run_args(tiny_backbone, tmp_path / "parts", *LORA, "--stop-at-step", "2"))
    assert (stopped / "checkpoint-2" / "adapter_model.safetensors").is_file()
    resumed = train_main(run_args(tiny_backbone, tmp_path / "parts", *LORA))
    assert logged_losses(resumed) == pytest.approx(logged_losses(whole), rel=1e-5)
    losses = logged_losses(whole)
    assert len(losses) == 4 and losses[1] != losses[4]  # the curriculum ends the run at its last stage

    merged = RMTForSequenceClassification.from_pretrained(whole).eval()  # a plain RMT model
    backbone = BertModel.from_pretrained(tiny_backbone)
    embeddings = merged.get_input_embeddings().weight
    assert torch.equal(embeddings, backbone.get_input_embeddings().weight)  # no adapter there: as pretrained
    query = merged.backbone.bert.encoder.layer[0].attention.self.query.weight
    assert not torch.equal(query, backbone.encoder.layer[0].attention.self.query.weight)  # the adapter merged in
    reference = load_file(resumed / "model.safetensors")
    for name, value in load_file(whole / "model.safetensors").items():
        torch.testing.assert_close(value, reference[name], rtol=1e-5, atol=1e-6)

    base = RMTForSequenceClassification.from_backbone(str(tiny_backbone), num_labels=merged.config.num_labels,
                                                      num_mem_tokens=4, segment_size=SEGMENT)  # fmt: skip
    adapted = load_lora(base, whole / "adapter").eval()  # the trained memory and head come with the adapter
    tokenizer = AutoTokenizer.from_pretrained(whole)
    batch = tokenizer(["Mary went to the garden. " * 12], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(adapted(**batch).logits, merged(**batch).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "flags, message",
    [(["--lora-alpha", "8"], "--lora-alpha set LoRA up: add --lora-r"), (["--lora-r", "0"], "--lora-r must be")],
)  # fmt: skip
def test_lora_flags_without_a_rank_or_with_a_bad_one_are_refused(tiny_backbone, tmp_path, flags, message):  # noqa: F811
    with pytest.raises(SystemExit, match=message):
        train_main(run_args(tiny_backbone, tmp_path / "run", "--max-steps", "2", *flags))
