"""A classifier's labels for the tasks it trains on: the six places, and `unknown` when the tasks include
no_fact (documents that do not answer the question). A model trained on the six places gains the 7th label
with its head's six rows kept, so `--init-from` a 6-label model goes on from what it learned."""

from __future__ import annotations

import torch
from torch import nn

from .tasks import ID2LABEL, ID2LABEL_WITH_UNKNOWN, UNKNOWN


def labels_for(tasks: list[str]) -> dict[int, str]:
    """id2label for a classifier trained on `tasks`."""
    return ID2LABEL_WITH_UNKNOWN if "no_fact" in tasks else ID2LABEL


def head_projection(model: nn.Module) -> tuple[nn.Module, str, nn.Linear]:
    """(parent, attribute, linear) of the backbone head's output projection: the linear layer outside the base
    model whose outputs are the labels (BERT's `classifier`, RoBERTa's `classifier.out_proj`, a decoder's `score`)."""
    backbone = model.backbone
    base = backbone.base_model
    inside = {id(module) for module in base.modules()}
    found = [(name, module) for name, module in backbone.named_modules()
             if isinstance(module, nn.Linear) and id(module) not in inside
             and module.out_features == model.config.num_labels]  # fmt: skip
    if len(found) != 1:
        raise ValueError(f"Expected one output projection of {model.config.num_labels} labels in the backbone's "
                         f"head, found {[name for name, _ in found]}.")  # fmt: skip
    name, linear = found[0]
    parent_name, _, attribute = name.rpartition(".")
    return backbone.get_submodule(parent_name), attribute, linear


@torch.no_grad()
def add_unknown_label(model: nn.Module) -> None:
    """Give a classifier of the six places the label `unknown`: its head gains a row (zero weights, the mean of
    the others' biases), and its config the label. The six labels' logits are unchanged."""
    if list(model.config.id2label.values()) != list(ID2LABEL.values()):
        raise ValueError(f"add_unknown_label extends a classifier of {list(ID2LABEL.values())}, not of "
                         f"{list(model.config.id2label.values())}.")  # fmt: skip
    parent, attribute, old = head_projection(model)
    new = nn.Linear(old.in_features, old.out_features + 1, bias=old.bias is not None)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    new.weight.zero_()
    new.weight[: old.out_features] = old.weight
    if old.bias is not None:
        new.bias[: old.out_features] = old.bias
        new.bias[old.out_features] = old.bias.mean()
    setattr(parent, attribute, new)
    id2label = {**ID2LABEL, len(ID2LABEL): UNKNOWN}
    model.config.id2label, model.config.label2id = id2label, {label: i for i, label in id2label.items()}
    model.config.sync_labels_to_backbone()
