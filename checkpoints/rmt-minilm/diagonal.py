"""Diagonal batching: exact long-input inference for layer-recurrent memory (ARMT).

With a memory in every layer, cell (layer l, segment s) needs only (l - 1, s) and (l, s - 1). Step i
therefore runs every cell (l, i - l) at once: L + S - 1 steps of one batched layer call instead of
L * S calls, the same arithmetic in another order.

The layers are the backbone's own code. A *grouped layer* is a copy of the first layer in which each
module holding weights (linear, Conv1D, norms) is replaced by a `GroupedModule` that keeps the weights
of all layers stacked and applies the right layer's weights to each cell: linears, GPT-2's Conv1D,
LayerNorm and the Llama-family RMSNorm as batched matmuls and broadcast scales written out here, any
other module through `torch.func.vmap` (same result, more Python overhead per call); everything
without weights (attention, rotary, activations) runs once on all cells folded into the batch. The
ARMT reads and writes are `memory.py`'s functions on the stacked ARMT weights.

The backbone itself is used around the layers, with stand-in modules in its layer list for the
duration of one call (`_stand_ins`): a first call per segment keeps the inputs the backbone gives
its first layer (embeddings, masks, rotary tables); once the segment has been through every layer a
second call has the stand-ins answer with that output, so final norms and heads are the backbone's
own as well. The ARMT layers themselves are never told about any of this.

`DiagonalExecutor` is the peer of the sequential loop (`pretrained.sequential_segments`), called the
same way; `RMTPreTrainedModel._segments` chooses between them. It lives in the model's
`diagonal_executor` attribute: built on first use, rebuilt when weights change, dropped by
`release_diagonal_weights()` and `train()`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from transformers.pytorch_utils import Conv1D

from .memory import AssociativeMemory, AssociativeState, associative_read, associative_write, backbone_layers

if TYPE_CHECKING:
    from .layout import BackboneCall


class GroupedModule(nn.Module):
    """One weight-holding module of a layer, run for several layers at once.

    Inputs arrive with the cells folded into the batch, `[cells * rows, ...]`; they are split per
    cell and each cell gets its own layer's weights (the `layers` of the current call) via vmap.
    """

    def __init__(self, template: nn.Module, stacked: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.template = [template]  # on the meta device; a list keeps it out of the module tree
        self.direct = _direct_forward(template)
        self.stacked = stacked
        self.layers: slice | torch.Tensor = slice(0, 0)
        self.cells = 0

    def forward(self, *args: Any) -> Any:
        weights = {name: value[self.layers] for name, value in self.stacked.items()}
        cells = self.cells
        direct = self.direct
        if direct is not None and len(args) == 1 and isinstance(args[0], torch.Tensor):
            return direct(self.template[0], weights, args[0].unflatten(0, (cells, -1))).flatten(0, 1)
        batched = [isinstance(a, torch.Tensor) and a.shape[0] % cells == 0 for a in args]
        split = [a.unflatten(0, (cells, -1)) if b else a for a, b in zip(args, batched, strict=True)]
        in_dims = (0, *[0 if b else None for b in batched])

        def run(layer_weights: dict[str, torch.Tensor], *inputs: Any) -> Any:
            return functional_call(self.template[0], layer_weights, inputs)

        return vmap(run, in_dims=in_dims)(weights, *split).flatten(0, 1)


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
    """The direct per-cell computation for `module`'s exact type, or None (then vmap runs it)."""
    kind = type(module)
    if f"{kind.__module__}.{kind.__qualname__}" in _RMS_NORMS:
        return _rms_norm
    return _DIRECT.get(kind)


class GroupedLayer:
    """A copy of the backbone's layer whose weight-holding modules serve all layers at once."""

    def __init__(self, layers: list[nn.Module]) -> None:
        template = copy.deepcopy(layers[0]).to("meta")
        self.grouped: list[GroupedModule] = []
        paths: list[str] = []
        for path, module in list(template.named_modules()):
            holds = list(module.named_parameters(recurse=False)) or list(module.named_buffers(recurse=False))
            if not holds or any(path.startswith(grouped + ".") for grouped in paths):
                continue
            if not path:
                raise ValueError("The backbone's layer holds weights of its own; diagonal batching cannot group it.")
            params, buffers = stack_module_state([layer.get_submodule(path) for layer in layers])
            grouped = GroupedModule(module, {name: value.detach() for name, value in {**params, **buffers}.items()})
            template.set_submodule(path, grouped)
            paths.append(path)
            self.grouped.append(grouped)
        self.template = template

    def __call__(self, layers: slice | torch.Tensor, cells: int, *args: Any, **kwargs: Any) -> Any:
        for grouped in self.grouped:
            grouped.layers, grouped.cells = layers, cells
        return self.template(*args, **kwargs)


