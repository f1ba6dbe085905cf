"""Memory carried across segments.

A memory module owns the learned initial state and three operations the segment loop needs:
`init_state` (a fresh state for a batch), `read` (the memory tokens placed into a segment) and
`write` (the next state from the backbone's outputs at the memory positions). The loop also
selects and updates the state of the documents active at a step, so every state type provides
`select` / `update` over the batch dimension.

`TokenMemory` is RMT's: the state is `num_mem_tokens` vectors that are read as input embeddings
and rewritten from the last layer. ARMT's per-layer associative memory implements the same
interface with (A, z) matrices per layer.
"""

from __future__ import annotations

import torch
from torch import nn


class TokenMemory(nn.Module):
    """RMT memory: `num_mem_tokens` vectors recurring through the backbone's last hidden states."""

    def __init__(self, num_mem_tokens: int, hidden_size: int) -> None:
        super().__init__()
        self.num_mem_tokens = num_mem_tokens
        self.hidden_size = hidden_size
        self.memory_tokens = nn.Parameter(torch.zeros(num_mem_tokens, hidden_size))

    def init_state(self, batch_size: int) -> torch.Tensor:
        """The learned initial memory, one copy per document: [batch, num_mem_tokens, hidden]."""
        return self.memory_tokens.unsqueeze(0).expand(batch_size, -1, -1)

    def read(self, state: torch.Tensor) -> torch.Tensor:
        """Input embeddings of the memory positions."""
        return state

    def write(self, state: torch.Tensor, memory_outputs: torch.Tensor) -> torch.Tensor:
        """Next memory: the last layer's hidden states at the memory positions."""
        return memory_outputs

    @staticmethod
    def select(state: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return state.index_select(0, rows)

    @staticmethod
    def update(state: torch.Tensor, rows: torch.Tensor, new_state: torch.Tensor) -> torch.Tensor:
        if rows.numel() == state.shape[0]:
            return new_state
        return state.index_copy(0, rows, new_state.to(state.dtype))

    @staticmethod
    def detach(state: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Cut the gradient into `state` (only for the documents where `rows` is True, if given)."""
        if rows is None or bool(rows.all()):
            return state.detach()
        return torch.where(rows[:, None, None], state.detach(), state)

    def check_state(self, state: torch.Tensor, batch_size: int) -> None:
        """Raise ValueError when a user-supplied state does not fit this memory."""
        expected = (batch_size, self.num_mem_tokens, self.hidden_size)
        if not isinstance(state, torch.Tensor) or tuple(state.shape) != expected:
            shape = tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__
            raise ValueError(
                f"memory_state has shape {shape}, this model expects {expected} "
                "(batch, num_mem_tokens, hidden_size): pass a state returned by a model of the same size."
            )


def build_memory(memory_type: str, num_mem_tokens: int, hidden_size: int) -> TokenMemory:
    """The memory module for `config.memory_type`."""
    if memory_type == "rmt":
        return TokenMemory(num_mem_tokens, hidden_size)
    raise ValueError(f"Unknown memory_type {memory_type!r}.")
