"""conversion.from_authors: the authors' RMT / ARMT checkpoints become our checkpoint folders, key for key,
computing what the authors' models compute (references here are plain Transformers models, not our code)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import CLS, SEP, VOCAB, encode, random_documents, tiny_backbone_config, word_tokenizer
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2LMHeadModel,
)

from conversion.authors_files import NotACheckpointError, UnsafeCheckpointError, load_authors_checkpoint
from conversion.from_authors import convert_authors_checkpoint, detect_layout, main, to_authors_layout
from conversion.from_backbone import LONG_DOCUMENT_TOKENS
from modeling_rmt import RMTConfig, RMTForCausalLM, RMTForSequenceClassification

MEM, SEGMENT, LABELS = 3, 8, 3
LM_VOCAB, LM_SEGMENT = 64, 5
DECODERS = {
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2, n_positions=64),
    "llama": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=64),
}  # fmt: skip
LM_TOKENS = dict(vocab_size=LM_VOCAB, bos_token_id=1, eos_token_id=None, pad_token_id=0)


class NotATensor:
    """An arbitrary Python object: weights_only loading must refuse it."""


def decoder_config(family: str = "gpt2"):
    return AutoConfig.for_model(family, **DECODERS[family], **LM_TOKENS)


def convert(tmp_path, checkpoint, filename: str, backbone_config, **kwargs):
    """Save `checkpoint` as the authors did and the backbone's config, then convert them."""
    torch.save(checkpoint, tmp_path / filename)
    backbone_config.save_pretrained(tmp_path / "backbone")
    return convert_authors_checkpoint(tmp_path / filename, tmp_path / "out", backbone=tmp_path / "backbone", **kwargs)


# ----- synthetic checkpoints with the authors' key layouts ---------------------------------------


def authors_encoder(family: str = "bert", seed: int = 0):
    """The authors' encoder RMT: a backbone whose word embeddings gained MEM rows, saved by their trainer."""
    torch.manual_seed(seed)
    config = tiny_backbone_config(family, num_labels=LABELS, vocab_size=VOCAB + MEM, initializer_range=0.2)
    model = AutoModelForSequenceClassification.from_config(config).eval()  # weights large enough to tell inputs apart
    state = {f"model.{key}": value for key, value in model.state_dict().items()}
    base = model.base_model_prefix
    state[f"model.{base}.embeddings.position_ids"] = torch.arange(64)[None]  # saved by transformers 4.2x
    state["model.embeddings.weight"] = model.get_input_embeddings().weight.detach()
    state.update(
        mem_token_ids=torch.arange(VOCAB, VOCAB + MEM), cls_token=torch.tensor([CLS]), sep_token=torch.tensor(SEP)
    )
    checkpoint = {"model_state_dict": state, "optimizer_state_dict": {"state": {}, "param_groups": []}, "epoch": 3}
    return model, checkpoint


