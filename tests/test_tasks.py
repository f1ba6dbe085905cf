"""The memory tasks: lengths in tokens, where the facts sit, answers that follow from the facts."""

from __future__ import annotations

import re

import pytest
from transformers import AutoTokenizer

from rmt_tools.backbones import minilm_path
from rmt_training.tasks import (
    DIRECTIONS,
    NAMES,
    PLACES,
    TASKS,
    TokenizedNoise,
    build_task_dataset,
    make_sample,
    noise_sentences,
)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(minilm_path()))


@pytest.fixture(scope="module")
def noise(tokenizer):
    return TokenizedNoise(tokenizer, "shakespeare")


FACT = re.compile(r"(Mary|John|Daniel|Sandra) (travelled to|went to|moved to|journeyed to|went back to) the (\w+)\.")
RELATION = re.compile(r"The (\w+) is (north|south|east|west) of the (\w+)\.")


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("num_tokens", [60, 805, 20_000])
def test_documents_fill_the_length_asked_for_in_tokens_of_the_tokenizer(tokenizer, noise, task, num_tokens):
    for index in range(3):
        sample = make_sample(task, noise, tokenizer, num_tokens, seed=0, index=index)
        assert num_tokens - int(noise.sorted_lengths[0]) < len(sample.input_ids) <= num_tokens
        text = f"{sample.input} {sample.question}"
        assert tokenizer(text, add_special_tokens=False).input_ids == sample.input_ids


@pytest.mark.parametrize("task", [task for task in TASKS if task != "no_fact"])  # no_fact: test_unknown_label.py
def test_the_answer_follows_from_the_facts_in_the_document(tokenizer, noise, task):
    for index in range(40):
        sample = make_sample(task, noise, tokenizer, 300, seed=3, index=index)
        assert sample.target in PLACES and PLACES[sample.label] == sample.target
        if task == "reasoning":
            relations = RELATION.findall(sample.input)
            assert len(relations) == 2 and relations[0][2] == relations[1][2]
            asked = re.fullmatch(r"What is (\w+) of the (\w+)\?|What is the (\w+) (\w+) of\?", sample.question)
            if asked.group(1):  # "What is D of the hub?" -> the place that is D of the hub
                assert (sample.target, asked.group(1), asked.group(2)) in relations
            else:  # "What is the hub D of?" -> the place the hub is D of: that place is opposite(D) of the hub
                assert (sample.target, DIRECTIONS[asked.group(4)], asked.group(3)) in relations
        elif task == "qa1":  # the last place the person asked about went to, facts kept in story order
            moves = FACT.findall(sample.input)
            assert [f"{n} {v} the {p}." for n, v, p in moves] == sample.facts and len(moves) >= 2
            asked = sample.question.removeprefix("Where is ").removesuffix("?")
            assert [place for name, _, place in moves if name == asked][-1] == sample.target
        else:
            (name, _, place), *others = FACT.findall(sample.input)
            assert not others and sample.question == f"Where is {name}?" and place == sample.target


def test_memorize_puts_the_fact_first_and_detect_memorize_anywhere(tokenizer, noise):
    for index in range(10):
        assert FACT.match(make_sample("memorize", noise, tokenizer, 2_000, seed=0, index=index).input)
    starts = {
        FACT.search(make_sample("detect_memorize", noise, tokenizer, 2_000, seed=0, index=i).input).start()
        for i in range(10)
    }
    assert len(starts) >= 8 and max(starts) > 2_000  # spread over the whole document (characters)


def test_samples_are_a_pure_function_of_seed_and_index(tokenizer, noise):
    first = make_sample("detect_memorize", noise, tokenizer, 1_000, seed=5, index=7)
    assert make_sample("detect_memorize", noise, tokenizer, 1_000, seed=5, index=7) == first
    assert make_sample("detect_memorize", noise, tokenizer, 1_000, seed=6, index=7).input != first.input
    assert make_sample("detect_memorize", noise, tokenizer, 1_000, seed=5, index=8).input != first.input


def test_noise_never_names_the_people_of_the_facts_and_the_held_out_corpus_is_disjoint():
    shakespeare, milton = noise_sentences("shakespeare"), noise_sentences("milton")
    assert len(shakespeare) > 30_000 and len(milton) > 3_000
    assert not any(name in sentence for sentence in shakespeare + milton for name in NAMES)
    assert not set(shakespeare) & set(milton)


def test_technical_prose_corpora_are_disjoint_and_mix_with_literature_in_equal_shares():
    held_out, training = noise_sentences("python_docs"), noise_sentences("library_docs")
    assert len(held_out) > 3_000 and len(training) > 3_000
    assert not set(held_out) & set(training)  # the genre's evaluation text is not trained on
    assert not any(name in sentence for sentence in held_out + training for name in NAMES)
    assert not any(mark in sentence for sentence in held_out + training for mark in (">>>", "==", "__"))  # no code
    mixed = noise_sentences("shakespeare+library_docs")
    share = sum(sentence in set(training) for sentence in mixed) / len(mixed)
    assert 0.45 < share < 0.55 and set(mixed) == set(noise_sentences("shakespeare")) | set(training)


def test_a_length_too_short_for_the_facts_is_a_clear_error(tokenizer, noise):
    with pytest.raises(ValueError, match="cannot hold its facts and question.*at least"):
        make_sample("reasoning", noise, tokenizer, 10, seed=0, index=0)
    with pytest.raises(ValueError, match="Unknown task"):
        make_sample("summarize", noise, tokenizer, 100, seed=0, index=0)
    with pytest.raises(FileNotFoundError, match="No noise corpus"):
        noise_sentences("pg19")


def test_dataset_builder_gives_babilong_fields_and_encoder_inputs(tokenizer):
    data = build_task_dataset("detect_memorize", tokenizer, 500, size=6, seed=1, noise="milton")
    assert len(data) == 6 and {"input", "question", "target", "label", "input_ids", "attention_mask"} <= set(
        data.column_names
    )
    row = data[0]
    assert row["input_ids"][0] == tokenizer.cls_token_id and row["input_ids"][-1] == tokenizer.sep_token_id
    assert len(row["input_ids"]) <= 502 and PLACES[row["label"]] == row["target"]
    assert any(sentence in row["input"] for sentence in noise_sentences("milton")[:5000])
