"""Grouped layers for diagonal batching: one copy of a backbone layer that runs several layers' weights at once.

A *grouped layer* is a copy of one layer in which each module holding weights (linear, Conv1D, norms, MoE
experts) is replaced by a `GroupedModule` that keeps the weights of all its layers stacked and applies the right
layer's weights to each cell. Linears, GPT-2's Conv1D, LayerNorm and the Llama-family RMSNorm run as batched
matmuls and broadcast scales written out here; any other module runs through `torch.func.vmap` (same result,
more Python overhead per call), except modules whose weights are stacked per expert (a parameter of three or
more dimensions: MoE experts pick their rows by the router's choice, which vmap cannot batch), which run cell by
cell. Everything without weights of its own (attention, activations, and tables every layer holds alike, such as
rotary frequencies) runs once on all cells folded into the batch.

Layers are grouped by structure, not by family: layers whose module trees and weight shapes agree share one
grouped layer (`layer_classes`); a layer that differs (ModernBERT's first layer has no attention norm) gets a
grouped layer of its own.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from transformers.pytorch_utils import Conv1D


def _linear(module: nn.Linear, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """`nn.Linear` per cell as one batched matmul; x is `[cells, ..., in]`, the weights `[cells, out, in]`."""
    return _batched_affine(x, weights["weight"].transpose(1, 2), weights.get("bias"))


def _conv1d(module: Conv1D, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Transformers' `Conv1D` (GPT-2) per cell; its weights are stored `[in, out]`."""
    return _batched_affine(x, weights["weight"], weights["bias"])


def _batched_affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    flat = x.flatten(1, -2)  # [cells, positions, in]
    out = torch.bmm(flat, weight) if bias is None else torch.baddbmm(bias.unsqueeze(1), flat, weight)
    return out.view(*x.shape[:-1], weight.shape[-1])