def authors_decoder(seed: int = 0):
    """The authors' decoder RMT (GPT-2): `memory_cell.memory` and the wrapped LM under `memory_cell.model`."""
    torch.manual_seed(seed)
    gpt2 = GPT2LMHeadModel(decoder_config("gpt2")).eval()
    memory = torch.randn(MEM, 32) * gpt2.transformer.wte.weight.std()
    state = {"memory_cell.memory": memory, **{f"memory_cell.model.{k}": v for k, v in gpt2.state_dict().items()}}
    for i in range(2):  # attention-mask buffers older GPT-2 code saved
        state[f"memory_cell.model.transformer.h.{i}.attn.bias"] = torch.ones(64, 64, dtype=torch.bool).tril()[
            None, None
        ]
        state[f"memory_cell.model.transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return gpt2, memory, state


def encoder_reference(model, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' recurrence, written out: right-aligned segments `[CLS] memory [SEP] tokens [SEP]`, next
    memory = last hidden states at the memory positions. Returns (logits, final memory)."""
    words = model.get_input_embeddings()
    memory = words.weight[VOCAB : VOCAB + MEM][None]
    ends = list(range(len(tokens), 0, -SEGMENT))[::-1]
    for end in ends:
        chunk = tokens[max(0, end - SEGMENT) : end]
        ids = torch.cat([torch.tensor([CLS]), chunk, torch.tensor([SEP])])[None]
        embeds = words(ids)
        embeds = torch.cat([embeds[:, :1], memory, words(torch.tensor([[SEP]])), embeds[:, 1:]], dim=1)
        out = model(inputs_embeds=embeds, token_type_ids=torch.zeros(embeds.shape[:2], dtype=torch.long),
                    output_hidden_states=True)  # fmt: skip
        memory = out.hidden_states[-1][:, 1 : 1 + MEM]
    return out.logits, memory


def decoder_reference(gpt2, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The authors' decoder recurrence: `[memory] tokens [memory]` per segment, logits of the tokens, next
    memory = last hidden states at the write positions."""
    memory, logits = memory[None], []
    for start in range(0, len(tokens), LM_SEGMENT):
        chunk = gpt2.transformer.wte(tokens[start : start + LM_SEGMENT][None])
        out = gpt2(inputs_embeds=torch.cat([memory, chunk, memory], dim=1), output_hidden_states=True)
        logits.append(out.logits[:, MEM : MEM + chunk.shape[1]])
        memory = out.hidden_states[-1][:, MEM + chunk.shape[1] :]
    return torch.cat(logits, dim=1)


# ----- outputs equal before and after ---------------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_encoder_one_segment_equals_the_plain_backbone_on_memory_token_ids(tmp_path, family):
    source, checkpoint = authors_encoder(family)
    model, report = convert(tmp_path, checkpoint, "model_best.pth", tiny_backbone_config(family), segment_size=SEGMENT)
    assert (report.layout, report.num_mem_tokens, model.config.num_labels) == ("encoder", MEM, LABELS)
    tokens = random_documents([6])[0]
    ids = torch.cat([torch.tensor([CLS]), torch.arange(VOCAB, VOCAB + MEM), torch.tensor([SEP]), tokens,
                     torch.tensor([SEP])])[None]  # fmt: skip
    with torch.no_grad():
        reference = source(input_ids=ids, token_type_ids=torch.zeros_like(ids), output_hidden_states=True)
        expected = reference.logits
        converted = model(**encode([tokens]))
        torch.testing.assert_close(converted.logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(converted.memory_state, reference.hidden_states[-1][:, 1 : 1 + MEM])
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    assert type(loaded).__name__ == "RMTForSequenceClassification"
    with torch.no_grad():
        torch.testing.assert_close(loaded(**encode([tokens])).logits, expected, atol=1e-5, rtol=1e-5)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForSequenceClassification"] == "modeling_rmt.RMTForSequenceClassification"
    assert (tmp_path / "out" / "modeling_rmt.py").is_file() and (tmp_path / "out" / "model.safetensors").is_file()
    assert any("position_ids" in note for note in report.notes)


def test_encoder_documents_of_many_segments_equal_the_authors_loop(tmp_path):
    source, checkpoint = authors_encoder()
    model, _ = convert(tmp_path, checkpoint, "model_best.pth", tiny_backbone_config("bert"), segment_size=SEGMENT)
    documents = random_documents([13, 8, 30], seed=1)  # 2, 1 and 4 segments; the first segment of 13 is short
    with torch.no_grad():
        batched = model(**encode(documents))
        for i, doc in enumerate(documents):
            logits, memory = encoder_reference(source, doc)
            torch.testing.assert_close(batched.logits[i], logits[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(batched.memory_state[i], memory[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lm_head_saved", [True, False])
def test_decoder_equals_gpt2_on_memory_embeddings(tmp_path, lm_head_saved):
    gpt2, memory, state = authors_decoder()
    if not lm_head_saved:  # tied to wte: may be absent
        del state["memory_cell.model.lm_head.weight"]
    model, report = convert(tmp_path, state, "pytorch_model.bin", decoder_config(), segment_size=LM_SEGMENT)
    assert (report.layout, model.config.memory_type, report.num_mem_tokens) == ("decoder", "rmt", MEM)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    tokens = torch.randint(3, LM_VOCAB, (12,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        one = gpt2(inputs_embeds=torch.cat([memory, gpt2.transformer.wte(tokens[:4]), memory])[None]).logits
        torch.testing.assert_close(model(input_ids=tokens[None, :4]).logits, one[:, MEM : MEM + 4])
        expected = decoder_reference(gpt2, memory, tokens)  # three segments
        torch.testing.assert_close(model(input_ids=tokens[None]).logits, expected, atol=1e-5, rtol=1e-5)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
        torch.testing.assert_close(loaded(input_ids=tokens[None]).logits, expected, atol=1e-5, rtol=1e-5)
    assert sum("attn.masked_bias" in note for note in report.notes) == 2


@pytest.mark.parametrize("family, normalize", [("llama", True), ("gpt2", False)])  # later code; the paper's
def test_armt_round_trip_through_the_authors_layout(tmp_path, family, normalize):
    torch.manual_seed(0)
    config = RMTConfig(text_config=decoder_config(family), num_mem_tokens=MEM, segment_size=LM_SEGMENT,
                       memory_type="armt", armt_d_mem=8, armt_num_heads=2,
                       armt_normalize_features=normalize)  # fmt: skip
    ours = RMTForCausalLM(config).eval()
    with torch.no_grad():  # W_mv starts at zero, which would leave the memory inert
        for layer in ours.memory.layers:
            layer.W_mv.weight.normal_(0.0, 0.3)
    exported = to_authors_layout(ours)
    layers = "memory_cell.model.model.layers" if family == "llama" else "memory_cell.model.transformer.h"
    assert {f"{layers}.1.W_mq.weight", f"{layers}.0.W_mb.bias", "memory_cell.memory"} <= set(exported)
    assert any(key.startswith(f"{layers}.0.layer.") for key in exported) and detect_layout(exported) == "armt"
    with pytest.raises(ValueError, match="does not record whether its code L2-normalised"):
        convert(tmp_path, exported, "unsaid.bin", decoder_config(family), segment_size=LM_SEGMENT)
    converted, report = convert(tmp_path, exported, "pytorch_model.bin", decoder_config(family),
                                segment_size=LM_SEGMENT, armt_normalize_features=normalize)  # fmt: skip
    assert (report.layout, converted.config.armt_d_mem, converted.config.armt_num_heads) == ("armt", 8, 2)
    assert converted.config.armt_normalize_features is normalize
    theirs = converted.state_dict()
    assert theirs.keys() == ours.state_dict().keys()
    assert all(torch.equal(value, theirs[key]) for key, value in ours.state_dict().items())
    ids = torch.randint(3, LM_VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        assert torch.equal(converted(input_ids=ids).logits, expected)
        assert torch.equal(loaded(input_ids=ids).logits, expected)


def test_encoder_round_trip_through_the_authors_layout(tmp_path):
    torch.manual_seed(0)
    config = RMTConfig(text_config=tiny_backbone_config("bert", num_labels=LABELS), num_mem_tokens=MEM,
                       segment_size=SEGMENT, cls_token_id=CLS, sep_token_id=SEP, pad_token_id=0)  # fmt: skip
    ours = RMTForSequenceClassification(config).eval()
    exported = to_authors_layout(ours)
    converted, _ = convert(tmp_path, {"model_state_dict": exported}, "model_best.pth", tiny_backbone_config("bert"),
                           segment_size=SEGMENT)  # fmt: skip
    assert all(torch.equal(value, converted.state_dict()[key]) for key, value in ours.state_dict().items())


# ----- every key accounted for ----------------------------------------------------------------------


def test_unknown_and_missing_keys_are_errors_naming_them(tmp_path):
    _, _, state = authors_decoder()
    with pytest.raises(ValueError, match=re.escape("memory_cell.gate.weight")):
        convert(tmp_path, {**state, "memory_cell.gate.weight": torch.zeros(2)}, "a.bin", decoder_config(),
                segment_size=LM_SEGMENT)  # fmt: skip
    inner = "memory_cell.model.transformer.h.0.mlp.extra.weight"  # under the backbone, but no such weight
    with pytest.raises(ValueError, match=re.escape(inner)):
        convert(tmp_path, {**state, inner: torch.zeros(2)}, "b.bin", decoder_config(), segment_size=LM_SEGMENT)
    missing = "memory_cell.model.transformer.h.1.ln_2.bias"
    with pytest.raises(ValueError, match=re.escape(missing)):
        convert(tmp_path, {k: v for k, v in state.items() if k != missing}, "c.bin", decoder_config(),
                segment_size=LM_SEGMENT)  # fmt: skip
    _, checkpoint = authors_encoder()
    checkpoint["model_state_dict"]["segment_counter"] = torch.tensor(0)
    with pytest.raises(ValueError, match="segment_counter"):
        convert(tmp_path, checkpoint, "d.pth", tiny_backbone_config("bert"), segment_size=SEGMENT)
    del checkpoint["model_state_dict"]["segment_counter"]
    del checkpoint["model_state_dict"]["model.classifier.bias"]
    with pytest.raises(ValueError, match=re.escape("model.classifier.bias")):
        convert(tmp_path, checkpoint, "e.pth", tiny_backbone_config("bert"), segment_size=SEGMENT)


def test_inconsistent_checkpoints_are_clear_errors(tmp_path):
    _, _, state = authors_decoder()
    untied = {**state, "memory_cell.model.lm_head.weight": torch.randn(LM_VOCAB, 32)}
    with pytest.raises(ValueError, match="tie_word_embeddings=False"):
        convert(tmp_path, untied, "a.bin", decoder_config(), segment_size=LM_SEGMENT)
    with pytest.raises(ValueError, match="segment"):
        convert(tmp_path, state, "b.bin", decoder_config())
    with pytest.raises(ValueError, match="num_mem_tokens=5"):
        convert(tmp_path, state, "c.bin", decoder_config(), segment_size=LM_SEGMENT, num_mem_tokens=5)
    _, checkpoint = authors_encoder()
    with pytest.raises(ValueError, match="roberta"):  # a BERT checkpoint with a RoBERTa config
        convert(tmp_path, checkpoint, "d.pth", tiny_backbone_config("roberta"), segment_size=SEGMENT)
    with pytest.raises(ValueError, match=f"{VOCAB + MEM} rows"):  # the extended vocabulary given as the backbone's
        convert(tmp_path, checkpoint, "e.pth", tiny_backbone_config("bert", vocab_size=VOCAB + MEM))
    ours = RMTForCausalLM(RMTConfig(text_config=decoder_config("llama"), num_mem_tokens=MEM, segment_size=LM_SEGMENT,
                                    memory_type="armt", armt_d_mem=8))  # fmt: skip
    with pytest.raises(
        ValueError, match=r"look like the armt layout.*W_mq\.weight"
    ):  # ARMT keys read as a plain decoder
        convert(tmp_path, to_authors_layout(ours), "f.bin", decoder_config("llama"), segment_size=LM_SEGMENT,
                layout="decoder")  # fmt: skip


def test_unknown_layout_names_the_keys_and_the_known_layouts(tmp_path):
    with pytest.raises(ValueError, match=r"foo\.weight.*encoder.*decoder.*armt"):
        detect_layout({"foo.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"foo\.weight"):
        convert(tmp_path, {"foo.weight": torch.zeros(1)}, "x.bin", decoder_config(), segment_size=LM_SEGMENT)


def test_pickles_with_python_objects_are_refused(tmp_path):
    _, _, state = authors_decoder()
    torch.save({"model_state_dict": state, "args": NotATensor()}, tmp_path / "model_best.pth")
    with pytest.raises(UnsafeCheckpointError, match="weights_only=True"):
        load_authors_checkpoint(tmp_path / "model_best.pth")
    torch.save({"model_state_dict": state}, tmp_path / "model_best.pth")
    assert load_authors_checkpoint(tmp_path).keys() == state.keys()


# ----- the command line and the tokenizer -----------------------------------------------------------


def test_command_line_saves_the_tokenizer_and_checks_its_size(tmp_path, capsys):
    _, _, state = authors_decoder()
    torch.save(state, tmp_path / "pytorch_model.bin")
    decoder_config().save_pretrained(tmp_path / "backbone")
    word_tokenizer(LM_VOCAB).save_pretrained(tmp_path / "backbone")  # a model folder: config and tokenizer
    main([str(tmp_path / "pytorch_model.bin"), str(tmp_path / "out"), "--backbone", str(tmp_path / "backbone"),
          "--segment-size", str(LM_SEGMENT), "--num-mem-tokens", str(MEM)])  # fmt: skip
    assert "decoder checkpoint -> RMTForCausalLM" in capsys.readouterr().out
    assert AutoTokenizer.from_pretrained(tmp_path / "out").model_max_length == LONG_DOCUMENT_TOKENS
    word_tokenizer(LM_VOCAB + 8).save_pretrained(tmp_path / "large")  # more tokens than embedding rows
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "pytorch_model.bin"), str(tmp_path / "out2"), "--backbone", str(tmp_path / "backbone"),
              "--segment-size", str(LM_SEGMENT), "--tokenizer", str(tmp_path / "large")])  # fmt: skip
    assert exit_info.value.code == 1
    assert re.search(rf"error: .*{LM_VOCAB + 8} tokens.*{LM_VOCAB} rows", one_error_line(capsys))
    saved = {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir()}
    with pytest.raises(SystemExit):  # an earlier conversion is never written over
        main([str(tmp_path / "pytorch_model.bin"), str(tmp_path / "out"), "--backbone", str(tmp_path / "backbone"),
              "--segment-size", str(LM_SEGMENT)])  # fmt: skip
    assert "not empty" in one_error_line(capsys)
    assert {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir()} == saved


def one_error_line(capsys) -> str:
    """What a command line printed on failure: one `error: ...` line, last on stderr (after any progress bars
    and argparse's usage), no traceback."""
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert "Traceback" not in captured.err and [line for line in lines if "error" in line] == lines[-1:], captured.err
    return lines[-1]


NOT_CHECKPOINTS = {
    "text": b"epoch 3, accuracy 0.97\nthis is a log, not weights\n",
    "zip": None,  # a zip archive that torch.save did not write
    "random": bytes(range(256)) * 8,
    "empty": b"",
    "pickle": b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00]\x94K\x01a.",  # pickle.dumps([1])
}


@pytest.mark.parametrize("kind", list(NOT_CHECKPOINTS))
def test_a_file_that_is_not_a_checkpoint_is_named_so(tmp_path, capsys, kind):
    import zipfile

    path = tmp_path / "model_best.pth"
    if kind == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("notes.txt", "hello")
    else:
        path.write_bytes(NOT_CHECKPOINTS[kind])
    with pytest.raises(NotACheckpointError, match=r"model_best\.pth is not a PyTorch checkpoint"):
        load_authors_checkpoint(path)
    decoder_config().save_pretrained(tmp_path / "backbone")
    with pytest.raises(SystemExit) as exit_info:
        main([str(path), str(tmp_path / "out"), "--backbone", str(tmp_path / "backbone"), "--segment-size", "5"])
    line = one_error_line(capsys)
    assert exit_info.value.code == 1 and "is not a PyTorch checkpoint" in line and "Python objects" not in line
    assert not (tmp_path / "out").exists()


def test_a_damaged_torch_file_is_not_read_as_unsafe(tmp_path):
    _, _, state = authors_decoder()
    torch.save(state, tmp_path / "whole.bin")
    data = (tmp_path / "whole.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(NotACheckpointError, match="not a PyTorch checkpoint.*truncated or damaged zip"):
        load_authors_checkpoint(tmp_path / "cut.bin")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [(["--segment-size", "0"], "argument --segment-size: must be an integer >= 1, got 0"),
     (["--segment-size", "-5"], "argument --segment-size: must be an integer >= 1, got -5"),
     (["--num-mem-tokens", "0"], "argument --num-mem-tokens: must be an integer >= 1, got 0"),
     (["--armt-num-heads", "0"], "argument --armt-num-heads: must be an integer >= 1, got 0"),
     (["--max-n-segments", "x"], "argument --max-n-segments: must be an integer >= 1, got 'x'")],
)  # fmt: skip
def test_command_line_refuses_impossible_counts_in_one_line(tmp_path, capsys, arguments, message):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "c.bin"), str(tmp_path / "out"), "--backbone", str(tmp_path), *arguments])
    assert exit_info.value.code == 2 and message in one_error_line(capsys)


def test_command_line_reports_config_and_loading_errors_in_one_line(tmp_path, capsys):
    _, _, state = authors_decoder()
    torch.save(state, tmp_path / "pytorch_model.bin")
    decoder_config().save_pretrained(tmp_path / "backbone")
    common = [str(tmp_path / "pytorch_model.bin"), str(tmp_path / "out"), "--backbone"]
    with pytest.raises(SystemExit) as exit_info:  # RMTConfig's validation: the segment does not fit 64 positions
        main([*common, str(tmp_path / "backbone"), "--segment-size", "100"])
    assert exit_info.value.code == 1 and "error: A segment needs 106 positions" in one_error_line(capsys)
    with pytest.raises(SystemExit):  # no such backbone folder
        main([*common, str(tmp_path / "missing"), "--segment-size", str(LM_SEGMENT)])
    assert "error: " in one_error_line(capsys)
    torch.save({"model_state_dict": state, "args": NotATensor()}, tmp_path / "unsafe.pth")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "unsafe.pth"), *common[1:], str(tmp_path / "backbone"), "--segment-size", "5"])
    assert "holds Python objects other than tensors" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()
