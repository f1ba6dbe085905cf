"""The authors' newer releases (conversion/AUTHORS_LAYOUTS.md), built here with exactly the key names, files and
configs their code writes, convert with every key accounted for and the outputs of the model they hold:
- booydar's LoRA BABILong ARMTs: a PEFT backbone with LoRA unmerged, the layer list registered twice;
- irodkin's InnerLoopARMT: `memory`, `model.*` and its ARMTConfig, whose unimplemented settings are refused;
- irodkin's armt_babilong `.bin` (the layer list twice) and the Hub ARMTForCausalLM wrapper (`armt.*`, sharded);
- AIRI-NLP's PyTorchModelHubMixin RMT, whose config.json holds the wrapper's arguments."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file, save_model
from test_conversion_authors import LM_SEGMENT, LM_VOCAB, MEM, decoder_config

from conversion.from_authors import convert_authors_checkpoint, main
from modeling_rmt import RMTConfig, RMTForCausalLM
from modeling_rmt.memory import backbone_layers

IDS = torch.randint(3, LM_VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))  # three segments


class MemoryCell(torch.nn.Module):
    """The authors' (Associative)MemoryCell as registered: `model`, `memory`, and (ARMT) `layers`, the backbone's
    layer list a second time (`self.layers = self.model` then getattr down to it)."""

    def __init__(self, model: torch.nn.Module, memory: torch.Tensor, layers: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.model, self.memory = model, torch.nn.Parameter(memory.detach().clone())
        if layers is not None:
            self.layers = layers


def wrapper(cell: MemoryCell) -> torch.nn.Module:
    module = torch.nn.Module()
    module.memory_cell = cell
    return module


def armt(family: str, normalize: bool, heads: int = 1, **backbone) -> RMTForCausalLM:
    torch.manual_seed(0)
    config = RMTConfig(text_config=decoder_config(family).__class__(**{**decoder_config(family).to_dict(), **backbone}),
                       num_mem_tokens=MEM, segment_size=LM_SEGMENT, memory_type="armt", armt_d_mem=8,
                       armt_num_heads=heads, armt_normalize_features=normalize)  # fmt: skip
    model = RMTForCausalLM(config).eval()
    with torch.no_grad():  # W_mv starts at zero, which would leave the memory inert
        for layer in model.memory.layers:
            layer.W_mv.weight.normal_(0.0, 0.3)
    return model


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def lora_babilong_release(folder, form: str) -> torch.Tensor:
    """An ARMT over a PEFT-wrapped Llama with LoRA (r=2, alpha=8) on q_proj and v_proj, saved as the authors' trainer
    (`torch.save`) or Hub upload (`save_model`) would; returns the logits it computes."""
    ours = armt("llama", normalize=False)
    peft_backbone = get_peft_model(ours.backbone, LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # lora_B starts at zero: give the adapters an effect
        for name, parameter in peft_backbone.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.3)
    authors = wrapper(MemoryCell(peft_backbone, ours.memory.memory_tokens, backbone_layers(ours.backbone)))
    state = authors.state_dict()
    layer = "memory_cell.model.base_model.model.model.layers.0"
    attention = f"{layer}.layer.self_attn"
    assert {f"{attention}.q_proj.base_layer.weight", f"{attention}.v_proj.lora_A.default.weight",
            f"{layer}.W_mq.weight", "memory_cell.layers.0.W_mq.weight", "memory_cell.layers.1.layer.self_attn.q_proj"
            ".lora_B.default.weight", "memory_cell.memory"} <= set(state)  # fmt: skip
    folder.mkdir()
    if form == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:  # save_model keeps one name per shared tensor: here memory_cell.layers.*, the sorted-first
        save_model(authors, str(folder / "model.safetensors"))
    return logits(ours)


@pytest.mark.parametrize("form", ["bin", "safetensors"])
def test_lora_babilong_armt_converts_to_merged_weights_computing_what_the_adapted_model_computes(tmp_path, form):
    expected = lora_babilong_release(tmp_path / "release", form)
    decoder_config("llama").save_pretrained(tmp_path / "backbone")
    common = dict(backbone=tmp_path / "backbone", segment_size=LM_SEGMENT, armt_normalize_features=False)
    with pytest.raises(ValueError, match=r"unmerged LoRA weights \(rank 2 on q_proj, v_proj\).*pass lora_alpha"):
        convert_authors_checkpoint(tmp_path / "release", tmp_path / "unsaid", **common)
    converted, report = convert_authors_checkpoint(tmp_path / "release", tmp_path / "out", lora_alpha=8, **common)
    assert report.layout == "armt"
    assert any("LoRA (rank 2, alpha 8) merged into 4 weights of q_proj, v_proj" in note for note in report.notes)
    assert any("memory_cell.layers.* keys repeat the layers" in note for note in report.notes)
    assert not any("lora" in key for key in converted.state_dict())
    torch.testing.assert_close(logits(converted), expected, atol=2e-5, rtol=1e-5)  # merging rounds differently


def test_a_layer_copy_that_differs_from_its_layer_is_refused(tmp_path):
    ours = armt("gpt2", normalize=False)
    cell = MemoryCell(ours.backbone, ours.memory.memory_tokens, backbone_layers(ours.backbone))
    state = {key: value.clone() for key, value in wrapper(cell).state_dict().items()}
    assert "memory_cell.layers.1.W_mv.weight" in state and "memory_cell.model.transformer.h.1.W_mv.weight" in state
    decoder_config("gpt2").save_pretrained(tmp_path / "backbone")
    torch.save(state, tmp_path / "pytorch_model.bin")  # irodkin/armt_babilong_qa*: both names kept
    converted, report = convert_authors_checkpoint(tmp_path / "pytorch_model.bin", tmp_path / "out",
                                                   backbone=tmp_path / "backbone", segment_size=LM_SEGMENT,
                                                   armt_normalize_features=False)  # fmt: skip
    assert torch.equal(logits(converted), logits(ours))
    state["memory_cell.layers.1.W_mv.weight"] += 1.0
    torch.save(state, tmp_path / "damaged.bin")
    with pytest.raises(ValueError, match=r"memory_cell.layers.1.W_mv.weight should repeat .*transformer.h.1.W_mv"):
        convert_authors_checkpoint(tmp_path / "damaged.bin", tmp_path / "no", backbone=tmp_path / "backbone",
                                   segment_size=LM_SEGMENT, armt_normalize_features=False)  # fmt: skip


def test_the_hub_armt_wrapper_sharded_without_its_tied_head_converts(tmp_path):
    ours = armt("gpt2", normalize=True)  # GPT-2 ties lm_head to wte; the Hub save dropped the head
    cell = MemoryCell(ours.backbone, ours.memory.memory_tokens, backbone_layers(ours.backbone))  # layers twice
    state = {f"armt.memory_cell.{k.removeprefix('memory_cell.')}": v.clone().contiguous()
             for k, v in wrapper(cell).state_dict().items() if not k.endswith("lm_head.weight")}  # fmt: skip
    assert "armt.memory_cell.layers.0.W_mq.weight" in state
    split = split_torch_state_dict_into_shards(
        state, filename_pattern="model{suffix}.safetensors", max_shard_size=20_000
    )
    (tmp_path / "release").mkdir()
    for file, keys in split.filename_to_tensors.items():
        save_file({key: state[key] for key in keys}, tmp_path / "release" / file)
    index = tmp_path / "release" / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": split.tensor_to_filename}))
    decoder_config("gpt2").save_pretrained(tmp_path / "backbone")
    converted, report = convert_authors_checkpoint(index, tmp_path / "out", backbone=tmp_path / "backbone",
                                                   segment_size=LM_SEGMENT, armt_normalize_features=True)  # fmt: skip
    assert any("Hub ARMTForCausalLM" in note for note in report.notes)
    assert any("tied to" in note for note in report.notes)
    assert any("keys repeat the layers under memory_cell.model.transformer.h: checked equal" in n for n in report.notes)
    assert torch.equal(logits(converted), logits(ours))


INNER_LOOP_CONFIG = dict(model_type="armt", architectures=["InnerLoopARMTForCausalLM"], num_mem_tokens=MEM, d_mem=8,
                         segment_size=LM_SEGMENT, segment_alignment="left", sliding_window_enabled=False,
                         attend_to_previous_input=False, use_sink=False, layers_attr="model.layers", wrap_pos=False,
                         correction=True, n_heads=2, use_denom=True, gating=False, freeze_mem=False, act_on=False,
                         max_hop=4, act_type="associative", act_format="linear", noisy_halting=False,
                         constant_depth=False, time_penalty=0.0, model_dtype="float32", memory_dtype=None,
                         wrap_layers=None, attn_implementation=None, base_model_name=None)  # fmt: skip


def inner_loop_release(folder, **changes) -> RMTForCausalLM:
    """InnerLoopARMTForCausalLM's save: `memory` and `model.*` (no memory_cell), its ARMTConfig beside them."""
    ours = armt("llama", normalize=True, heads=2)
    state = {"memory": ours.memory.memory_tokens.detach().clone()}
    state |= {f"model.{k.removeprefix('backbone.')}": v.clone() for k, v in ours.state_dict().items()
              if k.startswith("backbone.")}  # fmt: skip
    folder.mkdir()
    save_file(state, folder / "model.safetensors")
    config = {**INNER_LOOP_CONFIG, "base_model_config": decoder_config("llama").to_dict(), **changes}
    (folder / "config.json").write_text(json.dumps(config))
    return ours


