"""The authors' newer file formats: safetensors (as `save_file` and as huggingface_hub's `PyTorchModelHubMixin` save
through `save_model`, which keeps one name of tied weights) and checkpoints sharded with an index, safetensors or
torch.save shards; each converts to the model the pickled checkpoint converts to. A shard that does not hold what
its index maps to it, and a damaged file, are refused with the reason."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file, save_model
from test_conversion_authors import LM_SEGMENT, LM_VOCAB, MEM, authors_decoder, decoder_config, decoder_reference

from conversion.authors_files import NotACheckpointError, load_authors_checkpoint
from conversion.from_authors import convert_authors_checkpoint


class MemoryCell(torch.nn.Module):
    """The authors' wrapper as a module: `memory_cell.memory` beside `memory_cell.model` (GPT-2, tied head)."""

    def __init__(self, model: torch.nn.Module, memory: torch.Tensor) -> None:
        super().__init__()
        self.model, self.memory = model, torch.nn.Parameter(memory)


def write_source(folder, state: dict, gpt2, memory, form: str) -> str:
    """`state` written in `form`; returns the file to convert."""
    folder.mkdir()
    plain = {key: value.clone().contiguous() for key, value in state.items()}  # safetensors wants no shared storage
    if form == "safetensors":
        save_file(plain, folder / "model.safetensors")
        return "model.safetensors"
    if form == "hub-mixin":  # PyTorchModelHubMixin.save_pretrained: save_model, one name per tied tensor
        wrapper = torch.nn.Module()
        wrapper.memory_cell = MemoryCell(gpt2, memory)
        save_model(wrapper, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"num_mem_tokens": MEM, "segment_size": LM_SEGMENT}))
        return "model.safetensors"
    suffix = "safetensors" if form == "sharded-safetensors" else "bin"
    split = split_torch_state_dict_into_shards(plain, filename_pattern="model{suffix}." + suffix, max_shard_size=20_000)
    assert len(split.filename_to_tensors) >= 3
    for file, keys in split.filename_to_tensors.items():
        shard = {key: plain[key] for key in keys}
        save_file(shard, folder / file) if suffix == "safetensors" else torch.save(shard, folder / file)
    index = f"{'model.safetensors' if suffix == 'safetensors' else 'pytorch_model.bin'}.index.json"
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": split.tensor_to_filename}))
    return index


@pytest.mark.parametrize("form", ["safetensors", "hub-mixin", "sharded-safetensors", "sharded-bin"])
def test_newer_file_formats_convert_to_what_the_pickled_checkpoint_converts_to(tmp_path, form):
    gpt2, memory, state = authors_decoder()
    torch.save(state, tmp_path / "pytorch_model.bin")
    decoder_config().save_pretrained(tmp_path / "backbone")
    pickled, _ = convert_authors_checkpoint(tmp_path / "pytorch_model.bin", tmp_path / "from-bin",
                                            backbone=tmp_path / "backbone", segment_size=LM_SEGMENT)  # fmt: skip
    source = tmp_path / "source"
    name = write_source(source, state, gpt2, memory, form)
    read = load_authors_checkpoint(source / name)  # the mixin's save keeps one name of the tied head and embeddings
    assert read.keys() <= state.keys() and all(torch.equal(value, state[key]) for key, value in read.items())
    converted, report = convert_authors_checkpoint(source / name, tmp_path / "out", backbone=tmp_path / "backbone",
                                                   segment_size=LM_SEGMENT)  # fmt: skip
    assert report.layout == "decoder"
    reference = pickled.state_dict()
    assert converted.state_dict().keys() == reference.keys()
    assert all(torch.equal(value, reference[key]) for key, value in converted.state_dict().items())
    tokens = torch.randint(3, LM_VOCAB, (13,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = decoder_reference(gpt2, memory, tokens)
        torch.testing.assert_close(converted(input_ids=tokens[None]).logits, expected, atol=1e-5, rtol=1e-5)


def test_a_shard_that_does_not_hold_what_its_index_maps_to_it_is_refused(tmp_path):
    gpt2, memory, state = authors_decoder()
    index = tmp_path / "source" / write_source(tmp_path / "source", state, gpt2, memory, "sharded-safetensors")
    mapping = json.loads(index.read_text())
    moved = next(iter(mapping["weight_map"]))
    files = sorted(set(mapping["weight_map"].values()))
    mapping["weight_map"][moved] = next(file for file in files if file != mapping["weight_map"][moved])
    index.write_text(json.dumps(mapping))
    with pytest.raises(
        ValueError, match=rf"does not hold what model.safetensors.index.json maps to it: missing .*{moved}"
    ):
        load_authors_checkpoint(index)
    mapping["weight_map"][moved] = "../elsewhere.safetensors"
    index.write_text(json.dumps(mapping))
    with pytest.raises(FileNotFoundError, match="not a file beside it"):
        load_authors_checkpoint(index)


def test_a_damaged_safetensors_file_is_refused_with_the_reason(tmp_path):
    _, _, state = authors_decoder()
    save_file({key: value.clone().contiguous() for key, value in state.items()}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(NotACheckpointError, match="not a readable safetensors file"):
        load_authors_checkpoint(tmp_path)
