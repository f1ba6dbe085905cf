"""Memory carried across segments, one interface for RMT and ARMT.

The segment step (`RMTPreTrainedModel.step`) only talks to a memory module through:
`init_state` (a fresh state for a batch), `tokens` (the embeddings placed at the memory positions
of a segment), `reading` (a context in which the backbone runs; ARMT's layers read their
associative memory there and record their memory-token outputs), `collect` (what the memory
positions produced) and `write` (the next state), plus `select` / `update_rows` / `where` / `detach`
over the batch dimension of a state.

- `TokenMemory` (RMT): the state is `num_mem_tokens` vectors read as input embeddings and rewritten
  from the backbone's last hidden states at the memory positions.
- `AssociativeMemory` (ARMT): every backbone layer is wrapped in an `AssociativeLayer` (associative.py) holding a
  matrix memory (A, z). The same learned memory tokens enter every segment; each layer reads its
  memory before running and writes the memory tokens' outputs into it with the delta rule. The state
  is an `AssociativeState` (A, z) stacked over layers, batch first: A `[B, L, H, d_key/H, d_model/H]`,
  z `[B, L, H, d_key/H]`, kept in float32 whatever the backbone's dtype.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .associative import AssociativeLayer, LayerContext, gather_weights_for_write


@dataclass(frozen=True)
class AssociativeState:
    """ARMT's memory: every layer's matrix memory `A` [B, L, H, d_key/H, d_model/H] and normaliser `z`
    [B, L, H, d_key/H], batch first, float32. Reads like the tuple (A, z) it replaces (`A, z = state`,
    `state[0]`), and a plain tuple (A, z) is accepted wherever a state is (`AssociativeMemory.check_state`)."""

    A: torch.Tensor
    z: torch.Tensor

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.A, self.z))

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> torch.Tensor:
        """`state[0]` is A, `state[1]` z, as in the (A, z) tuple this state replaces."""
        return (self.A, self.z)[index]

    def map(self, function: Any, *others: AssociativeState) -> AssociativeState:
        """`function` applied to A and to z (with the same part of each of `others`)."""
        return AssociativeState(function(self.A, *(o.A for o in others)), function(self.z, *(o.z for o in others)))

    def to(self, *args: Any, **kwargs: Any) -> AssociativeState:
        """Both parts moved or cast as `torch.Tensor.to` does (accelerate moves outputs with it)."""
        return self.map(lambda part: part.to(*args, **kwargs))

    def layer(self, number: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `number`'s (A, z)."""
        return self.A[:, number], self.z[:, number]


MemoryState = torch.Tensor | AssociativeState


