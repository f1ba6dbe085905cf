"""Where memory sits in a segment: the one place segments are laid out, for encoders and decoders.

- Encoder: `[CLS] memory [SEP] tokens [SEP]`. The memory tokens are read as input embeddings at
  positions 1..m, and their outputs there are written.
- Decoder: `[read memory] tokens [write memory]` under the backbone's causal mask, positions restarting
  at 0 in every segment: read memory at 0..r-1, token i at r + i, write memory j at r + n + j after the
  segment's n tokens. RMT places its state at both read and write positions, so the tokens see the
  memory and the write positions see the tokens. ARMT has no read memory (r = 0, its layers read
  their associative memory) and its learned memory tokens at the write positions.

The sequential loop lays out whole segments (`encoder_segment`, `decoder_segment`); generation lays out
the same segment column by column in a KV cache (`prompt_tail`, `token_positions`, `write_positions`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def _unchanged(outputs: Any) -> Any:
    return outputs


@dataclass
class BackboneCall:
    """One backbone call of a segment, as a head or generation lays it out: `module(**inputs)`,
    whose outputs at `memory_index` ([rows, m] positions; None: nothing is written) the memory writes, and
    `finish`, turning the call's outputs into the segment's."""

    module: nn.Module
    inputs: dict[str, Any]
    memory_index: torch.Tensor | None
    finish: Callable[[Any], Any] = _unchanged


# Special tokens around every encoder segment: [CLS] memory [SEP] tokens [SEP]
ENCODER_SPECIAL_TOKENS = 3


def overhead(decoder: bool, num_mem_tokens: int, memory_type: str) -> int:
    """Positions a segment needs besides its content."""
    if decoder:
        return num_mem_tokens if memory_type == "armt" else 2 * num_mem_tokens
    return num_mem_tokens + ENCODER_SPECIAL_TOKENS


def encoder_segment(
    embed: Any, segment: Any, memory_tokens: torch.Tensor, cls_token_id: int, sep_token_id: int, pad_token_id: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """`[CLS] memory [SEP] tokens [SEP]` for a segment's rows (content left-packed): the backbone's inputs
    (inputs_embeds, attention_mask, token_type_ids where the segment has them) and the memory positions."""
    ids, mask = segment.input_ids, segment.attention_mask
    active, num_mem = ids.shape[0], memory_tokens.shape[1]
    lengths = mask.sum(dim=1, keepdim=True)
    tail = torch.cat([ids, ids.new_full((active, 1), pad_token_id)], dim=1).scatter(1, lengths, sep_token_id)
    tail_mask = torch.cat([mask, mask.new_zeros((active, 1))], dim=1).scatter(1, lengths, 1)
    head = ids.new_tensor([cls_token_id, sep_token_id]).expand(active, 2)
    embedded = embed(torch.cat([head, tail], dim=1))
    inputs = {
        "inputs_embeds": torch.cat([embedded[:, :1], memory_tokens.to(embedded.dtype), embedded[:, 1:]], dim=1),
        "attention_mask": torch.cat([mask.new_ones((active, num_mem + 2)), tail_mask], dim=1),
    }
    if segment.token_type_ids is not None:
        tail_types = torch.cat([segment.token_type_ids, segment.token_type_ids.new_zeros((active, 1))], dim=1)
        inputs["token_type_ids"] = torch.cat(
            [tail_types.new_zeros((active, num_mem + 2)), tail_types.scatter(1, lengths, 0)], dim=1
        )
    return inputs, torch.arange(1, 1 + num_mem, device=ids.device).expand(active, -1)


def memory_slots(memory: Any, state: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of a decoder segment's read and write memory positions: RMT places its state at both,
    ARMT its learned tokens at the end only (read memory of width 0)."""
    tokens = memory.tokens(state)
    return (tokens if memory.recurs_through_tokens else tokens[:, :0]), tokens


def token_positions(num_read: int, filled: torch.Tensor) -> torch.Tensor:
    """Position of the next token of segments holding `filled` tokens: [rows, 1]."""
    return (num_read + filled)[:, None]


def write_positions(num_read: int, counts: torch.Tensor, num_write: int) -> torch.Tensor:
    """Positions of the write memory after segments of `counts` tokens: [rows, num_write]."""
    return num_read + counts[:, None] + torch.arange(num_write, device=counts.device)[None, :]


def decoder_segment(
    token_embeds: torch.Tensor, counts: torch.Tensor, read: torch.Tensor, write: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """`[read] tokens [write]` for rows holding `counts` tokens (left-packed): the backbone's inputs
    (inputs_embeds [rows, r + n + m, d], attention_mask, position_ids) and the write positions [rows, m]."""
    rows, width, hidden = token_embeds.shape
    num_read, num_write = read.shape[1], write.shape[1]
    read, write = read.to(token_embeds.dtype), write.to(token_embeds.dtype)
    write_index = write_positions(num_read, counts, num_write)
    inputs_embeds = torch.cat([read, token_embeds, write.new_zeros((rows, num_write, hidden))], dim=1)
    inputs_embeds = inputs_embeds.scatter(1, write_index[..., None].expand(-1, -1, hidden), write)
    columns = torch.arange(num_read + width + num_write, device=counts.device)
    inputs = {
        "inputs_embeds": inputs_embeds,
        "attention_mask": (columns[None, :] < num_read + num_write + counts[:, None]).long(),
        "position_ids": columns.expand(rows, -1),  # the column is the position: write memory follows the tokens
    }
    return inputs, write_index


def prompt_tail(
    embed: Any, input_ids: torch.Tensor, first: torch.Tensor, counts: torch.Tensor, width: int, read: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The open last segment of each prompt, `[read] tokens` of `counts` tokens from column `first` of
    `input_ids`, right-aligned over `width` columns so that all rows end on the last one (the next token
    follows every row there). Returns inputs_embeds [rows, width, d], which columns hold the segment, and
    their positions (0 where they do not)."""
    num_read = read.shape[1]
    offset = torch.arange(width, device=input_ids.device)[None, :] - (width - num_read - counts[:, None])
    token_index = (first[:, None] + offset - num_read).clamp(0, input_ids.shape[1] - 1)
    embeds = embed(input_ids.gather(1, token_index))
    if num_read:
        read_index = offset.clamp(0, num_read - 1)[..., None].expand(-1, -1, embeds.shape[-1])
        embeds = torch.where((offset >= num_read)[..., None], embeds, read.to(embeds.dtype).gather(1, read_index))
    return embeds, offset >= 0, offset.clamp(min=0)
