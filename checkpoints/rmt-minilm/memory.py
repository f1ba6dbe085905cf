"""Memory carried across segments, one interface for RMT and ARMT.

The segment step (`RMTPreTrainedModel.step`) only talks to a memory module through:
`init_state` (a fresh state for a batch), `tokens` (the embeddings placed at the memory positions
of a segment), `reading` (a context in which the backbone runs; ARMT's layers read their
associative memory there and record their memory-token outputs), `collect` (what the memory
positions produced) and `write` (the next state), plus `select` / `update` / `where` / `detach`
over the batch dimension of a state.

- `TokenMemory` (RMT): the state is `num_mem_tokens` vectors read as input embeddings and rewritten
  from the backbone's last hidden states at the memory positions.
- `AssociativeMemory` (ARMT): every backbone layer is wrapped in an `AssociativeLayer` holding a
  matrix memory (A, z). The same learned memory tokens enter every segment; each layer reads its
  memory before running and writes the memory tokens' outputs into it with the delta rule. The state
  is an `AssociativeState` (A, z) stacked over layers, batch first: A `[B, L, H, d_key/H, d_model/H]`,
  z `[B, L, H, d_key/H]`, kept in float32 whatever the backbone's dtype.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

if torch.distributed.is_available():
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method
else:  # a build without torch.distributed: nothing is ever sharded
    FSDPModule = ()

# Added to the normaliser of associative reads, as in the ARMT paper.
READ_EPS = 1e-5


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


def dpfp(x: torch.Tensor, nu: int = 3) -> torch.Tensor:
    """Deterministic parameter-free projection: x' = [relu(x), relu(-x)], then x' * roll(x', j) for
    j = 1..nu, concatenated; 2 * nu * d features."""
    x = torch.cat([x.relu(), (-x).relu()], dim=-1)
    return torch.cat([x * x.roll(shifts=j, dims=-1) for j in range(1, nu + 1)], dim=-1)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, also for weights stacked over leading dims that x shares ([n, out, in] with x [n, ..., in])."""
    if weight.dim() == 2:
        return F.linear(x, weight, bias)
    lead = weight.shape[:-2]
    out = torch.matmul(x.reshape(*lead, -1, x.shape[-1]), weight.transpose(-1, -2))
    out = out.reshape(*x.shape[:-1], weight.shape[-2])
    if bias is not None:
        out = out + bias.reshape(*lead, *([1] * (x.dim() - len(lead) - 1)), -1)
    return out


def key_features(x: torch.Tensor, W: torch.Tensor, num_heads: int, normalize: bool) -> torch.Tensor:
    """phi(W x) per head, [..., h, 6 * d_mem / h] in float32; with `normalize`, L2-normalised per head
    (as the authors' ARMT code does from August 2024 on)."""
    features = dpfp(_linear(x, W).float().unflatten(-1, (num_heads, -1)))
    return F.normalize(features, dim=-1) if normalize else features


def associative_read(
    hidden: torch.Tensor, A: torch.Tensor, z: torch.Tensor, W_mq: torch.Tensor, num_heads: int, normalize: bool = False
) -> torch.Tensor:
    """phi(q) A / (z . phi(q) + eps), q = W_mq h, for every position of `hidden` [..., rows, T, d], in its
    dtype. Leading dims (e.g. layers) may stack the memories and weights too."""
    q = key_features(hidden, W_mq, num_heads, normalize)  # [..., b, t, h, k]
    numerator = torch.einsum("...thk,...hkv->...thv", q, A)
    denominator = torch.einsum("...thk,...hk->...th", q, z) + READ_EPS
    return (numerator / denominator[..., None]).flatten(-2).to(hidden.dtype)


def associative_write(
    A: torch.Tensor,
    z: torch.Tensor,
    memory_outputs: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    num_heads: int,
    correction: bool,
    normalize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Delta-rule update from the memory tokens' outputs [..., rows, m, d]; `weights` = (W_mk, W_mv, W_mb,
    W_mb bias). Returns the new (A, z)."""
    W_mk, W_mv, W_mb, b_mb = weights
    k = key_features(memory_outputs, W_mk, num_heads, normalize)  # [..., b, m, h, k]
    v = _linear(memory_outputs, W_mv).float().unflatten(-1, (num_heads, -1))
    beta = torch.sigmoid(_linear(memory_outputs, W_mb, b_mb).float())
    known = torch.einsum("...mhk,...hk->...mh", k, z)
    previous = torch.einsum("...mhk,...hkv->...mhv", k, A) / (known + READ_EPS)[..., None]
    if correction:  # count only the part of a key not yet in z
        gamma = (1 - known / (k * k).sum(-1).clamp_min(torch.finfo(k.dtype).tiny)).clamp(0, 1).detach()
    else:
        gamma = torch.ones_like(known)
    A = A + torch.einsum("...mhk,...mhv->...hkv", k * beta[..., None], v - previous)
    z = z + (k * gamma[..., None]).sum(-3)
    return A, z


@dataclass
class LayerContext:
    """What one wrapped layer uses during a backbone call: its memory and where the memory tokens are."""

    A: torch.Tensor  # [rows, H, d_key/H, d_model/H]
    z: torch.Tensor  # [rows, H, d_key/H]
    memory_index: torch.Tensor | None  # [rows, m] positions whose outputs are written; None: no write
    outputs: list[torch.Tensor] = field(default_factory=list)  # the recording, shared by all layers


class AssociativeLayer(nn.Module):
    """A backbone layer with an associative memory (ARMT): reads it into every token's hidden state
    before the layer, and records the memory tokens' outputs after it for the write.

    Parameter names follow the ARMT release: `W_mq`, `W_mk`, `W_mv`, `W_mb` beside the wrapped `layer`.
    """

    def __init__(
        self, layer: nn.Module, hidden_size: int, d_mem: int, num_heads: int, correction: bool, normalize: bool = False
    ) -> None:
        super().__init__()
        self.layer = layer
        self.W_mq = nn.Linear(hidden_size, d_mem, bias=False)
        self.W_mk = nn.Linear(hidden_size, d_mem, bias=False)
        self.W_mv = nn.Linear(hidden_size, hidden_size, bias=False)
        self.W_mb = nn.Linear(hidden_size, num_heads)
        self.num_heads = num_heads
        self.correction = correction
        self.normalize = normalize  # L2-normalised key features (config.armt_normalize_features)
        self.context: LayerContext | None = None

    def __getattr__(self, name: str) -> Any:
        """Attributes the backbone reads from its layers (e.g. `attention_type`) come from the wrapped layer."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("layer"), name)

    @property
    def write_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.W_mk.weight, self.W_mv.weight, self.W_mb.weight, self.W_mb.bias

    def read(self, hidden: torch.Tensor, A: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """What this layer's memory adds to `hidden` [rows, T, d]. Under the backbone's gradient checkpointing
        the read is recomputed in the backward pass as well: its feature maps are the largest activations."""
        if getattr(self.layer, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled():
            return checkpoint(
                associative_read, hidden, A, z, self.W_mq.weight, self.num_heads, self.normalize, use_reentrant=False
            )
        return associative_read(hidden, A, z, self.W_mq.weight, self.num_heads, self.normalize)

    def write(
        self, A: torch.Tensor, z: torch.Tensor, memory_outputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The memory after writing the memory tokens' outputs [rows, m, d]."""
        return associative_write(
            A, z, memory_outputs, self.write_weights, self.num_heads, self.correction, self.normalize
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped layer; with a memory attached (`AssociativeMemory.reading`) it reads the memory first
        and, where the context has write positions, records the memory tokens' outputs."""
        context = self.context
        if context is None:  # no memory attached: the plain layer
            return self.layer(*args, **kwargs)
        if args:
            args = (args[0] + self.read(args[0], context.A, context.z), *args[1:])
        else:
            hidden = kwargs["hidden_states"]
            kwargs["hidden_states"] = hidden + self.read(hidden, context.A, context.z)
        output = self.layer(*args, **kwargs)
        if context.memory_index is not None:
            hidden = output[0] if isinstance(output, tuple) else output
            index = context.memory_index[..., None].expand(-1, -1, hidden.shape[-1])
            context.outputs.append(hidden.gather(1, index))
        return output


def gather_weights_for_write(layer: AssociativeLayer) -> None:
    """Under FSDP2 (`fully_shard`, also what accelerate's FSDP applies) an ARMT layer sharded on its own holds its
    weights only around `forward`, and the write runs after it: register `write` as a forward method too, once
    (torch's `register_fsdp_forward_method`), so that its weights are gathered for it and again for its backward."""
    if isinstance(layer, FSDPModule) and "write" not in vars(layer):
        register_fsdp_forward_method(layer, "write")


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
