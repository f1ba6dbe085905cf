"""The authors' newer releases brought to the `memory_cell.*` layout `conversion.from_authors` converts
(conversion/AUTHORS_LAYOUTS.md describes each, as learned from the authors' code):

- InnerLoopARMT (irodkin/InnerLoopARMTForCausalLM_run_*): `memory`, `model.*`, no `memory_cell.` prefix, and
  a config.json of its `ARMTConfig` (`inner_loop_settings` maps it, refusing what our ARMT does not compute);
- the Hub `ARMTForCausalLM` wrapper: everything under `armt.`;
- a backbone wrapped by PEFT (booydar/RMT-Llama-3.2-1B-Instruct-*-lora-babilong-*): `memory_cell.model.
  base_model.model.*` with LoRA left unmerged; merged here as W + (alpha / r) B A;
- the wrapper's layer list registered a second time (`memory_cell.layers.{i}.*`, the same tensors): each
  copy is checked equal to the layer it repeats and dropped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedConfig
from transformers.pytorch_utils import Conv1D

from modeling_rmt.memory import backbone_layers

CELL, CELL_MODEL, PEFT_PREFIX = "memory_cell.", "memory_cell.model.", "base_model.model."
LAYER_COPY = re.compile(r"^memory_cell\.layers\.(\d+)\.(.+)$")
LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)\.(?P<adapter>[^.]+)\.weight$")
# Buffers older transformers saved in state dicts and current ones recompute or no longer have.
LEGACY_BUFFERS = re.compile(
    r"(^|\.)(attn\.bias|attn\.masked_bias|embeddings\.position_ids|embeddings\.token_type_ids|rotary_emb\.inv_freq)$"
)
NOT_IMPLEMENTED_KEYS = {
    re.compile(r"(^|\.)sink$"): "a learned sink token (use_sink) prepended to every segment",
    re.compile(r"\.act\."): "adaptive computation time (act_on) over the layers",
    re.compile(r"\.lora_(embedding_[AB]|magnitude_vector)\."): "LoRA on embeddings or DoRA, which are not merged here",
}
# InnerLoopARMT's ARMTConfig: the settings our ARMT computes as well, and those it would compute otherwise.
INNER_LOOP_DEFAULTS = {"use_denom": True, "gating": False, "act_on": False, "attend_to_previous_input": False,
                       "wrap_pos": False, "use_sink": False, "sliding_window_enabled": False,
                       "segment_alignment": "left"}  # fmt: skip
INNER_LOOP_REASONS = {
    "sliding_window_enabled": "each segment also attends to the previous segment's tokens through a key-value cache",
    "use_sink": "a learned sink token is prepended to every segment",
    "use_denom": "reads are not divided by the normaliser z",
    "gating": "W_mb gates every dimension (a [d, d] gate) instead of one rate per head",
    "act_on": "adaptive computation time repeats layers",
    "attend_to_previous_input": "the previous segment's tokens are prepended to each segment",
    "wrap_pos": "the memory tokens get positions beyond the segment's",
    "segment_alignment": "segments are not cut from the start of the document",
}


INNER_LOOP_NAMES = {"num_mem_tokens": "num_mem_tokens", "segment_size": "segment_size", "d_mem": "armt_d_mem",
                    "n_heads": "armt_num_heads", "correction": "armt_correction"}  # fmt: skip
# RecurrentWrapper's keyword arguments (booydar's llm-pretrain branch); only segment_size changes inference.
HUB_MIXIN_FIELDS = {"segment_size", "max_n_segments", "vary_n_segments", "k2", "segment_alignment",
                    "return_all_logits", "sliding_window"}  # fmt: skip


def layers_path(backbone: nn.Module) -> str:
    """Where a causal LM keeps its list of layers (e.g. `model.layers`, `transformer.h`)."""
    layers = backbone_layers(backbone)
    return next(name for name, module in backbone.named_modules() if module is layers)


def is_inner_loop_config(config: Mapping[str, Any]) -> bool:
    """Whether a config.json beside the weights is InnerLoopARMT's (or the Hub ARMT wrapper's) `ARMTConfig`."""
    return config.get("model_type") == "armt" or any("ARMT" in name for name in config.get("architectures") or ())


def inner_loop_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """Our conversion settings for an InnerLoopARMT `ARMTConfig`; ValueError naming each setting it uses that our
    ARMT does not compute. Its `sliding_window` is saved as `sliding_window_enabled` (read either)."""
    values = dict(config)
    if "sliding_window_enabled" not in values and isinstance(values.get("sliding_window"), bool):
        values["sliding_window_enabled"] = values["sliding_window"]
    unsupported = [f"{name}={values[name]!r} ({reason})" for name, reason in INNER_LOOP_REASONS.items()
                   if name in values and values[name] != INNER_LOOP_DEFAULTS[name]]  # fmt: skip
    wrap_layers = values.get("wrap_layers")
    if wrap_layers is not None and not all(wrap_layers):
        unsupported.append(f"wrap_layers={wrap_layers} (layers without an associative memory)")
    if unsupported:
        raise ValueError(
            "The checkpoint's ARMTConfig uses settings this ARMT does not implement, so its outputs would differ: "
            f"{'; '.join(unsupported)}. Only checkpoints trained without them convert."
        )
    settings: dict[str, Any] = {"armt_normalize_features": True}  # the inner loop L2-normalises phi(q), phi(k)
    for theirs, ours in INNER_LOOP_NAMES.items():
        if values.get(theirs) is not None:
            settings[ours] = values[theirs]
    return settings


def hub_mixin_settings(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """Our settings from a config.json that PyTorchModelHubMixin wrote for the authors' RecurrentWrapper (its
    constructor's arguments: segment_size, max_n_segments, vary_n_segments, k2, ...); None for another config."""
    if "model_type" in config or "segment_size" not in config or not set(config) <= HUB_MIXIN_FIELDS:
        return None
    return {"segment_size": config["segment_size"]}  # the others are training settings (a curriculum's length)