class DiagonalExecutor:
    """The diagonal segment executor of one model: the peer of `pretrained.sequential_segments`, called the
    same way, holding the grouped backbone layer and the stacked ARMT weights (rebuilt when weights change)."""

    def __init__(self, memory: AssociativeMemory) -> None:
        self.memory = memory
        self.key = self._weights_key()
        layers = memory.layers
        self.layer = GroupedLayer([layer.layer for layer in layers])
        self.W_mq = torch.stack([layer.W_mq.weight for layer in layers]).detach()
        self.write_weights = tuple(torch.stack([layer.write_weights[i] for layer in layers]).detach() for i in range(4))
        self.num_heads, self.correction, self.normalize = layers[0].num_heads, layers[0].correction, layers[0].normalize

    def _weights_key(self) -> tuple:
        return tuple((p.data_ptr(), p._version, p.dtype) for layer in self.memory.layers for p in layer.parameters())

    def is_current(self) -> bool:
        return self._weights_key() == self.key

    def __call__(self, model: Any, plan: Any, memory_state: Any, **backbone_kwargs: Any) -> Iterator[tuple]:
        """Yield (segment, outputs, memory) for every segment in order, as the sequential loop does; the
        memory is only complete after the last segment (earlier yields carry None)."""
        layer_list = _layer_list(model)
        state = model._initial_state(plan.batch_size, memory_state)
        num_layers, num_segments = len(self.memory.layers), plan.num_segments
        A = list(state.A.unbind(1))  # per layer, [B, H, d_key/H, d_model/H]
        z = list(state.z.unbind(1))
        work: dict[int, _SegmentWork] = {}
        for step in range(num_layers + num_segments - 1):
            if step < num_segments:
                work[step] = _capture(model, layer_list, plan.segment(step), backbone_kwargs)
            cells = [(layer, step - layer) for layer in range(num_layers) if 0 <= step - layer < num_segments]
            groups: dict[Any, list[tuple[int, int]]] = {}
            for layer, number in cells:
                item = work[number]
                key = (item.hidden.shape, _signature(item.args[1:]), _signature(item.kwargs))
                groups.setdefault(key, []).append((layer, number))
            for group in groups.values():
                _run_cells(self, work, group, A, z)
            finished = step - num_layers + 1
            if finished >= 0:
                item = work.pop(finished)
                last = finished == num_segments - 1
                final = AssociativeState(torch.stack(A, dim=1), torch.stack(z, dim=1)) if last else None
                yield item.segment, _replay(layer_list, item), final


@dataclass
class _SegmentWork:
    """A segment on its way through the layers."""

    segment: Any
    call: BackboneCall  # how the head runs the segment through the backbone
    args: tuple
    kwargs: dict
    hidden: torch.Tensor  # input of the next layer
    output: Any = None  # the last layer's output


def _signature(value: Any) -> Any:
    """What must agree for cells to share one batched call."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)):
        return tuple(_signature(v) for v in value)
    if isinstance(value, dict):
        return tuple((k, _signature(v)) for k, v in value.items())
    return (
        "value",
        type(value).__name__,
        value if isinstance(value, (bool, int, float, str, type(None))) else id(value),
    )


def _merge(values: list[Any], rows: int) -> Any:
    """One layer input for all cells: per-row tensors are concatenated along the batch, others shared."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        if first.dim() >= 2 and first.shape[0] in (1, rows):
            return torch.cat([v.expand(rows, *v.shape[1:]) for v in values])
        return first
    if isinstance(first, (tuple, list)):
        return type(first)(_merge([v[i] for v in values], rows) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _merge([v[k] for v in values], rows) for k in first}
    return first


def _cell_slice(output: Any, cell: int, rows: int) -> Any:
    """The part of a grouped layer's output that belongs to one cell."""
    if isinstance(output, torch.Tensor):
        return output[cell * rows : (cell + 1) * rows]
    if isinstance(output, tuple):
        return tuple(_cell_slice(part, cell, rows) for part in output)
    return output


