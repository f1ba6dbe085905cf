"""Placement across devices: `_no_split_modules` names the backbone's layer class and ARMT's wrapped layer, so a
device map (`device_map="auto"`, FSDP's auto-wrap) cuts between layers, never inside one, and an ARMT layer keeps
its memory weights beside it. Planned here for three devices without any (accelerate's own planner)."""

from __future__ import annotations

import re
import warnings

import pytest
from accelerate import infer_auto_device_map
from accelerate.utils import compute_module_sizes
from families import MEMORIES, backbone_config, tiny_decoder, tiny_encoder


@pytest.mark.parametrize("memory", list(MEMORIES))
@pytest.mark.parametrize("kind", ["llama", "qwen3_moe", "bert"])
def test_a_device_map_cuts_between_layers_and_keeps_each_armt_layer_whole(kind, memory):
    if kind == "bert":
        model = tiny_encoder(kind, text_config_changes=dict(num_hidden_layers=6), **MEMORIES[memory])
    else:
        model = tiny_decoder(kind, text_config=backbone_config(kind, num_hidden_layers=6), **MEMORIES[memory])
    layer_class = type(model.backbone.base_model.get_submodule(
        "encoder.layer" if kind == "bert" else "layers")[0])  # fmt: skip
    expected = {layer_class.__name__} | ({"AssociativeLayer"} if memory == "armt" else set())
    assert expected <= set(model._no_split_modules)
    total = compute_module_sizes(model)[""]
    with warnings.catch_warnings():  # accelerate notes that devices 0 and 1 are absent: only the plan is wanted
        warnings.simplefilter("ignore")
        plan = infer_auto_device_map(model, max_memory={0: total // 2, 1: total // 2, "cpu": total},
                                     no_split_module_classes=list(model._no_split_modules))  # fmt: skip
    layers = [name for name in plan if re.search(r"\.(layers|layer)\.\d+", name)]
    assert layers, plan  # the layers went to more than one device, each whole
    assert all(re.fullmatch(r".*\.(layers|layer)\.\d+", name) for name in layers), plan
    assert len({plan[name] for name in layers}) >= 2, plan