def _check_not_implemented(state: Mapping[str, torch.Tensor]) -> None:
    for pattern, meaning in NOT_IMPLEMENTED_KEYS.items():
        found = [key for key in state if pattern.search(key)]
        if found:
            raise ValueError(f"The checkpoint holds {', '.join(found[:4])}: {meaning}, which this ARMT does not "
                             "implement, so it does not convert.")  # fmt: skip


def _to_memory_cell(state: dict[str, torch.Tensor], notes: list[str]) -> dict[str, torch.Tensor]:
    """InnerLoopARMT's and the Hub wrapper's keys under `memory_cell.`, as the other releases have them."""
    if state and all(key.startswith("armt.") for key in state):
        notes.append("keys under armt. (the Hub ARMTForCausalLM wrapper): read without that prefix")
        state = {key.removeprefix("armt."): value for key, value in state.items()}
    if "memory" in state and not any(key.startswith(CELL) for key in state):
        notes.append("InnerLoopARMT keys (memory, model.*): read as memory_cell.memory, memory_cell.model.*")
        state = {CELL + key: value for key, value in state.items()}
    return state


def _drop_layer_copies(state: dict[str, torch.Tensor], layers_path: str, notes: list[str]) -> dict[str, torch.Tensor]:
    """`memory_cell.layers.{i}.*` repeat `memory_cell.model.<layers_path>.{i}.*`: check and drop them (or keep
    them under that name where the file kept only the copy)."""
    copies = {key: LAYER_COPY.match(key) for key in state}
    copies = {key: match for key, match in copies.items() if match}
    if not copies:
        return state
    peft = any(key.startswith(CELL_MODEL + PEFT_PREFIX) for key in state)
    prefix = CELL_MODEL + (PEFT_PREFIX if peft else "") + layers_path
    kept = 0
    for key, match in copies.items():
        original = f"{prefix}.{match[1]}.{match[2]}"
        value = state.pop(key)
        if original not in state:
            state[original], kept = value, kept + 1
        elif not torch.equal(state[original], value):
            raise ValueError(f"{key} should repeat {original} (the same layer registered twice), but differs.")
    notes.append(f"{len(copies)} memory_cell.layers.* keys repeat the layers under {prefix}: checked equal"
                 + (f" ({kept} kept under that name, which the file had dropped)" if kept else ""))  # fmt: skip
    return state


