"""RMTConfig: defaults, round trips and eager validation with clear errors."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_backbone_config, tiny_rmt_config
from transformers import AutoConfig, BartConfig

from modeling_rmt import RMTConfig
from modeling_rmt.configuration_rmt import LONG_DOCUMENT_TOKENS


def test_default_config_wraps_bert_base_and_fits_its_positions():
    config = RMTConfig()
    assert config.text_config.model_type == "bert"
    assert config.segment_input_length == 512 == config.text_config.max_position_embeddings
    assert config.get_text_config() is config.text_config


def test_round_trip_keeps_every_setting(tmp_path):
    config = tiny_rmt_config("roberta", num_labels=3, bptt_depth=2, max_n_segments=7, segment_alignment="left")
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, RMTConfig)
    for key in ("num_mem_tokens", "segment_size", "bptt_depth", "max_n_segments", "segment_alignment",
                "cls_token_id", "sep_token_id", "pad_token_id", "num_labels"):  # fmt: skip
        assert getattr(loaded, key) == getattr(config, key), key
    assert loaded.text_config.to_dict() == config.text_config.to_dict()
    assert set(loaded.auto_map) >= {"AutoConfig", "AutoModel", "AutoModelForSequenceClassification"}


def test_labels_follow_the_backbone_head_or_are_pushed_down_to_it():
    from_backbone = RMTConfig(text_config=tiny_backbone_config(num_labels=5), cls_token_id=1, sep_token_id=2,
                              num_mem_tokens=2, segment_size=8)  # fmt: skip
    assert from_backbone.num_labels == 5
    explicit = RMTConfig(text_config=tiny_backbone_config(), num_labels=4, cls_token_id=1, sep_token_id=2,
                         num_mem_tokens=2, segment_size=8)  # fmt: skip
    assert explicit.num_labels == explicit.text_config.num_labels == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"segment_size": 60}, "positions"),  # 60 + 3 memory + 3 special > 64
        ({"num_mem_tokens": 0}, "num_mem_tokens must be an integer >= 1"),
        ({"num_mem_tokens": -2}, "num_mem_tokens must be an integer >= 1"),
        ({"segment_size": 0}, "segment_size must be an integer >= 1"),
        ({"memory_type": "lstm"}, "Unknown memory_type"),
        ({"bptt_depth": -3}, "bptt_depth must be -1"),
        ({"max_n_segments": 0}, "max_n_segments must be None or an integer >= 1"),
        ({"segment_alignment": "middle"}, "Unknown segment_alignment"),
        ({"segment_loss": "sum"}, "Unknown segment_loss"),
        ({"cls_token_id": 10_000}, "outside the backbone's vocabulary"),
    ],
)
def test_invalid_values_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_rmt_config("bert", **kwargs)


def test_segment_too_long_error_names_the_largest_segment_that_fits():
    with pytest.raises(ValueError, match=r"Use segment_size <= 58"):
        tiny_rmt_config("bert", segment_size=59)
    # RoBERTa numbers positions from pad_token_id + 1: two reserved with its real pad id 1
    with pytest.raises(ValueError, match=r"Use segment_size <= 56"):
        tiny_rmt_config("roberta", segment_size=57, backbone_overrides={"pad_token_id": 1})
    assert tiny_rmt_config("roberta", segment_size=57).segment_input_length == 63  # pad id 0: one reserved


def test_electra_with_narrower_embeddings_is_rejected():
    with pytest.raises(ValueError, match="embedding_size == hidden_size"):
        tiny_rmt_config("electra", backbone_overrides={"embedding_size": 16})


def test_unsupported_backbone_family_is_rejected():
    with pytest.raises(ValueError, match="'bart' is an encoder-decoder model"):
        RMTConfig(text_config=BartConfig(encoder_layers=1, decoder_layers=1), cls_token_id=1, sep_token_id=2)


def test_text_config_dict_needs_a_model_type():
    with pytest.raises(ValueError, match="without `model_type`"):
        RMTConfig(text_config={"hidden_size": 32})
    config = RMTConfig(text_config=tiny_backbone_config().to_dict(), cls_token_id=1, sep_token_id=2,
                       num_mem_tokens=2, segment_size=8)  # fmt: skip
    assert config.text_config.hidden_size == 32


def test_the_callers_backbone_config_is_left_as_it_was_and_its_attention_choice_kept():
    from modeling_rmt import RMTForSequenceClassification

    backbone_config = tiny_backbone_config()
    backbone_config._attn_implementation = "eager"
    before = backbone_config.to_dict()
    model = RMTForSequenceClassification(RMTConfig(text_config=backbone_config, num_mem_tokens=2, segment_size=8,
                                                   num_labels=5, cls_token_id=1, sep_token_id=2))  # fmt: skip
    assert backbone_config.to_dict() == before and backbone_config._attn_implementation == "eager"
    assert model.backbone.config._attn_implementation == "eager" and model.backbone.config.num_labels == 5
    chosen = RMTConfig(text_config=backbone_config, num_mem_tokens=2, segment_size=8, attn_implementation="sdpa")
    assert chosen.text_config._attn_implementation == "sdpa"  # the RMT config's own choice wins
    assert backbone_config._attn_implementation == "eager"


def test_the_config_advertises_unbounded_input_and_keeps_the_backbones_limit(tmp_path):
    """Clients that ask a model for its length limit (`generate()`'s default max_length, harnesses reading the
    top-level config) get the long-document bound; the backbone is built from its own limit, which is saved."""
    config = RMTConfig(text_config=AutoConfig.for_model("bert", max_position_embeddings=128), segment_size=100)
    assert config.max_position_embeddings == LONG_DOCUMENT_TOKENS == 2**24
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "max_position_embeddings" not in saved and saved["text_config"]["max_position_embeddings"] == 128
    loaded = RMTConfig.from_pretrained(tmp_path)
    assert loaded.max_position_embeddings == LONG_DOCUMENT_TOKENS and loaded.text_config.max_position_embeddings == 128
