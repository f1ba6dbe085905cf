"""Diagonal batching: exact long-input inference for layer-recurrent memory (ARMT).

With a memory in every layer, cell (layer l, segment s) needs only (l - 1, s) and (l, s - 1). Step i
therefore runs every cell (l, i - l) at once: L + S - 1 steps of one batched layer call instead of
L * S calls, the same arithmetic in another order.

The layers are the backbone's own code, run for several layers at once by grouped layers
(`grouping.py`: layers of equal structure share one). The ARMT reads and writes are `memory.py`'s
functions on the stacked ARMT weights.

The backbone itself is used around the layers, with stand-in modules in its layer list for the
duration of one call (`_stand_ins`): a first call per segment keeps the inputs the backbone gives
each layer (embeddings, masks, rotary tables: per layer, as hybrid local/global backbones give each
kind of layer its own); once the segment has been through every layer a second call has the
stand-ins answer with that output, so final norms and heads are the backbone's own as well. The ARMT
layers themselves are never told about any of this. The first call also checks what diagonal
batching assumes of the backbone: that it calls every layer, in order, on the previous layer's
output unchanged (a backbone that transforms hidden states between layers is refused by name).

`DiagonalExecutor` is the peer of the sequential loop (`pretrained.sequential_segments`), called the
same way; `RMTPreTrainedModel._segments` chooses between them. It lives in the model's
`diagonal_executor` attribute: built on first use, rebuilt when weights change, dropped by
`release_diagonal_weights()` and `train()`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .associative import associative_read, associative_write
from .grouping import LayerClasses
from .memory import AssociativeMemory, AssociativeState, backbone_layers

if TYPE_CHECKING:
    from .layout import BackboneCall


class DiagonalExecutor:
    """The diagonal segment executor of one model: the peer of `pretrained.sequential_segments`, called the
    same way, holding the grouped backbone layers and the stacked ARMT weights (rebuilt when weights change).

    `layer_output` turns a hidden state into what the backbone's layers return (a tensor, or a tuple led by
    it), learnt from one plain call of the first layer on the first segment."""

    def __init__(self, memory: AssociativeMemory) -> None:
        self.memory = memory
        self.key = self._weights_key()
        layers = memory.layers
        self.layers = LayerClasses([layer.layer for layer in layers])
        self.layer_output: Callable[[torch.Tensor], Any] | None = None
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
                work[step] = _capture(self, model, layer_list, plan.segment(step), backbone_kwargs)
            cells = [(layer, step - layer) for layer in range(num_layers) if 0 <= step - layer < num_segments]
            groups: dict[Any, list[tuple[int, int]]] = {}
            for layer, number in cells:
                args, kwargs = work[number].inputs[layer]
                key = (self.layers.of_layer[layer], work[number].hidden.shape, _signature(args), _signature(kwargs))
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
    inputs: list[tuple[tuple, dict]]  # per layer, what the backbone passes it besides the hidden states
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


def _capture(
    executor: DiagonalExecutor, model: Any, layer_list: nn.ModuleList, segment: Any, backbone_kwargs: dict
) -> _SegmentWork:
    """The inputs the backbone gives each layer for `segment`: one backbone call with stand-ins for the layers,
    each keeping what it is given and passing the hidden states on in the form a layer returns them."""
    call = model._backbone_call(segment, model.memory.init_state(segment.rows.numel()), **backbone_kwargs)
    received: list[tuple[torch.Tensor, tuple, dict]] = []

    def keep(args: tuple, kwargs: dict) -> Any:
        if executor.layer_output is None:
            executor.layer_output = _output_form(executor.memory.layers[0].layer(*args, **kwargs))
        rest = dict(kwargs)
        hidden = args[0] if args else rest.pop("hidden_states")
        received.append((hidden, args[1:], rest))
        return executor.layer_output(hidden)

    with _stand_ins(layer_list, [keep] * len(layer_list)):
        call.module(**call.inputs)
    _check_layers_chained([hidden for hidden, _, _ in received], len(layer_list))
    inputs = [(args, kwargs) for _, args, kwargs in received]
    return _SegmentWork(segment, call, inputs, received[0][0])


def _output_form(output: Any) -> Callable[[torch.Tensor], Any]:
    """What a layer that returned `output` returns for hidden states `h`: `h`, or `h` leading the same tuple."""
    if isinstance(output, tuple):
        rest = output[1:]
        return lambda hidden: (hidden, *rest)
    return lambda hidden: hidden


def _check_layers_chained(hidden: list[torch.Tensor], num_layers: int) -> None:
    """Diagonal batching feeds each layer the previous layer's output: the backbone must call every layer
    once, in order, and pass each layer's output on unchanged."""
    if len(hidden) != num_layers:
        raise ValueError(
            f"diagonal_batching cannot run this backbone: it called its layers {len(hidden)} times for "
            f"{num_layers} layers. Set diagonal_batching=False to use the sequential loop."
        )
    for number in range(1, num_layers):
        if hidden[number] is not hidden[number - 1] and not torch.equal(hidden[number], hidden[number - 1]):
            raise ValueError(
                f"diagonal_batching cannot run this backbone: it changes the hidden states between layers "
                f"{number - 1} and {number} (DeBERTa-v2's convolution after its first layer does), and the "
                "diagonal passes each layer's output straight on. Set diagonal_batching=False to use the "
                "sequential loop."
            )


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
    """One batched call: read, layer and write for cells (layer, segment) of one layer class and shape."""
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
    inputs = [item.inputs[layer] for (layer, _), item in zip(group, items, strict=True)]
    args = _merge([args for args, _ in inputs], width)
    kwargs = _merge([kwargs for _, kwargs in inputs], width)
    output = executor.layers.run(layer_numbers, hidden, *args, **kwargs)
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
