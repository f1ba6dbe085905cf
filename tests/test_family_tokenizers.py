"""`from_backbone` on each family's own tokenizer conventions: the tokenizer classes transformers gives each family,
trained here on a few sentences so they keep their special tokens, post-processors (BOS added or not, `[CLS] ...
[SEP]` or `<s> ... </s>`) and pad token (own, none, or shared with EOS). The model reads the special ids from
the tokenizer and the generation settings from the backbone; documents and prompts the tokenizer pads classify
and generate as each alone; a needed special token that is missing gets an error naming it and the fix.

Families left out have tokenizers that exist only as a `tokenizer.json` on the Hub (mistral, mixtral, phi3,
olmo2, granite, stablelm, smollm3, falcon, modernbert) or need another package (roformer: rjieba) or a vocabulary
file (mpnet), none of which are available offline."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from families import ARMT, MEMORIES, backbone_config, encoder_config, greedy, with_written_values
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GenerationConfig

from modeling_rmt import RMTForCausalLM, RMTForSequenceClassification

DECODER_TOKENIZERS = {"llama": "LlamaTokenizer", "qwen2": "Qwen2Tokenizer", "qwen3": "Qwen2Tokenizer",
                      "qwen3_moe": "Qwen2Tokenizer", "gpt2": "GPT2Tokenizer", "gpt_neox": "GPTNeoXTokenizer",
                      "gemma": "GemmaTokenizer", "gemma2": "GemmaTokenizer", "gemma3_text": "GemmaTokenizer",
                      "cohere": "CohereTokenizer", "starcoder2": "GPT2Tokenizer", "gptj": "GPT2Tokenizer",
                      "opt": "GPT2Tokenizer", "phi": "GPT2Tokenizer"}  # fmt: skip
ENCODER_TOKENIZERS = {"bert": "BertTokenizer", "distilbert": "BertTokenizer", "electra": "BertTokenizer",
                      "megatron-bert": "BertTokenizer", "ernie": "BertTokenizer", "roberta": "RobertaTokenizer",
                      "xlm-roberta": "XLMRobertaTokenizer", "camembert": "CamembertTokenizer",
                      "albert": "AlbertTokenizer", "deberta-v2": "DebertaV2Tokenizer"}  # fmt: skip
TEXT = [
    "The river ran past the mill and under the old stone bridge.",
    "A lamp was lit in the window of the house on the hill.",
    "She wrote the numbers in a small book and closed it.",
    "Rain fell on the fields all night, and the roads were mud by morning.",
    "The clock in the hall struck nine as the guests sat down.",
]
ADDS_BOS = ("LlamaTokenizer", "GemmaTokenizer")  # as their released tokenizers are set; the classes default to not
_trained: dict[str, object] = {}


def family_tokenizer(name: str):
    """The family's tokenizer class with its own special tokens, trained on TEXT (no vocabulary file needed); a
    copy, so a test may change its padding."""
    if name not in _trained:
        untrained = getattr(transformers, name)(**({"add_bos_token": True} if name in ADDS_BOS else {}))
        _trained[name] = untrained.train_new_from_iterator(TEXT * 20, vocab_size=160)
    return copy.deepcopy(_trained[name])


def special_ids(tokenizer) -> dict[str, int | None]:
    return {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad")}


def decoder_from_backbone(family: str, tokenizer, **rmt) -> RMTForCausalLM:
    torch.manual_seed(0)
    config = backbone_config(family, vocab_size=len(tokenizer), **special_ids(tokenizer))
    backbone = AutoModelForCausalLM.from_config(config)
    return with_written_values(RMTForCausalLM.from_backbone(backbone, tokenizer=tokenizer, num_mem_tokens=2,
                                                            segment_size=6, **rmt)).eval()  # fmt: skip


def encoder_from_backbone(family: str, tokenizer, **rmt) -> RMTForSequenceClassification:
    torch.manual_seed(0)
    pad = tokenizer.pad_token_id
    backbone = AutoModelForSequenceClassification.from_config(encoder_config(family, vocab_size=len(tokenizer),
                                                                              pad_token_id=pad))  # fmt: skip
    model = RMTForSequenceClassification.from_backbone(backbone, tokenizer=tokenizer, num_mem_tokens=2,
                                                       segment_size=6, **rmt)  # fmt: skip
    return with_written_values(model).eval()


@pytest.mark.parametrize("memory", list(MEMORIES))
@pytest.mark.parametrize("family", DECODER_TOKENIZERS)
def test_a_decoder_takes_its_tokenizers_ids_and_generates_a_padded_batch_as_each_prompt_alone(family, memory):
    tokenizer = family_tokenizer(DECODER_TOKENIZERS[family])
    model = decoder_from_backbone(family, tokenizer, **MEMORIES[memory])
    assert model.config.pad_token_id == tokenizer.pad_token_id
    generation = model.generation_config
    assert (generation.bos_token_id, generation.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    if tokenizer.pad_token_id is None:  # GPT-2 and Llama ship no pad token: users pad with EOS, which the mask hides
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    batch = tokenizer(TEXT[:3], return_tensors="pt", padding=True)
    if DECODER_TOKENIZERS[family] in ADDS_BOS:  # each prompt opens with BOS, after the padding
        first = batch["attention_mask"].argmax(1)
        assert torch.equal(batch["input_ids"][torch.arange(3), first], torch.full((3,), tokenizer.bos_token_id))
    assert batch["input_ids"].shape[1] > 2 * 6  # prompts cross segment boundaries, decoding crosses more
    width = batch["input_ids"].shape[1]
    together = greedy(model, batch["input_ids"], batch["attention_mask"], new_tokens=8)
    for i, text in enumerate(TEXT[:3]):
        alone = greedy(model, tokenizer(text, return_tensors="pt")["input_ids"], new_tokens=8)
        assert torch.equal(together.sequences[i, width:], alone.sequences[0, -8:]), f"row {i}"


@pytest.mark.parametrize("memory", list(MEMORIES))
@pytest.mark.parametrize("family", ENCODER_TOKENIZERS)
def test_an_encoder_takes_its_tokenizers_cls_sep_and_pad_and_classifies_a_padded_batch_as_each_alone(family, memory):
    if family == "albert" and memory == "armt":
        pytest.skip("ARMT is refused on ALBERT's shared layer (test_families_encoders)")
    tokenizer = family_tokenizer(ENCODER_TOKENIZERS[family])
    model = encoder_from_backbone(family, tokenizer, **MEMORIES[memory])
    for name in ("cls_token_id", "sep_token_id", "pad_token_id"):
        assert getattr(model.config, name) == getattr(tokenizer, name) is not None, name
    for side in ("right", "left"):
        tokenizer.padding_side = side
        batch = tokenizer(TEXT, return_tensors="pt", padding=True)
        with torch.no_grad():
            together = model(**batch).logits
            for i, text in enumerate(TEXT):
                alone = model(**tokenizer(text, return_tensors="pt")).logits
                content = tokenizer(text, return_tensors="pt", add_special_tokens=False)  # the same document
                assert content["input_ids"].shape[1] > 2 * 6, "documents of several segments"
                torch.testing.assert_close(together[i : i + 1], alone, atol=1e-5, rtol=1e-5, msg=f"{side} {i}")
                torch.testing.assert_close(model(**content).logits, alone, atol=1e-5, rtol=1e-5)


def test_an_encoder_given_a_tokenizer_without_cls_or_sep_names_the_missing_token_and_the_fix():
    tokenizer = family_tokenizer("GPT2Tokenizer")  # a decoder's: no [CLS], no [SEP]
    with pytest.raises(ValueError, match=r"config.cls_token_id is not set.*cls_token_id=tokenizer.bos_token_id"):
        encoder_from_backbone("bert", tokenizer)
    model = encoder_from_backbone("bert", tokenizer, cls_token_id=tokenizer.bos_token_id,
                                  sep_token_id=tokenizer.eos_token_id)  # fmt: skip
    ids = tokenizer(TEXT[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert model(input_ids=ids).logits.isfinite().all()


def test_the_backbones_generation_settings_survive_from_backbone_save_and_load(tmp_path):
    # Llama 3 stops on several EOS ids and ships sampling defaults in generation_config.json: the RMT keeps them.
    tokenizer = family_tokenizer("LlamaTokenizer")
    config = backbone_config("llama", vocab_size=len(tokenizer), **special_ids(tokenizer))
    backbone = AutoModelForCausalLM.from_config(config)
    backbone.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=[2, 7],
                                                  do_sample=True, temperature=0.6, top_p=0.9)  # fmt: skip
    backbone.save_pretrained(tmp_path / "backbone")
    tokenizer.save_pretrained(tmp_path / "backbone")
    model = RMTForCausalLM.from_backbone(str(tmp_path / "backbone"), num_mem_tokens=2, segment_size=6, **ARMT)
    model.save_pretrained(tmp_path / "rmt")
    for generation in (model.generation_config, GenerationConfig.from_pretrained(tmp_path / "rmt")):
        assert generation.eos_token_id == [2, 7] and (generation.temperature, generation.top_p) == (0.6, 0.9)
        assert generation.pad_token_id is None  # neither the backbone nor the tokenizer names one
