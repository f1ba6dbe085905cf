"""Wrong values are refused with a clear ValueError, never read by truthiness: RMTConfig settings (from code and
from a hand-edited config.json), settings changed on a live model, and the inputs of forward() and generate()."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import CLS, SEP, VOCAB, encode, random_documents, tiny_backbone_config, tiny_classifier, tiny_rmt_config
from test_armt import ARMT, tiny_armt_lm
from test_causal_lm import VOCAB as LM_VOCAB
from test_causal_lm import left_pad, prompts, tiny_lm
from transformers import AutoConfig, AutoModelForSequenceClassification

from modeling_rmt import RMTConfig, RMTForSequenceClassification
from modeling_rmt import pretrained as pretrained_module

# ----- RMTConfig: types, misspelt keywords, config.json -------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_mem_tokens": "4"}, r"num_mem_tokens must be an integer, got '4' \(str\)"),
        ({"num_mem_tokens": 4.0}, r"num_mem_tokens must be an integer, got 4.0 \(float\)"),
        ({"num_mem_tokens": True}, r"num_mem_tokens must be an integer, got True \(bool\)"),
        ({"segment_size": True}, "segment_size must be an integer"),
        ({"bptt_depth": 2.0}, "bptt_depth must be an integer"),
        ({"max_n_segments": "3"}, "max_n_segments must be an integer or None"),
        ({**ARMT, "armt_d_mem": 8.0}, "armt_d_mem must be an integer"),
        ({**ARMT, "armt_num_heads": True}, "armt_num_heads must be an integer"),
        ({"cls_token_id": True}, "cls_token_id must be an integer or None"),
        ({"pad_token_id": "0"}, "pad_token_id must be an integer or None"),
        ({"armt_correction": 0}, r"armt_correction must be True or False, got 0 \(int\)"),
        ({"armt_correction": "no"}, "armt_correction must be True or False"),
        ({"armt_normalize_features": 1}, "armt_normalize_features must be True or False"),
        ({**ARMT, "diagonal_batching": "true"}, "diagonal_batching must be True or False"),
    ],
)
def test_counts_must_be_integers_and_flags_bools(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_rmt_config("bert", **kwargs)


@pytest.mark.parametrize("value", ["4", 4.0, True])
def test_from_backbone_names_a_memory_size_that_is_not_a_whole_number(value):
    # With segment_size left to its default, the size feeds the default's arithmetic: still the config's message.
    backbone = AutoModelForSequenceClassification.from_config(tiny_backbone_config("bert", num_labels=2))
    tokens = SimpleNamespace(cls_token_id=CLS, sep_token_id=SEP, pad_token_id=0)
    with pytest.raises(ValueError, match=rf"num_mem_tokens must be an integer, got {value!r}"):
        RMTForSequenceClassification.from_backbone(backbone, tokenizer=tokens, num_mem_tokens=value)


@pytest.mark.parametrize(
    ("typo", "field"),
    [("num_mem_token", "num_mem_tokens"), ("segmnet_size", "segment_size"), ("memory_typ", "memory_type"),
     ("armt_dmem", "armt_d_mem"), ("pad_token_ids", "pad_token_id"), ("diagonal_batchin", "diagonal_batching")],
)  # fmt: skip
def test_a_keyword_one_edit_from_a_setting_is_refused_naming_it(typo, field):
    with pytest.raises(ValueError, match=rf"RMTConfig got {typo}=4, which is not a setting: did you mean {field}\?"):
        tiny_rmt_config("bert", **{typo: 4})


def test_transformers_own_keywords_and_unrelated_extras_are_still_accepted():
    config = tiny_rmt_config(
        "bert", transformers_version="5.0.0", architectures=["RMTForSequenceClassification"], torch_dtype="float32",
        name_or_path="somewhere", output_attentions=False, attn_implementation="eager", my_note="kept",
    )  # fmt: skip
    assert config.my_note == "kept" and config.num_mem_tokens == 3  # transformers keeps unknown keys as attributes


def hand_edit(folder, edit) -> None:
    path = folder / "config.json"
    values = json.loads(path.read_text())
    edit(values)
    path.write_text(json.dumps(values))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda values: values.update(num_mem_tokens="4"), "num_mem_tokens must be an integer, got '4'"),
        (lambda values: values.update(segment_size=8.0), "segment_size must be an integer, got 8.0"),
        (lambda values: values.update(armt_correction="false"), "armt_correction must be True or False"),
        (lambda values: values.update(num_mem_token=values.pop("num_mem_tokens")), "did you mean num_mem_tokens"),
    ],
)
def test_a_hand_edited_config_json_is_checked_on_loading(tmp_path, edit, message):
    tiny_rmt_config("bert", num_mem_tokens=4).save_pretrained(tmp_path)
    assert RMTConfig.from_pretrained(tmp_path).num_mem_tokens == 4
    hand_edit(tmp_path, edit)
    for load in (RMTConfig.from_pretrained, AutoConfig.from_pretrained):
        with pytest.raises(ValueError, match=message):
            load(tmp_path)


def test_settings_given_to_from_pretrained_are_checked_too(tmp_path):
    tiny_rmt_config("bert").save_pretrained(tmp_path)
    assert RMTConfig.from_pretrained(tmp_path, segment_size=6).segment_size == 6
    with pytest.raises(ValueError, match="num_mem_tokens must be an integer"):
        RMTConfig.from_pretrained(tmp_path, num_mem_tokens="4")
    with pytest.raises(ValueError, match="Use segment_size <= 58"):
        RMTConfig.from_pretrained(tmp_path, segment_size=500)
    with pytest.raises(ValueError, match="did you mean segment_size"):
        RMTConfig.from_pretrained(tmp_path, segment_sizes=6)


# ----- settings changed on a live model ------------------------------------------------------------------


def batch(lengths=(20, 9), seed=0):
    return encode(random_documents(list(lengths), seed=seed))


@pytest.mark.parametrize(
    ("kwargs", "name", "value"),
    [({}, "num_mem_tokens", 5), ({}, "memory_type", "armt"), (ARMT, "armt_d_mem", 16), (ARMT, "armt_num_heads", 1),
     (ARMT, "armt_correction", False), (ARMT, "armt_normalize_features", True), (ARMT, "memory_type", "rmt")],
)  # fmt: skip
def test_settings_the_memory_is_built_from_cannot_change_on_a_live_model(tmp_path, kwargs, name, value):
    model = tiny_classifier("bert", **kwargs)
    built = getattr(model.config, name)
    inputs = batch()
    with torch.no_grad():
        before = model(**inputs).logits
    setattr(model.config, name, value)
    refused = rf"model.config.{name} was changed to {value!r}, but this model was built with {name}={built!r}"
    with pytest.raises(ValueError, match=refused):
        model(**inputs)
    with pytest.raises(ValueError, match=refused):  # nothing is written that could not be loaded back
        model.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    setattr(model.config, name, built)  # set back: the model runs as before
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").is_file()


def test_other_settings_changed_on_a_live_model_take_effect_and_save_loadably(tmp_path):
    model = tiny_classifier("bert")
    inputs = batch()
    model.config.segment_size = 4
    model.config.segment_alignment = "left"
    rebuilt = RMTForSequenceClassification(tiny_rmt_config("bert", segment_size=4, segment_alignment="left")).eval()
    rebuilt.load_state_dict(model.state_dict())
    model.save_pretrained(tmp_path / "saved")
    loaded = RMTForSequenceClassification.from_pretrained(tmp_path / "saved").eval()
    assert (loaded.config.segment_size, loaded.config.segment_alignment) == (4, "left")
    with torch.no_grad():
        logits = model(**inputs).logits
        assert torch.equal(logits, rebuilt(**inputs).logits)
        assert torch.equal(logits, loaded(**inputs).logits)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [("segment_size", 100, "Use segment_size <= 58"), ("num_mem_tokens", "3", "num_mem_tokens must be an integer"),
     ("diagonal_batching", 1, "diagonal_batching must be True or False"),
     ("diagonal_batching", True, "diagonal_batching needs a memory in every layer"),
     ("bptt_depth", -2, "bptt_depth must be -1")],
)  # fmt: skip
def test_impossible_values_set_on_a_live_model_are_refused_at_the_next_call(tmp_path, name, value, message):
    model = tiny_classifier("bert")
    setattr(model.config, name, value)
    with pytest.raises(ValueError, match=message):
        model(**batch())
    with pytest.raises(ValueError, match=message):
        model.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()


def test_diagonal_batching_can_still_be_toggled_on_a_live_armt_model():
    model = tiny_armt_lm("llama")
    ids = prompts([13])[0][None]
    with torch.no_grad():
        sequential = model(input_ids=ids).logits
        model.config.diagonal_batching = True
        diagonal = model(input_ids=ids).logits
        model.config.diagonal_batching = False
    torch.testing.assert_close(diagonal, sequential, atol=1e-5, rtol=1e-5)


# ----- inputs of forward() and generate() -------------------------------------------------------------------


@pytest.mark.parametrize("memory", [{}, ARMT])
@pytest.mark.parametrize("bad_id", [-1, VOCAB, VOCAB + 7])
def test_classifier_token_ids_outside_the_vocabulary_are_refused(memory, bad_id):
    model = tiny_classifier("bert", **memory)
    inputs = batch()
    inputs["input_ids"][1, 4] = bad_id
    with pytest.raises(
        ValueError, match=rf"input_ids\[1, 4\] is {bad_id}, outside the backbone's vocabulary of {VOCAB}"
    ):
        model(**inputs)


@pytest.mark.parametrize("memory", [{}, ARMT])
@pytest.mark.parametrize("bad_id", [-3, LM_VOCAB])
def test_causal_lm_token_ids_outside_the_vocabulary_are_refused_in_forward_and_generate(memory, bad_id):
    model = tiny_lm("llama", **memory)
    inputs = left_pad(prompts([12, 7]))
    inputs["input_ids"][0, 2] = bad_id
    message = rf"input_ids\[0, 2\] is {bad_id}, outside the backbone's vocabulary of {LM_VOCAB}"
    with pytest.raises(ValueError, match=message):
        model(**inputs)
    with pytest.raises(ValueError, match=message):
        model.generate(**inputs, max_new_tokens=2, pad_token_id=0)
    inputs["input_ids"][0, 2] = 5
    labels = inputs["input_ids"].clone()
    labels[1, 9] = LM_VOCAB
    with pytest.raises(ValueError, match=rf"labels\[1, 9\] is {LM_VOCAB}, outside the output vocabulary"):
        model(**inputs, labels=labels)


def test_classifier_labels_outside_the_classes_are_refused():
    model = tiny_classifier("bert", num_labels=3)
    for bad in (3, -1, -7):
        with pytest.raises(ValueError, match=rf"labels\[1\] is {bad}, outside this head's 3 classes \(0..2\)"):
            model(**batch(), labels=torch.tensor([0, bad]))


@pytest.mark.parametrize("segment_loss", ["final", "mean"])
def test_label_minus_100_leaves_a_document_out_of_the_loss_as_cross_entropy_does(segment_loss):
    model = tiny_classifier("bert", num_labels=3, segment_loss=segment_loss)
    documents = random_documents([20, 9, 14])
    with torch.no_grad():
        both = model(**encode(documents), labels=torch.tensor([2, -100, 1])).loss
        kept = model(**encode([documents[0], documents[2]]), labels=torch.tensor([2, 1])).loss
    assert torch.isfinite(both)
    torch.testing.assert_close(both, kept, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("logits_to_keep", [-1, 1.5, True, torch.tensor([3])])
def test_logits_to_keep_must_be_a_non_negative_int(logits_to_keep):
    model = tiny_lm("gpt2")
    with pytest.raises(ValueError, match="logits_to_keep must be an int >= 0"):
        model(**left_pad(prompts([9])), logits_to_keep=logits_to_keep)


@pytest.mark.parametrize("memory", [{}, ARMT])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_memory_state_of_another_dtype_is_cast_for_rmt_and_armt(memory, dtype):
    model = tiny_armt_lm("llama") if memory else tiny_lm("llama")
    first, second = prompts([11, 8])
    with torch.no_grad():
        state = model(input_ids=first[None]).memory_state
        expected = model(input_ids=second[None], memory_state=state).logits
        cast = tuple(part.to(dtype) for part in state) if memory else state.to(dtype)
        output = model(input_ids=second[None], memory_state=cast)
    back = tuple(part.to(dtype).float() for part in state) if memory else state.to(dtype).float()
    with torch.no_grad():
        reference = model(input_ids=second[None], memory_state=back).logits  # what the cast state holds
    assert torch.equal(output.logits, reference)
    if dtype == torch.float64:  # a float32 state in float64 loses nothing
        assert torch.equal(output.logits, expected)
    parts = output.memory_state if memory else (output.memory_state,)
    assert all(part.dtype == torch.float32 for part in parts)
    generated = model.generate(input_ids=second[None], memory_state=cast, max_new_tokens=3, pad_token_id=0)
    assert torch.equal(generated, model.generate(input_ids=second[None], memory_state=back, max_new_tokens=3,
                                                 pad_token_id=0))  # fmt: skip


@pytest.mark.parametrize("memory", [{}, ARMT])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_nan_or_infinite_memory_state_is_refused(memory, value):
    model = tiny_lm("llama", **memory)
    ids = prompts([8])[0][None]
    with torch.no_grad():
        state = model(input_ids=ids).memory_state
    if memory:
        state = (state[0].clone().index_fill_(1, torch.tensor([1]), value), state[1])
    else:
        state = state.clone().index_fill_(1, torch.tensor([0]), value)
    message = "memory_state holds NaN or infinite values .* or memory_state=None to start from the learned memory"
    with pytest.raises(ValueError, match=message):
        model(input_ids=ids, memory_state=state)
    with pytest.raises(ValueError, match=message):
        model.generate(input_ids=ids, memory_state=state, max_new_tokens=2, pad_token_id=0)
    classifier = tiny_classifier("bert", **memory)
    with torch.no_grad():
        good = classifier(**batch()).memory_state
    bad = (good[0], good[1].clone().fill_(value)) if memory else good.clone().fill_(value)
    with pytest.raises(ValueError, match=message):
        classifier(**batch(), memory_state=bad)
    with pytest.raises(ValueError, match="must hold floating-point values"):
        classifier(**batch(), memory_state=tuple(part.long() for part in good) if memory else good.long())


@pytest.mark.parametrize("memory", [{}, ARMT])
def test_inputs_are_checked_once_per_generate_call_not_per_decoding_step(monkeypatch, memory):
    model = tiny_lm("llama", **memory)
    ids = prompts([7, 12])  # the second prompt fills two segments: one is read before decoding
    with torch.no_grad():
        state = model(input_ids=ids[0][None]).memory_state
    calls = {"config": 0, "state": 0, "ids": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(model, "_check_config", counted("config", model._check_config))
    monkeypatch.setattr(model.memory, "prepare_state", counted("state", model.memory.prepare_state))
    monkeypatch.setattr(pretrained_module, "plan_segments", counted("ids", pretrained_module.plan_segments))
    model.generate(input_ids=ids[1][None], memory_state=state, max_new_tokens=12, pad_token_id=0)  # crosses 3 segments
    assert calls == {"config": 1, "state": 1, "ids": 1}