def _merge_lora(
    state: dict[str, torch.Tensor], lora_alpha: float | None, notes: list[str], transposed: Callable[[], bool]
) -> dict[str, torch.Tensor]:
    """PEFT's unmerged LoRA folded into the weights: W = W_base + (alpha / r) B A, per module. `transposed()`: the
    backbone stores [in, out] weights (GPT-2's Conv1D), which PEFT adapts with fan_in_fan_out: refused."""
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key in list(state):
        if match := LORA.match(key):
            parts.setdefault((match["module"], match["adapter"]), {})[match["part"]] = state.pop(key)
    if not parts:
        return state
    adapters = sorted({adapter for _, adapter in parts})
    ranks = sorted({pair["A"].shape[0] for pair in parts.values() if "A" in pair})
    modules = sorted({module.rsplit(".", 1)[-1] for module, _ in parts})
    if lora_alpha is None:
        raise ValueError(
            f"The checkpoint holds unmerged LoRA weights (rank {', '.join(map(str, ranks))} on {', '.join(modules)}), "
            "and their scale alpha / r is not in the file: pass lora_alpha (--lora-alpha; the authors' BABILong "
            "LoRA runs used 32, PEFT's default is 8)."
        )
    if len(adapters) > 1:
        raise ValueError(f"The checkpoint holds several LoRA adapters ({', '.join(adapters)}); convert one at a time.")
    if transposed():
        raise ValueError("The backbone stores its linear weights transposed (GPT-2's Conv1D), which PEFT adapts with "
                         "fan_in_fan_out: merging that LoRA is not implemented here.")  # fmt: skip
    for (module, _), pair in parts.items():
        base_key = next((k for k in (f"{module}.base_layer.weight", f"{module}.weight") if k in state), None)
        if base_key is None or set(pair) != {"A", "B"}:
            raise ValueError(f"LoRA on {module} lacks its base weight or one of lora_A / lora_B.")
        base = state.pop(base_key)
        lora_A, lora_B = pair["A"].float(), pair["B"].float()
        if (lora_B.shape[0], lora_A.shape[1]) != tuple(base.shape):
            raise ValueError(
                f"LoRA on {module} does not merge as W + B A ({tuple(base.shape)} against B {tuple(lora_B.shape)}, "
                f"A {tuple(lora_A.shape)}); the checkpoint does not fit its own LoRA weights."
            )
        state[f"{module}.weight"] = (base.float() + (lora_alpha / lora_A.shape[0]) * lora_B @ lora_A).to(base.dtype)
        if (bias := state.pop(f"{module}.base_layer.bias", None)) is not None:
            state[f"{module}.bias"] = bias
    notes.append(f"LoRA (rank {', '.join(map(str, ranks))}, alpha {lora_alpha}) merged into {len(parts)} weights "
                 f"of {', '.join(modules)}")  # fmt: skip
    return state


def normalize_authors_keys(
    state: Mapping[str, torch.Tensor], backbone: Callable[[], nn.Module], lora_alpha: float | None, notes: list[str]
) -> dict[str, torch.Tensor]:
    """The state dict in the `memory_cell.memory` / `memory_cell.model.*` layout. `backbone()` gives the causal LM
    (on the meta device) whose layer list and weight layout the keys are read against, asked only when needed."""
    _check_not_implemented(state)
    state = _to_memory_cell(dict(state), notes)
    if any(LAYER_COPY.match(key) for key in state):
        state = _drop_layer_copies(state, layers_path(backbone()), notes)
    state = _merge_lora(state, lora_alpha, notes, lambda: any(isinstance(m, Conv1D) for m in backbone().modules()))
    if any(key.startswith(CELL_MODEL + PEFT_PREFIX) for key in state):
        notes.append("backbone keys under PEFT's base_model.model.: read without it")
        state = {key.replace(CELL_MODEL + PEFT_PREFIX, CELL_MODEL, 1): value for key, value in state.items()}
    return state


