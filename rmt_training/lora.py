"""LoRA fine-tuning of RMT models with PEFT (`pip install -e ".[peft]"`).

`lora_config(model)` builds the `LoraConfig` for an RMT classifier or causal LM: LoRA on every linear layer of
the backbone's base model, while the memory's own weights (the memory tokens; ARMT's `W_mq`, `W_mk`, `W_mv`,
`W_mb` in every layer) and a classifier's head train fully, through PEFT's `modules_to_save`. Give it to
`get_peft_model`; the adapter saves with `save_pretrained` (the trained memory included) and merges with
`merge_and_unload()`. `load_lora(model, folder)` loads a saved adapter onto a base RMT model (one loaded as
remote code too) after checking that every saved weight has a place of the same shape there: an adapter
trained on another memory type or backbone is refused with the differences, where PEFT would only warn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peft import LoraConfig, PeftConfig, PeftModel
from peft.tuners.tuners_utils import check_target_module_exists
from safetensors import safe_open
from torch import nn
from transformers.pytorch_utils import Conv1D

ARMT_WEIGHTS = ("W_mq", "W_mk", "W_mv", "W_mb")  # each ARMT layer's own: they train fully, never get LoRA
PEFT_PREFIX = "base_model.model."  # how PEFT names the wrapped model's weights in a saved adapter


def _check_rmt(model: nn.Module) -> None:
    if getattr(model.config, "model_type", None) != "rmt" or not hasattr(model, "backbone"):
        raise ValueError(
            f"lora_config and load_lora take an RMT model (RMTForSequenceClassification or RMTForCausalLM, or one "
            f"loaded with trust_remote_code); got {type(model).__name__}."
        )


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def _backbone_linears(model: nn.Module) -> list[str]:
    """Full names of the linear layers in the backbone's base model, the memory's own weights left out."""
    base = model.backbone.base_model
    prefix = next(name for name, module in model.named_modules() if module is base)
    return [f"{prefix}.{name}" for name, module in base.named_modules()
            if _is_linear(module) and name.rsplit(".", 1)[-1] not in ARMT_WEIGHTS]  # fmt: skip


def _fully_trained(model: nn.Module) -> list[str]:
    """The memory, ARMT's weights, and a classifier's head (what the backbone holds beside its base model)."""
    names = ["memory"]
    if model.config.memory_type == "armt":
        names += list(ARMT_WEIGHTS)
    if not model.can_generate():
        base = model.backbone.base_model
        names += [f"backbone.{name}" for name, child in model.backbone.named_children()
                  if child is not base and any(True for _ in child.parameters())]  # fmt: skip
    return names


def lora_config(model: nn.Module, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0,
                target_modules: list[str] | None = None, **kwargs: Any) -> LoraConfig:  # fmt: skip
    """The `LoraConfig` for this RMT model: LoRA of rank `r` on `target_modules` (default: every linear layer
    of the backbone's base model; names or suffixes, as PEFT takes them), the memory's own weights and a
    classifier's head trained fully. Other `LoraConfig` options pass through `kwargs`."""
    _check_rmt(model)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"r (the LoRA rank) must be an integer >= 1, got {r!r}.")
    targets = list(target_modules) if target_modules is not None else _backbone_linears(model)
    memory_targets = [name for name in targets if name.rsplit(".", 1)[-1] in ARMT_WEIGHTS or name == "memory"]
    if memory_targets:
        raise ValueError(
            f"target_modules {memory_targets} are the memory's own weights, which train fully (modules_to_save); "
            "leave them out of target_modules."
        )
    return LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets,
                      modules_to_save=_fully_trained(model),
                      task_type="CAUSAL_LM" if model.can_generate() else "SEQ_CLS", **kwargs)  # fmt: skip


def _saves_module(config: PeftConfig, name: str) -> bool:
    return any(name == target or name.endswith(f".{target}") for target in config.modules_to_save or ())


def expected_adapter_shapes(model: nn.Module, config: PeftConfig) -> dict[str, tuple[int, ...]]:
    """Every weight a LoRA adapter with `config` saves for `model`, and its shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, module in model.named_modules():
        if _is_linear(module) and check_target_module_exists(config, name):
            fan_in, fan_out = module.weight.shape if isinstance(module, Conv1D) else module.weight.shape[::-1]
            rank = (config.rank_pattern or {}).get(name.rsplit(".", 1)[-1], config.r)
            shapes[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (rank, fan_in)
            shapes[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (fan_out, rank)
        elif _saves_module(config, name):
            for weight, value in module.state_dict().items():
                shapes[f"{PEFT_PREFIX}{name}.{weight}"] = tuple(value.shape)
    return shapes


def saved_adapter_shapes(folder: str | Path) -> dict[str, tuple[int, ...]]:
    path = Path(folder) / "adapter_model.safetensors"
    if not path.is_file():
        raise ValueError(f"{folder} holds no adapter_model.safetensors: give the folder a PEFT save_pretrained wrote.")
    with safe_open(str(path), framework="pt") as saved:
        return {key: tuple(saved.get_slice(key).get_shape()) for key in saved.keys()}  # noqa: SIM118


def load_lora(model: nn.Module, folder: str | Path, is_trainable: bool = False) -> PeftModel:
    """`PeftModel.from_pretrained(model, folder)` once every weight the adapter saved has a place of the same shape
    in `model`, and every place there a saved weight (else a ValueError names the differences)."""
    _check_rmt(model)
    config = PeftConfig.from_pretrained(str(folder))
    expected, saved = expected_adapter_shapes(model, config), saved_adapter_shapes(folder)
    problems = [f"{key} is saved but has no place in this model" for key in saved.keys() - expected.keys()]
    problems += [f"{key} is missing from the adapter" for key in expected.keys() - saved.keys()]
    problems += [f"{key} has shape {saved[key]} in the adapter but {expected[key]} here"
                 for key in saved.keys() & expected.keys() if saved[key] != expected[key]]  # fmt: skip
    if problems:
        listed = "; ".join(sorted(problems)[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise ValueError(
            f"The adapter in {folder} does not fit this {model.config.memory_type.upper()} model over a "
            f"{model.config.text_config.model_type} backbone ({len(problems)} differences: {listed}). Load it onto "
            "the base it was trained on: the same backbone, memory_type and num_mem_tokens."
        )
    return PeftModel.from_pretrained(model, str(folder), is_trainable=is_trainable)
