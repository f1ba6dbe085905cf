"""The committed trained decoders `checkpoints/rmt-minilm-qa1` (RMT) and `checkpoints/armt-minilm-qa1` (its
ARMT twin) answer qa1 (their folders are checked with the others in `test_checkpoint.py`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from rmt_training.babilong import babilong_correct
from rmt_training.decoder import ANSWER_RESERVE
from rmt_training.evaluate_lengths import decoder_correct
from rmt_training.tasks import PLACES, TokenizedNoise, make_sample

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
DECODERS = ["rmt-minilm-qa1", "armt-minilm-qa1"]
TEST_SEED = 5_000_011  # documents neither training, validation nor the length evaluation used


@pytest.fixture(scope="module", params=DECODERS)
def decoder(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model_and_tokenizer(decoder):
    folder = CHECKPOINTS / decoder
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(folder)


def test_the_twins_differ_in_their_memory_only():
    configs = [json.loads((CHECKPOINTS / name / "config.json").read_text()) for name in DECODERS]
    assert [config["memory_type"] for config in configs] == ["rmt", "armt"]
    backbones = [{key: value for key, value in config["text_config"].items() if key != "dtype"} for config in configs]
    assert backbones[0] == backbones[1]  # (the nested dtype depends on what export loaded; the weights are float16)
    assert configs[0]["segment_size"] == configs[1]["segment_size"] == 128


@pytest.mark.parametrize("name", DECODERS)
def test_its_tokenizer_leaves_prompts_as_trained(name):
    """Training prompts carry no [CLS]/[SEP]; a tokenizer that added them would put [SEP], the
    token that ends answers, right where the answer should start."""
    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINTS / name)
    ids = tokenizer("Mary went to the kitchen. Where is Mary?")["input_ids"]
    assert ids == tokenizer("Mary went to the kitchen. Where is Mary?", add_special_tokens=False)["input_ids"]
    assert tokenizer.sep_token_id not in ids and tokenizer.cls_token_id not in ids


@pytest.mark.parametrize("name", DECODERS)
def test_its_tokenizer_names_the_tokens_generation_ends_and_pads_with(name):
    """Harnesses stop at `tokenizer.eos_token_id` (lm-evaluation-harness cannot generate without one)."""
    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINTS / name)
    generation = json.loads((CHECKPOINTS / name / "generation_config.json").read_text())
    ends = generation["eos_token_id"] if isinstance(generation["eos_token_id"], list) else [generation["eos_token_id"]]
    assert tokenizer.eos_token_id == ends[0] == tokenizer.sep_token_id  # answers end at [SEP]
    assert tokenizer.pad_token_id == generation["pad_token_id"]
    assert tokenizer.model_max_length >= 2**24  # whole documents: never truncated by the tokenizer


@pytest.mark.parametrize("segments, least_correct", [(1, 18), (5, 17)])
def test_it_answers_held_out_documents(model_and_tokenizer, segments, least_correct):
    model, tokenizer = model_and_tokenizer
    noise = TokenizedNoise(tokenizer, "milton")
    prompt_tokens = segments * model.config.segment_size - ANSWER_RESERVE
    samples = [make_sample("qa1", noise, tokenizer, prompt_tokens, TEST_SEED, i) for i in range(20)]
    with torch.no_grad():
        correct = decoder_correct(model, tokenizer, samples)
    assert correct >= least_correct  # chance: about 3 of 20


@pytest.mark.parametrize("name", DECODERS)
def test_the_text_generation_pipeline_answers_a_document_of_several_segments_and_stops(name):
    generator = pipeline("text-generation", model=str(CHECKPOINTS / name), trust_remote_code=True, dtype=torch.float32)
    ends = generator.model.generation_config.eos_token_id
    assert (ends if isinstance(ends, list) else [ends]) == [generator.tokenizer.sep_token_id]  # answers end so
    noise = TokenizedNoise(generator.tokenizer, "milton")
    samples = [make_sample("qa1", noise, generator.tokenizer, 1_000, TEST_SEED, 100 + i) for i in range(4)]
    answers = [
        generator(f"{sample.input} {sample.question}", max_new_tokens=8, do_sample=False, return_full_text=False)[0][
            "generated_text"
        ]
        for sample in samples
    ]
    scored = [babilong_correct(answer, sample.target, sample.question, "qa1", labels=PLACES)
              for answer, sample in zip(answers, samples, strict=True)]  # fmt: skip
    assert sum(scored) >= 3, answers
    stopped = [len(answer.split()) == 1 for answer in answers]  # one word, then the end token
    assert sum(stopped) >= 3, answers  # without the end token in its generation config: none


def test_the_armt_twin_answers_from_its_layer_memories():
    """With W_mv zeroed its memories stay empty, and five-segment documents are answered only where the
    story sits in the question's segment."""
    model = AutoModelForCausalLM.from_pretrained(CHECKPOINTS / "armt-minilm-qa1", trust_remote_code=True,
                                                 dtype=torch.float32).eval()  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINTS / "armt-minilm-qa1")
    noise = TokenizedNoise(tokenizer, "milton")
    prompt_tokens = 5 * model.config.segment_size - ANSWER_RESERVE
    samples = [make_sample("qa1", noise, tokenizer, prompt_tokens, TEST_SEED, 200 + i) for i in range(20)]
    with torch.no_grad():
        with_memory = decoder_correct(model, tokenizer, samples)
        for layer in model.memory.layers:
            layer.W_mv.weight.zero_()
        without_memory = decoder_correct(model, tokenizer, samples)
    assert with_memory >= 17 and without_memory <= with_memory - 6, (with_memory, without_memory)


def test_export_names_the_end_token_in_a_tokenizer_without_one_and_refuses_a_different_one(tmp_path):
    from conversion.export import ExportError, export_checkpoint

    source = tmp_path / "final"
    shutil.copytree(CHECKPOINTS / "rmt-minilm-qa1", source)
    (source / ".rmt-export.json").unlink()
    tokenizer_config = json.loads((source / "tokenizer_config.json").read_text())
    tokenizer_config.pop("eos_token", None)  # as training saved it before: an encoder's tokenizer names none
    (source / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    assert AutoTokenizer.from_pretrained(source).eos_token_id is None
    export_checkpoint(source, tmp_path / "out")
    assert AutoTokenizer.from_pretrained(tmp_path / "out").eos_token == "[SEP]"
    generation = json.loads((source / "generation_config.json").read_text())
    (source / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": 5}))
    tokenizer_config["eos_token"] = "[SEP]"
    (source / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    with pytest.raises(ExportError, match="eos token is id 102 but the model's generation config uses 5"):
        export_checkpoint(source, tmp_path / "other")
    assert not (tmp_path / "other").exists()