def _rows_where(rows: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """`new` in the documents where `rows` is True, `old` elsewhere (rows: [batch] bool)."""
    return torch.where(rows.view(-1, *([1] * (new.dim() - 1))), new, old)


class _BatchFirstState:
    """Batch-dimension operations on a memory's state (batch first), through the memory's `_map`: the
    function itself for RMT's tensor, `AssociativeState.map` for ARMT's."""

    @staticmethod
    def _map(function: Any, *states: Any) -> Any:
        raise NotImplementedError

    def select(self, state: MemoryState, rows: torch.Tensor) -> MemoryState:
        """The state of the documents `rows` (indices)."""
        return self._map(lambda part: part.index_select(0, rows.to(part.device)), state)

    def update_rows(self, state: MemoryState, rows: torch.Tensor, new_state: MemoryState) -> MemoryState:
        """`state` with the documents `rows` replaced by `new_state`."""
        if rows.numel() == self.batch_size(state):
            return new_state
        return self._map(lambda old, new: old.index_copy(0, rows.to(old.device), new.to(old.dtype)), state, new_state)

    def where(self, rows: torch.Tensor, new_state: MemoryState, state: MemoryState) -> MemoryState:
        """`new_state` where `rows` (bool, [batch]) is True, else `state`; no host synchronisation."""
        return self._map(lambda new, old: _rows_where(rows.to(old.device), new.to(old.dtype), old), new_state, state)

    def detach(self, state: MemoryState, rows: torch.Tensor | None = None) -> MemoryState:
        """Cut the gradient into `state` (only for the documents where `rows` is True, if given)."""
        if rows is None or bool(rows.all()):
            return self._map(lambda part: part.detach(), state)
        return self._map(lambda part: _rows_where(rows.to(part.device), part.detach(), part), state)

    @staticmethod
    def batch_size(state: MemoryState) -> int:
        return (state if isinstance(state, torch.Tensor) else state.A).shape[0]

    def prepare_state(self, state: Any, batch_size: int) -> MemoryState:
        """A user-supplied state, checked (`check_state`: shapes; finite floats) and cast to the dtype and device
        this memory keeps its state in (RMT: the memory tokens'; ARMT: float32), as every part of it is."""
        state = self.check_state(state, batch_size)
        parts = (state,) if isinstance(state, torch.Tensor) else tuple(state)
        if not all(part.is_floating_point() for part in parts):
            dtypes = ", ".join(str(part.dtype) for part in parts)
            raise ValueError(
                f"memory_state must hold floating-point values, got {dtypes}: pass a state a model returned."
            )
        if not bool(torch.stack([torch.isfinite(part).all() for part in parts]).all()):
            raise ValueError(
                "memory_state holds NaN or infinite values (from a diverged or overflowing run?): pass a finite state "
                "(one returned by a healthy call), or memory_state=None to start from the learned memory."
            )
        device, dtype = self.memory_tokens.device, self.state_dtype
        return self._map(lambda part: part.to(device=device, dtype=dtype), state)


class TokenMemory(nn.Module, _BatchFirstState):
    """RMT memory: `num_mem_tokens` vectors recurring through the backbone's last hidden states."""

    recurs_through_tokens = True  # decoders place the state at both the read and the write positions

    @staticmethod
    def _map(function: Any, *states: torch.Tensor) -> torch.Tensor:
        return function(*states)

    def __init__(self, num_mem_tokens: int, hidden_size: int) -> None:
        super().__init__()
        self.num_mem_tokens = num_mem_tokens
        self.hidden_size = hidden_size
        self.memory_tokens = nn.Parameter(torch.zeros(num_mem_tokens, hidden_size))

    @property
    def state_dtype(self) -> torch.dtype:
        return self.memory_tokens.dtype

    def init_state(self, batch_size: int) -> torch.Tensor:
        """The learned initial memory, one copy per document: [batch, num_mem_tokens, hidden]."""
        return self.memory_tokens.unsqueeze(0).expand(batch_size, -1, -1)

    def tokens(self, state: torch.Tensor) -> torch.Tensor:
        """Embeddings of the memory positions: the state itself."""
        return state

    @contextmanager
    def reading(self, state: torch.Tensor, memory_index: torch.Tensor | None) -> Iterator[None]:
        """Nothing to attach: RMT memory enters only through the memory tokens."""
        yield None

    def collect(self, recording: None, hidden: torch.Tensor, memory_index: torch.Tensor) -> torch.Tensor:
        """The last hidden states at the memory positions ([rows, m] indices)."""
        return hidden.gather(1, memory_index[..., None].expand(-1, -1, hidden.shape[-1]))

    def write(self, state: torch.Tensor, written: torch.Tensor) -> torch.Tensor:
        """Next memory: the last layer's states at the memory positions."""
        return written

    def check_state(self, state: Any, batch_size: int) -> torch.Tensor:
        """`state`, or ValueError when a user-supplied state does not fit this memory."""
        expected = (batch_size, self.num_mem_tokens, self.hidden_size)
        if not isinstance(state, torch.Tensor) or tuple(state.shape) != expected:
            shape = tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__
            raise ValueError(
                f"memory_state has shape {shape}, this model expects {expected} "
                "(batch, num_mem_tokens, hidden_size): pass a state returned by a model of the same size."
            )
        return state


def backbone_layers(backbone: nn.Module) -> nn.ModuleList:
    """The backbone's list of transformer layers (the first ModuleList with one entry per layer)."""
    num_layers = backbone.config.num_hidden_layers
    for module in backbone.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise ValueError(
        f"The {backbone.config.model_type} backbone has no list of its {num_layers} layers (it may share one layer "
        "across depth, as ALBERT does), so ARMT cannot give each layer a memory of its own: use memory_type='rmt'."
    )


class AssociativeMemory(nn.Module, _BatchFirstState):
    """ARMT memory: an (A, z) matrix memory in every backbone layer, written by the same learned memory
    tokens in every segment. No state passes through tokens between segments."""

    recurs_through_tokens = False  # decoders place the memory tokens only at the end of a segment
    state_dtype = torch.float32  # (A, z) whatever the backbone's dtype

    def __init__(self, num_mem_tokens: int, hidden_size: int, layers: list[AssociativeLayer], d_mem: int) -> None:
        super().__init__()
        self.num_mem_tokens = num_mem_tokens
        self.hidden_size = hidden_size
        self.memory_tokens = nn.Parameter(torch.zeros(num_mem_tokens, hidden_size))
        self.layers = tuple(layers)  # registered in the backbone, referenced here
        num_heads = layers[0].num_heads
        self.state_shapes = (
            (len(layers), num_heads, 6 * d_mem // num_heads, hidden_size // num_heads),
            (len(layers), num_heads, 6 * d_mem // num_heads),
        )

    def __deepcopy__(self, memo: dict) -> AssociativeMemory:
        """A copy refers to the layers the copy's backbone holds: copies where the whole model is being copied
        (the backbone comes first), the same layers where only the memory is (as PEFT's `modules_to_save` does),
        never layers of their own that no backbone runs."""
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        memo.setdefault(id(self.layers), tuple(memo.get(id(layer), layer) for layer in self.layers))
        clone.__dict__.update({key: copy.deepcopy(value, memo) for key, value in self.__dict__.items()})
        return clone

    @staticmethod
    def _map(function: Any, state: AssociativeState, *others: AssociativeState) -> AssociativeState:
        return state.map(function, *others)

    def init_state(self, batch_size: int) -> AssociativeState:
        """Empty memories: A = 0, z = 0 in every layer."""
        device = self.memory_tokens.device
        return AssociativeState(*(torch.zeros((batch_size, *shape), device=device) for shape in self.state_shapes))

    def tokens(self, state: AssociativeState) -> torch.Tensor:
        """The learned memory tokens, the same in every segment."""
        return self.memory_tokens.unsqueeze(0).expand(state.A.shape[0], -1, -1)

    @contextmanager
    def reading(self, state: AssociativeState, memory_index: torch.Tensor | None) -> Iterator[list[torch.Tensor]]:
        """Attach each layer's memory for one backbone call; yields the list the layers record into."""
        outputs: list[torch.Tensor] = []
        for number, layer in enumerate(self.layers):
            layer.context = LayerContext(*state.layer(number), memory_index, outputs)
        try:
            yield outputs
        finally:
            for layer in self.layers:
                layer.context = None

    def collect(self, recording: list[torch.Tensor], hidden: torch.Tensor, memory_index: torch.Tensor) -> list:
        """Every layer's outputs at the memory positions."""
        if len(recording) != len(self.layers):
            raise RuntimeError(f"{len(recording)} of {len(self.layers)} ARMT layers ran; the backbone skipped some.")
        return recording

    def write(self, state: AssociativeState, written: list[torch.Tensor]) -> AssociativeState:
        """Every layer's delta-rule update from its memory tokens' outputs."""
        for layer in self.layers:
            gather_weights_for_write(layer)
        updates = [
            layer.write(*state.layer(n), outputs)
            for n, (layer, outputs) in enumerate(zip(self.layers, written, strict=True))
        ]
        A, z = zip(*updates, strict=True)
        return AssociativeState(torch.stack(A, dim=1), torch.stack(z, dim=1))

    def check_state(self, state: Any, batch_size: int) -> AssociativeState:
        """`state` as an AssociativeState (a tuple (A, z) is accepted), or ValueError when a user-supplied state
        does not fit this memory."""
        expected = tuple((batch_size, *shape) for shape in self.state_shapes)
        parts = tuple(state) if isinstance(state, (AssociativeState, tuple)) else ()
        given = tuple(tuple(part.shape) for part in parts) if all(isinstance(p, torch.Tensor) for p in parts) else None
        if given != expected:
            raise ValueError(
                f"memory_state is {given or type(state).__name__}; this ARMT expects an AssociativeState (A, z) (or a "
                f"tuple (A, z)) of shapes {expected}: pass a state returned by a model of the same size."
            )
        return AssociativeState(*parts)


def build_memory(config: Any, backbone: nn.Module) -> TokenMemory | AssociativeMemory:
    """The memory module for `config.memory_type`; ARMT wraps the backbone's layers in place."""
    hidden_size = config.text_config.hidden_size
    if config.memory_type == "rmt":
        return TokenMemory(config.num_mem_tokens, hidden_size)
    if config.memory_type == "armt":
        layers = backbone_layers(backbone)
        for number, layer in enumerate(layers):
            if not isinstance(layer, AssociativeLayer):
                layers[number] = AssociativeLayer(
                    layer, hidden_size, config.armt_d_mem, config.armt_num_heads, config.armt_correction,
                    config.armt_normalize_features,
                )  # fmt: skip
        return AssociativeMemory(config.num_mem_tokens, hidden_size, list(layers), config.armt_d_mem)
    raise ValueError(f"Unknown memory_type {config.memory_type!r}.")
