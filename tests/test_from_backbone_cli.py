"""conversion.from_backbone's command line: RMT and ARMT checkpoints that load back, and impossible values refused
in one line (`error: ...`), never a traceback."""

from __future__ import annotations

import pytest
import torch
from conftest import word_tokenizer
from test_causal_lm import DECODERS, TOKENS, VOCAB, prompts
from test_conversion_authors import one_error_line
from transformers import AutoConfig, AutoModelForCausalLM

from conversion.from_backbone import main
from modeling_rmt import RMTForCausalLM
from modeling_rmt.memory import AssociativeLayer


@pytest.fixture
def tiny_llama(tmp_path):
    """A random Llama decoder with a word-level tokenizer, saved as a model folder."""
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=VOCAB, **DECODERS["llama"], **TOKENS)
    folder = tmp_path / "llama"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    word_tokenizer(VOCAB).save_pretrained(folder)
    return folder


def test_writes_an_armt_checkpoint_that_loads_back(tiny_llama, tmp_path, capsys):
    out = tmp_path / "armt"
    main([str(tiny_llama), str(out), "--head", "causal-lm", "--memory-type", "armt", "--num-mem-tokens", "2",
          "--segment-size", "8", "--armt-d-mem", "8", "--armt-num-heads", "2", "--no-armt-correction",
          "--armt-normalize-features"])  # fmt: skip
    assert f"saved RMT checkpoint to {out}" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(model, RMTForCausalLM)
    config = model.config
    assert (config.memory_type, config.num_mem_tokens, config.segment_size) == ("armt", 2, 8)
    assert (config.armt_d_mem, config.armt_num_heads, config.armt_correction, config.armt_normalize_features) == (
        8, 2, False, True,
    )  # fmt: skip
    layers = model.memory.layers
    assert len(layers) == 2 and all(isinstance(layer, AssociativeLayer) for layer in layers)
    assert all((layer.num_heads, layer.correction, layer.normalize) == (2, False, True) for layer in layers)
    backbone = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    ids = prompts([8])[0][None]  # one segment: an untrained ARMT (W_mv = 0) equals its backbone there
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, backbone(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_default_is_an_rmt_memory(tiny_llama, tmp_path):
    main([str(tiny_llama), str(tmp_path / "rmt"), "--head", "causal-lm", "--num-mem-tokens", "3"])
    config = AutoConfig.from_pretrained(tmp_path / "rmt")
    assert (config.memory_type, config.num_mem_tokens, config.segment_size) == ("rmt", 3, 64 - 2 * 3)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [(["--segment-size", "0"], "argument --segment-size: must be an integer >= 1, got 0"),
     (["--num-mem-tokens", "-1"], "argument --num-mem-tokens: must be an integer >= 1, got -1"),
     (["--bptt-depth", "-2"], "argument --bptt-depth: must be an integer >= -1, got -2"),
     (["--max-n-segments", "0"], "argument --max-n-segments: must be an integer >= 1, got 0"),
     (["--num-labels", "0"], "argument --num-labels: must be an integer >= 1, got 0"),
     (["--memory-type", "armt", "--armt-d-mem", "0"], "argument --armt-d-mem: must be an integer >= 1, got 0"),
     (["--memory-type", "lstm"], "argument --memory-type: invalid choice: 'lstm'"),
     (["--armt-d-mem", "8", "--no-armt-correction"],
      "--armt-d-mem, --armt-correction configure an ARMT memory: add --memory-type armt"),
     (["--head", "causal-lm", "--num-labels", "3"], "--num-labels is for --head sequence-classification")],
)  # fmt: skip
def test_impossible_arguments_are_refused_in_one_line(tmp_path, capsys, arguments, message):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "backbone"), str(tmp_path / "out"), *arguments])
    assert exit_info.value.code == 2 and message in one_error_line(capsys)


def test_config_and_loading_errors_are_one_line(tiny_llama, tmp_path, capsys):
    common = ["--head", "causal-lm", "--num-mem-tokens", "2"]
    with pytest.raises(SystemExit) as exit_info:  # RMTConfig's validation: 100 + 2 x 2 > 64 positions
        main([str(tiny_llama), str(tmp_path / "out"), *common, "--segment-size", "100"])
    assert exit_info.value.code == 1 and "error: A segment needs 104 positions" in one_error_line(capsys)
    with pytest.raises(SystemExit) as exit_info:  # ARMT heads must divide its key size
        main([str(tiny_llama), str(tmp_path / "out"), *common, "--memory-type", "armt", "--armt-d-mem", "9",
              "--armt-num-heads", "2"])  # fmt: skip
    assert exit_info.value.code == 1 and "armt_num_heads=2 must be an integer >= 1 dividing" in one_error_line(capsys)
    with pytest.raises(SystemExit) as exit_info:  # no such backbone
        main([str(tmp_path / "missing"), str(tmp_path / "out"), *common])
    assert exit_info.value.code == 1 and "error: " in one_error_line(capsys)
    with pytest.raises(SystemExit) as exit_info:  # an encoder head on a decoder
        main([str(tiny_llama), str(tmp_path / "out"), "--num-mem-tokens", "2"])
    assert exit_info.value.code == 1 and "error: " in one_error_line(capsys)
    with pytest.raises(SystemExit):  # the output folder is never written over
        main([str(tiny_llama), str(tiny_llama), *common])
    assert "not empty" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()
