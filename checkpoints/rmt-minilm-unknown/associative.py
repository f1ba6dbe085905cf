"""ARMT's associative memory inside one backbone layer: the DPFP feature map, the read (`associative_read`) and
the delta-rule write (`associative_write`), as functions the sequential path (`AssociativeLayer`) and diagonal
batching (diagonal.py, with weights stacked over layers) both call; the state they act on is memory.py's."""

from __future__ import annotations

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