def test_inner_loop_armt_converts_from_its_folder_alone(tmp_path, capsys):
    ours = inner_loop_release(tmp_path / "release")
    converted, report = convert_authors_checkpoint(tmp_path / "release", tmp_path / "out")  # no backbone, no sizes
    assert report.notes[0] == "settings from config.json (InnerLoopARMT's ARMTConfig)"
    config = converted.config
    assert (config.num_mem_tokens, config.segment_size, config.armt_d_mem, config.armt_num_heads) == (MEM, 5, 8, 2)
    assert config.armt_normalize_features is True and config.armt_correction is True
    assert torch.equal(logits(converted), logits(ours))
    main([str(tmp_path / "release"), str(tmp_path / "cli")])  # the command line needs no --backbone either
    assert "InnerLoopARMT keys" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"contradicts what was given: segment_size=7 \(the file: 5\)"):
        convert_authors_checkpoint(tmp_path / "release", tmp_path / "other", segment_size=7)


@pytest.mark.parametrize("setting, value", [
    ("sliding_window_enabled", True), ("use_sink", True), ("use_denom", False), ("gating", True), ("act_on", True),
    ("attend_to_previous_input", True), ("wrap_pos", True), ("wrap_layers", [1, 0]), ("segment_alignment", "right"),
])  # fmt: skip
def test_inner_loop_settings_this_armt_does_not_compute_are_refused_by_name(tmp_path, setting, value):
    inner_loop_release(tmp_path / "release", **{setting: value})
    with pytest.raises(ValueError, match=rf"does not implement.*{setting}={value!r}".replace("[", r"\[")):
        convert_authors_checkpoint(tmp_path / "release", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_sink_token_is_refused_and_a_backbone_named_only_by_id_is_asked_for(tmp_path):
    ours = inner_loop_release(tmp_path / "named", base_model_config=None, base_model_name="meta-llama/Llama-3.2-1B")
    with pytest.raises(ValueError, match=r"'meta-llama/Llama-3.2-1B', which is not in the file: pass backbone"):
        convert_authors_checkpoint(tmp_path / "named", tmp_path / "out")
    decoder_config("llama").save_pretrained(tmp_path / "backbone")  # that id's config, given
    converted, _ = convert_authors_checkpoint(tmp_path / "named", tmp_path / "given", backbone=tmp_path / "backbone")
    assert torch.equal(logits(converted), logits(ours))
    release = tmp_path / "sink"
    inner_loop_release(release)
    state = load_file(release / "model.safetensors") | {"sink": torch.zeros(1, 32)}
    save_file(state, release / "model.safetensors")  # a sink saved although the config says otherwise
    with pytest.raises(ValueError, match=r"holds sink: a learned sink token \(use_sink\)"):
        convert_authors_checkpoint(release, tmp_path / "out")


def test_the_hub_mixin_rmt_takes_its_segment_size_from_config_json(tmp_path):
    torch.manual_seed(0)
    config = RMTConfig(text_config=decoder_config("llama"), num_mem_tokens=MEM, segment_size=LM_SEGMENT)
    ours = RMTForCausalLM(config).eval()
    (tmp_path / "release").mkdir()
    save_model(
        wrapper(MemoryCell(ours.backbone, ours.memory.memory_tokens)), str(tmp_path / "release" / "model.safetensors")
    )
    mixin = {"k2": -1, "max_n_segments": 2, "segment_size": LM_SEGMENT, "vary_n_segments": False}
    (tmp_path / "release" / "config.json").write_text(json.dumps(mixin))
    decoder_config("llama").save_pretrained(tmp_path / "backbone")
    converted, report = convert_authors_checkpoint(
        tmp_path / "release", tmp_path / "out", backbone=tmp_path / "backbone"
    )
    assert report.layout == "decoder" and converted.config.segment_size == LM_SEGMENT
    assert "RecurrentWrapper's arguments" in report.notes[0]
    assert torch.equal(logits(converted), logits(ours))


def test_lora_on_a_transposed_backbone_is_refused(tmp_path):
    ours = armt("gpt2", normalize=False)  # GPT-2's Conv1D: PEFT adapts it with fan_in_fan_out
    peft_backbone = get_peft_model(ours.backbone, LoraConfig(r=2, lora_alpha=8, target_modules=["c_attn"],
                                                             fan_in_fan_out=True))  # fmt: skip
    torch.save(wrapper(MemoryCell(peft_backbone, ours.memory.memory_tokens)).state_dict(), tmp_path / "lora.bin")
    decoder_config("gpt2").save_pretrained(tmp_path / "backbone")
    with pytest.raises(ValueError, match="transposed .*Conv1D.*fan_in_fan_out"):
        convert_authors_checkpoint(tmp_path / "lora.bin", tmp_path / "out", backbone=tmp_path / "backbone",
                                   segment_size=LM_SEGMENT, armt_normalize_features=False, lora_alpha=8)  # fmt: skip