def _layer_norm(module: nn.LayerNorm, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """`nn.LayerNorm` per cell: normalise all cells at once, then each cell's own scale and shift."""
    shape = (x.shape[0],) + (1,) * (x.dim() - 1 - len(module.normalized_shape)) + tuple(module.normalized_shape)
    out = nn.functional.layer_norm(x, module.normalized_shape, None, None, module.eps)
    out = out * weights["weight"].view(shape)
    return out + weights["bias"].view(shape) if "bias" in weights else out


def _rms_norm(module: nn.Module, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The Llama-family RMSNorm (Llama, Qwen2, Mistral: the same forward) per cell."""
    normed = x.to(torch.float32)
    normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
    return weights["weight"].view(x.shape[0], *(1,) * (x.dim() - 2), x.shape[-1]) * normed.to(x.dtype)


# Modules computed per cell with batched products directly; any other module runs under vmap.
# The exact type is matched, so subclasses (quantised linears, say) keep their own forward.
_DIRECT = {nn.Linear: _linear, Conv1D: _conv1d, nn.LayerNorm: _layer_norm}
_RMS_NORMS = {f"transformers.models.{family}.modeling_{family}.{name}RMSNorm"
              for family, name in (("llama", "Llama"), ("qwen2", "Qwen2"), ("mistral", "Mistral"))}  # fmt: skip


def _direct_forward(module: nn.Module) -> Any:
    """The direct per-cell computation for `module`'s exact type, or None (then vmap or a loop runs it)."""
    kind = type(module)
    if f"{kind.__module__}.{kind.__qualname__}" in _RMS_NORMS:
        return _rms_norm
    return _DIRECT.get(kind)


def _fold(output: Any) -> Any:
    """A per-cell output `[cells, rows, ...]` (or a tuple of them) back to the folded batch `[cells * rows, ...]`."""
    if isinstance(output, torch.Tensor):
        return output.flatten(0, 1)
    if isinstance(output, tuple):
        return tuple(_fold(part) for part in output)
    return output


def _stack_cells(outputs: list[Any]) -> Any:
    """Per-cell outputs of a loop stacked as vmap would return them."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(outputs)
    if isinstance(first, tuple):
        return tuple(_stack_cells([output[i] for output in outputs]) for i in range(len(first)))
    return first


class GroupedModule(nn.Module):
    """One weight-holding module of a layer, run for several layers at once.

    Inputs arrive with the cells folded into the batch, `[cells * rows, ...]`; they are split per cell and
    each cell gets its own layer's weights (the `layers` of the current call): directly, under vmap, or cell
    by cell for expert-stacked weights (see the module docstring).
    """

    def __init__(self, template: nn.Module, stacked: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.template = [template]  # on the meta device; a list keeps it out of the module tree
        self.direct = _direct_forward(template)
        self.per_expert = any(value.dim() > 3 for value in stacked.values())  # [layers, experts, out, in]
        self.stacked = stacked
        self.layers: slice | torch.Tensor = slice(0, 0)
        self.cells = 0

    def __getattr__(self, name: str) -> Any:
        """What a module around this one reads from it (PEFT's LoRA layers read their linears' `weight.dtype`):
        a weight is all its layers' stacked (the dtype and device of each layer's own), anything else the
        template's (`in_features`, `eps`)."""
        stacked = self.__dict__.get("stacked")
        if stacked is not None and name in stacked:
            return stacked[name]
        template = self.__dict__.get("template")
        if template is not None and not name.startswith("_"):
            return getattr(template[0], name)
        return super().__getattr__(name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        weights = {name: value[self.layers] for name, value in self.stacked.items()}
        cells = self.cells
        if self.direct is not None and len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
            return self.direct(self.template[0], weights, args[0].unflatten(0, (cells, -1))).flatten(0, 1)
        names, values = list(kwargs), [*args, *kwargs.values()]
        batched = [isinstance(a, torch.Tensor) and a.shape[0] % cells == 0 for a in values]
        split = [a.unflatten(0, (cells, -1)) if b else a for a, b in zip(values, batched, strict=True)]

        def run(layer_weights: dict[str, torch.Tensor], *inputs: Any) -> Any:
            positional, named = inputs[: len(args)], dict(zip(names, inputs[len(args) :], strict=True))
            return functional_call(self.template[0], layer_weights, positional, named)

        if self.per_expert:
            outputs = [
                run({name: value[cell] for name, value in weights.items()},
                    *[a[cell] if b else a for a, b in zip(split, batched, strict=True)])
                for cell in range(cells)
            ]  # fmt: skip
            return _fold(_stack_cells(outputs))
        return _fold(vmap(run, in_dims=(0, *[0 if b else None for b in batched]))(weights, *split))


def structure(layer: nn.Module) -> tuple:
    """What two layers must share to run as one grouped layer: module paths and types, weight names and shapes."""
    return tuple(
        (path, type(module).__qualname__,
         tuple((name, tuple(value.shape), value.dtype) for name, value in
               [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]))
        for path, module in layer.named_modules()
    )  # fmt: skip


def _differs(modules: list[nn.Module]) -> bool:
    """Whether the modules hold weights of their own (parameters, or buffers that differ between layers)."""
    if any(True for _ in modules[0].parameters(recurse=False)):
        return True
    buffers = [dict(module.named_buffers(recurse=False)) for module in modules]
    return any(
        other.keys() != buffers[0].keys()
        or any(not torch.equal(value, buffers[0][name]) for name, value in other.items())
        for other in buffers[1:]
    )


class GroupedLayer:
    """A copy of the backbone's layer whose weight-holding modules serve all the given layers at once."""

    def __init__(self, layers: list[nn.Module]) -> None:
        template = copy.deepcopy(layers[0]).to("meta")
        self.grouped: list[GroupedModule] = []
        paths: list[str] = []
        for path, module in list(template.named_modules()):
            if any(path.startswith(grouped + ".") for grouped in paths):
                continue
            originals = [layer.get_submodule(path) for layer in layers]
            if not _differs(originals):  # constant tables (rotary frequencies, say) stay as they are, shared
                for name, value in originals[0].named_buffers(recurse=False):
                    module.register_buffer(name, value, persistent=name not in originals[0]._non_persistent_buffers_set)
                continue
            if not path:
                raise ValueError(
                    "diagonal_batching cannot group this backbone: its layer holds weights of its own, outside any "
                    "submodule. Set diagonal_batching=False to use the sequential loop."
                )
            params, buffers = stack_module_state(originals)
            grouped = GroupedModule(module, {name: value.detach() for name, value in {**params, **buffers}.items()})
            template.set_submodule(path, grouped)
            paths.append(path)
            self.grouped.append(grouped)
        self.template = template

    def __call__(self, layers: slice | torch.Tensor, cells: int, *args: Any, **kwargs: Any) -> Any:
        for grouped in self.grouped:
            grouped.layers, grouped.cells = layers, cells
        return self.template(*args, **kwargs)


class LayerClasses:
    """The backbone's layers sorted into classes of equal structure, each run by one `GroupedLayer`."""

    def __init__(self, layers: list[nn.Module]) -> None:
        classes: dict[tuple, list[int]] = {}
        for number, layer in enumerate(layers):
            classes.setdefault(structure(layer), []).append(number)
        self.members = list(classes.values())
        self.grouped = [GroupedLayer([layers[number] for number in members]) for members in self.members]
        self.of_layer = {number: kind for kind, members in enumerate(self.members) for number in members}
        self.position = {number: members.index(number) for members in self.members for number in members}

    def run(self, layer_numbers: list[int], *args: Any, **kwargs: Any) -> Any:
        """Run layers `layer_numbers` (all of one class) on their cells, folded into the batch of `args`."""
        positions = [self.position[number] for number in layer_numbers]
        first = positions[0]
        contiguous = positions == list(range(first, first + len(positions)))
        device = args[0].device
        index = slice(first, first + len(positions)) if contiguous else torch.tensor(positions, device=device)
        return self.grouped[self.of_layer[layer_numbers[0]]](index, len(positions), *args, **kwargs)
