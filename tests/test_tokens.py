"""`rmt_tools.tokens.with_generation_tokens`: a decoder's tokenizer names the tokens its generation ends and
pads with, so clients that read them from the tokenizer stop where the model does."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from rmt_tools.backbones import minilm_path
from rmt_tools.tokens import with_generation_tokens


def test_an_encoder_tokenizer_gets_the_end_token_generation_stops_at():
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    assert tokenizer.eos_token_id is None
    with_generation_tokens(tokenizer, [tokenizer.sep_token_id, 7], tokenizer.pad_token_id)
    assert tokenizer.eos_token == "[SEP]" and tokenizer.eos_token_id == tokenizer.sep_token_id


def test_tokens_already_named_are_kept_and_a_different_one_is_refused():
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    with_generation_tokens(tokenizer, tokenizer.sep_token_id, None)
    with_generation_tokens(tokenizer, [5, tokenizer.sep_token_id], tokenizer.pad_token_id)  # one of the stops
    assert tokenizer.eos_token_id == tokenizer.sep_token_id
    with pytest.raises(ValueError, match=r"eos token is id 102 but the model's generation config uses 5"):
        with_generation_tokens(tokenizer, 5, None)
    with pytest.raises(ValueError, match=r"pad token is id 0 but the model's generation config uses 3"):
        with_generation_tokens(tokenizer, None, 3)