def source_config(
    source: str | Path, backbone_given: bool = False
) -> tuple[dict[str, Any], PreTrainedConfig | None, str | None]:
    """What a config.json beside the weights says: (our settings, the backbone's config where it holds one,
    a note), from InnerLoopARMT's `ARMTConfig` or a PyTorchModelHubMixin config; ({}, None, None) otherwise.
    A config that names its backbone only by id needs `backbone_given`."""
    source = Path(source)
    path = (source if source.is_dir() else source.parent) / "config.json"
    if not path.is_file():
        return {}, None, None
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not JSON: {error}") from error
    if not isinstance(config, dict):
        return {}, None, None
    if is_inner_loop_config(config):
        backbone = config.get("base_model_config")
        if isinstance(backbone, dict) and "model_type" in backbone:
            backbone = AutoConfig.for_model(**backbone)
        elif (backbone is not None or config.get("base_model_name")) and not backbone_given:
            named = backbone or config.get("base_model_name")
            raise ValueError(f"{path} builds its backbone from {named!r}, which is not in the file: pass backbone / "
                             "--backbone (that id's config, or a folder holding it).")  # fmt: skip
        else:
            backbone = None  # the one given is used
        return inner_loop_settings(config), backbone, f"settings from {path.name} (InnerLoopARMT's ARMTConfig)"
    settings = hub_mixin_settings(config)
    if settings is None:
        return {}, None, None
    return settings, None, f"settings from {path.name} (the RecurrentWrapper's arguments)"


def merged_settings(given: dict[str, Any], found: dict[str, Any]) -> dict[str, Any]:
    """`found` (from the checkpoint's config) with `given` added; a given value the file contradicts is an error."""
    clashes = [f"{name}={given[name]!r} (the file: {value!r})" for name, value in found.items()
               if given.get(name) is not None and given[name] != value]  # fmt: skip
    if clashes:
        raise ValueError(f"The checkpoint's config.json contradicts what was given: {'; '.join(clashes)}.")
    return {**found, **{name: value for name, value in given.items() if value is not None or name not in found}}


def recomputed_buffer(model: torch.nn.Module, key: str, value: torch.Tensor, source: str, notes: list[str]) -> bool:
    """Whether `key` is a buffer the backbone computes itself (checked equal) or one older transformers saved."""
    try:
        buffer = model.get_buffer(key)
    except AttributeError:
        buffer = None
    if buffer is not None:
        same = buffer.shape == value.shape and (
            torch.allclose(buffer.float(), value.float(), rtol=1e-5, atol=1e-6)
            if value.is_floating_point()
            else torch.equal(buffer, value.to(buffer.dtype))
        )
        if not same:
            raise ValueError(
                f"{source} differs from the {key} buffer the backbone computes: check --backbone's config."
            )
        notes.append(f"{source}: a buffer the backbone recomputes, checked equal")
        return True
    if LEGACY_BUFFERS.search(key):
        notes.append(f"{source}: a buffer older transformers saved; this version has none")
        return True
    return False


def fill_tied(target: Mapping[str, torch.Tensor], mapped: dict, notes: list[str]) -> None:
    """Weights the model ties (e.g. lm_head to wte): one given fills the others; all given must agree."""
    groups: dict[tuple, list[str]] = {}
    for key, tensor in target.items():
        if tensor.numel():
            groups.setdefault((tensor.data_ptr(), tuple(tensor.shape), tensor.stride()), []).append(key)
    for keys in groups.values():
        given = [key for key in keys if key in mapped]
        if len(keys) < 2 or not given:
            continue
        for key in given[1:]:
            if not torch.equal(mapped[key], mapped[given[0]]):
                raise ValueError(
                    f"The backbone config ties {key} to {given[0]} but the checkpoint holds different values for them; "
                    "pass a --backbone config with tie_word_embeddings=False."
                )
        for key in keys:
            if key not in mapped:
                mapped[key] = mapped[given[0]]
                notes.append(f"{key}: tied to {given[0]} (absent from the checkpoint)")