class _StandIn(nn.Module):
    """Takes a backbone layer's place for one backbone call and answers `respond(args, kwargs)` without
    running it; the attributes the backbone reads from its layers (e.g. `attention_type`) are the layer's."""

    def __init__(self, layer: nn.Module, respond: Callable[[tuple, dict], Any]) -> None:
        super().__init__()
        self.respond = respond
        self.__dict__["layer"] = layer  # not a submodule

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["layer"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.respond(args, kwargs)


@contextmanager
def _stand_ins(layer_list: nn.ModuleList, responses: list[Callable[[tuple, dict], Any]]) -> Iterator[None]:
    """Stand-ins in place of the backbone's layers for the duration of one backbone call."""
    layers = list(layer_list)
    for number, (layer, respond) in enumerate(zip(layers, responses, strict=True)):
        layer_list[number] = _StandIn(layer, respond)
    try:
        yield
    finally:
        for number, layer in enumerate(layers):
            layer_list[number] = layer


def _layer_list(model: Any) -> nn.ModuleList:
    """The backbone's list of layers, which holds the ARMT layers."""
    layer_list = backbone_layers(model.backbone)
    if list(layer_list) != list(model.memory.layers):
        raise ValueError("The backbone's layer list does not hold the ARMT layers; diagonal batching cannot run it.")
    return layer_list


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a backbone passes its layer."""
    return args[0] if args else kwargs["hidden_states"]


def _capture(model: Any, layer_list: nn.ModuleList, segment: Any, backbone_kwargs: dict) -> _SegmentWork:
    """The inputs the backbone gives its layers for `segment`: one backbone call with stand-ins for the
    layers, the first keeping what it is given, all passing the hidden states on."""
    call = model._backbone_call(segment, model.memory.init_state(segment.rows.numel()), **backbone_kwargs)
    captured: list[tuple[tuple, dict]] = []

    def keep(args: tuple, kwargs: dict) -> torch.Tensor:
        captured.append((args, kwargs))
        return _hidden(args, kwargs)

    with _stand_ins(layer_list, [keep] + [_hidden] * (len(layer_list) - 1)):
        call.module(**call.inputs)
    if not captured:
        raise RuntimeError("The backbone did not call its first ARMT layer; diagonal batching cannot run it.")
    args, kwargs = captured[0][0], dict(captured[0][1])
    hidden = args[0] if args else kwargs.pop("hidden_states")
    return _SegmentWork(segment, call, (hidden, *args[1:]), kwargs, hidden)


def _replay(layer_list: nn.ModuleList, item: _SegmentWork) -> Any:
    """The segment's outputs once its layers have all run: the backbone called again, its layers standing
    in with the last layer's output, so that final norms and heads are the backbone's own."""

    def last_output(args: tuple, kwargs: dict) -> Any:
        return item.output

    with _stand_ins(layer_list, [last_output] * len(layer_list)):
        outputs = item.call.module(**item.call.inputs)
    if getattr(outputs, "hidden_states", None) is not None:  # the layers did not run: only the last state is known
        last = item.output[0] if isinstance(item.output, tuple) else item.output
        outputs["hidden_states"] = (last,)
    return item.call.finish(outputs)


def _run_cells(
    executor: DiagonalExecutor,
    work: dict[int, _SegmentWork],
    group: list[tuple[int, int]],
    A: list[torch.Tensor],
    z: list[torch.Tensor],
) -> None:
    """One batched call: read, layer and write for cells (layer, segment) of the same shape."""
    layer_numbers = [layer for layer, _ in group]
    first = layer_numbers[0]
    contiguous = layer_numbers == list(range(first, first + len(group)))
    device = A[0].device
    index = slice(first, first + len(group)) if contiguous else torch.tensor(layer_numbers, device=device)
    items = [work[number] for _, number in group]
    rows = [item.segment.rows.to(device) for item in items]
    cells, width = len(group), items[0].hidden.shape[0]
    A_cells = torch.stack([A[layer].index_select(0, r) for (layer, _), r in zip(group, rows, strict=True)])
    z_cells = torch.stack([z[layer].index_select(0, r) for (layer, _), r in zip(group, rows, strict=True)])
    hidden = torch.stack([item.hidden for item in items])  # [cells, rows, T, d]
    read = associative_read(hidden, A_cells, z_cells, executor.W_mq[index], executor.num_heads, executor.normalize)
    hidden = (hidden + read).flatten(0, 1)
    args = _merge([item.args[1:] for item in items], width)
    kwargs = _merge([item.kwargs for item in items], width)
    output = executor.layer(index, cells, hidden, *args, **kwargs)
    out_hidden = output[0] if isinstance(output, tuple) else output
    memory_index = torch.stack([item.call.memory_index for item in items])
    out_cells = out_hidden.unflatten(0, (cells, width))
    memory_outputs = out_cells.gather(2, memory_index[..., None].expand(-1, -1, -1, out_cells.shape[-1]))
    weights = tuple(w[index] for w in executor.write_weights)
    new_A, new_z = associative_write(
        A_cells, z_cells, memory_outputs, weights, executor.num_heads, executor.correction, executor.normalize
    )
    for cell, ((layer, _), item, r) in enumerate(zip(group, items, rows, strict=True)):
        item.hidden = out_cells[cell]
        if layer == len(A) - 1:
            item.output = _cell_slice(output, cell, width)
        full = r.numel() == A[layer].shape[0]
        A[layer] = new_A[cell] if full else A[layer].index_copy(0, r, new_A[cell])
        z[layer] = new_z[cell] if full else z[layer].index_copy(0, r, new_z[cell])
