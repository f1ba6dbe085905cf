"""Generation for the decoder RMT: memory keeps being written at segment boundaries while decoding.

The prompt is read segment by segment; its last (partial) segment goes into the backbone's KV cache
as `[read memory] tokens` and decoding continues there. When a document's segment holds
`segment_size` tokens and another token comes, the write memory `[write memory]` is run against the
cached segment, its last-layer states become the new memory, and the row starts a fresh segment
`[read memory] token` while its old columns are masked out and later dropped from the cache. Rows
of a batch cross boundaries at different steps; each row only ever sees its own current segment, so
batched decoding equals decoding each prompt alone. Boundaries are known in advance (every row
gains one token per step), so they are tracked on the host as well as on the device: an ordinary
decode step adds no host-device synchronisation, and a boundary step only sends the (pinned) index
of the cache columns it keeps.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache, GenerationMixin


def decoder_segment_inputs(
    token_embeds: torch.Tensor, counts: torch.Tensor, memory: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lay out `[read memory] tokens [write memory]` for rows holding `counts` tokens (left-packed).

    Returns inputs_embeds [A, 2m + w, d], attention_mask, position_ids (restarting at 0 in every
    segment) and the positions of the write memory [A, m].
    """
    rows, width, hidden = token_embeds.shape
    num_mem = memory.shape[1]
    memory = memory.to(token_embeds.dtype)
    write_index = num_mem + counts[:, None] + torch.arange(num_mem, device=counts.device)[None, :]
    inputs_embeds = torch.cat([memory, token_embeds, memory.new_zeros((rows, num_mem, hidden))], dim=1)
    inputs_embeds = inputs_embeds.scatter(1, write_index[..., None].expand(-1, -1, hidden), memory)
    columns = torch.arange(2 * num_mem + width, device=counts.device)
    attention_mask = (columns[None, :] < 2 * num_mem + counts[:, None]).long()
    return inputs_embeds, attention_mask, columns.expand(rows, -1), write_index


class RMTGenerationCache:
    """Decoding state: each row's current segment in the backbone's KV cache, and the memory.

    `memory_state` is the memory the current segments read (the state after the last completed
    segment). Rows are reordered together for beam search.
    """

    is_compileable = False
    is_croppable = False

    def __init__(
        self,
        key_values: DynamicCache,
        memory: torch.Tensor,
        filled: list[int],
        valid: torch.Tensor,
        seen_tokens: int,
        segment_size: int,
    ) -> None:
        self.key_values = key_values
        self.memory_state = memory
        self.filled = filled  # tokens in each row's current segment (host)
        self.valid = valid  # [B, columns] bool on the host: which cache columns each row attends to
        self.valid_on_device = valid.to(memory.device)
        self.filled_on_device = torch.tensor(filled, device=memory.device)
        self.seen_tokens = seen_tokens  # input tokens consumed so far (prompt + generated)
        self.segment_size = segment_size

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.key_values.get_seq_length(layer_idx)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Follow the beams. Beams only move within their prompt's group, and the beams of one prompt
        share its segment phase, so the bookkeeping of filled tokens and valid columns stays as it is."""
        self.key_values.reorder_cache(beam_idx)
        self.memory_state = self.memory_state.index_select(0, beam_idx.to(self.memory_state.device))

    def append(
        self,
        model: Any,
        inputs_embeds: torch.Tensor,
        new_valid: torch.Tensor,
        positions: torch.Tensor,
        new_valid_on_device: torch.Tensor | None = None,
    ):
        """Run new columns through the backbone on top of the cache; return their last hidden states.

        `new_valid` (host) says which rows attend to the new columns; pass its device copy too when it
        is not all True, so that no copy has to wait for the device."""
        self.valid = torch.cat([self.valid, new_valid], dim=1)
        if new_valid_on_device is None:
            new_valid_on_device = torch.ones(new_valid.shape, dtype=torch.bool, device=inputs_embeds.device)
        self.valid_on_device = torch.cat([self.valid_on_device, new_valid_on_device], dim=1)
        outputs = model.backbone.base_model(
            inputs_embeds=inputs_embeds,
            attention_mask=self.valid_on_device.long(),
            position_ids=positions,
            past_key_values=self.key_values,
            use_cache=True,
        )
        return outputs.last_hidden_state

    def drop_dead_columns(self) -> None:
        """Remove cache columns no row attends to any more (finished segments, placeholders)."""
        keep = self.valid.any(dim=0)
        if bool(keep.all()):
            return
        index = keep.nonzero().squeeze(1)
        self.valid = self.valid[:, index]
        device = self.valid_on_device.device
        index = (index.pin_memory() if device.type == "cuda" else index).to(device, non_blocking=True)
        self.valid_on_device = self.valid_on_device.index_select(1, index)
        for layer in self.key_values.layers:
            layer.keys = layer.keys.index_select(-2, index.to(layer.keys.device))
            layer.values = layer.values.index_select(-2, index.to(layer.values.device))


def prefill(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, memory_state, key_values):
    """Read a (left-padded) prompt: all segments but the last update memory, the last goes to the cache.

    Returns the next-token logits [B, 1, V] and the generation cache.
    """
    plan = model._plan(input_ids, attention_mask, None)
    state = model._read(plan.without_last_segments(), memory_state)
    config, device = model.config, input_ids.device
    num_mem = config.num_mem_tokens
    tail_counts = plan.lengths - (plan.segments_per_document - 1) * config.segment_size
    tail_start = plan.content_start + plan.lengths - tail_counts
    filled = tail_counts.tolist()
    width = num_mem + max(filled)
    columns = torch.arange(width, device=device)[None, :]
    row_start = width - num_mem - tail_counts[:, None]  # rows are right-aligned: all end on the last column
    offset = columns - row_start
    is_token = offset >= num_mem
    token_index = (tail_start[:, None] + offset - num_mem).clamp(0, input_ids.shape[1] - 1)
    embeds = model.get_input_embeddings()(input_ids.gather(1, token_index))
    memory_rows = state.to(embeds.dtype).gather(
        1, offset.clamp(0, num_mem - 1)[..., None].expand(-1, -1, embeds.shape[-1])
    )
    embeds = torch.where(is_token[..., None], embeds, memory_rows)
    valid_on_device = offset >= 0
    valid = valid_on_device.cpu()
    if key_values is not None and (type(key_values) is not DynamicCache or key_values.get_seq_length() > 0):
        raise ValueError(
            f"RMTForCausalLM keeps its own decoding cache; got a {type(key_values).__name__}. Do not pass "
            "past_key_values or cache_implementation (continue a document with memory_state instead)."
        )
    key_values = DynamicCache()  # plain layers: finished segments are dropped column by column
    cache = RMTGenerationCache(key_values, state, filled, valid[:, :0], input_ids.shape[1], config.segment_size)
    hidden = cache.append(model, embeds, valid, offset.clamp(min=0), valid_on_device)
    return model.lm_head_logits(hidden[:, -1:]), cache


def decode(model: Any, cache: RMTGenerationCache, token_ids: torch.Tensor) -> torch.Tensor:
    """Append tokens [B, k] one at a time, writing memory where a row's segment is full; logits [B, k, V]."""
    logits = [_decode_one(model, cache, token_ids[:, i : i + 1]) for i in range(token_ids.shape[1])]
    cache.seen_tokens += token_ids.shape[1]
    return torch.cat(logits, dim=1)


def _decode_one(model: Any, cache: RMTGenerationCache, token: torch.Tensor) -> torch.Tensor:
    num_mem, size = model.config.num_mem_tokens, cache.segment_size
    embedded = model.get_input_embeddings()(token)
    memory = cache.memory_state
    batch, device = token.shape[0], token.device
    crossing = [count == size for count in cache.filled]
    if not any(crossing):
        positions = (num_mem + cache.filled_on_device)[:, None]
        hidden = cache.append(model, embedded, torch.ones(batch, 1, dtype=torch.bool), positions)
        cache.filled = [count + 1 for count in cache.filled]
        cache.filled_on_device = cache.filled_on_device + 1
        return model.lm_head_logits(hidden)
    # Rows whose segment is full: write memory against it, then open a fresh segment with the token.
    cross = torch.tensor(crossing)
    cross_on_device = cache.filled_on_device == size  # the same rows, known on the device already
    mem_positions = torch.arange(num_mem, device=device)[None, :]
    write_positions = torch.where(cross_on_device[:, None], num_mem + size + mem_positions, 0)
    cross_columns = cross_on_device[:, None].expand(-1, num_mem)
    written = cache.append(
        model, memory.to(embedded.dtype), cross[:, None].expand(-1, num_mem), write_positions, cross_columns
    )
    memory = torch.where(cross_on_device[:, None, None], written.to(memory.dtype), memory)
    cache.valid[cross] = False  # crossing rows are done with every column so far
    cache.valid_on_device = cache.valid_on_device & ~cross_on_device[:, None]
    new_valid = torch.cat([cross[:, None].expand(-1, num_mem), torch.ones(batch, 1, dtype=torch.bool)], dim=1)
    token_position = torch.where(cross_on_device, num_mem, num_mem + cache.filled_on_device)[:, None]
    positions = torch.cat([torch.where(cross_on_device[:, None], mem_positions, 0), token_position], dim=1)
    new_valid_on_device = torch.cat([cross_columns, torch.ones_like(cross_columns[:, :1])], dim=1)
    hidden = cache.append(
        model, torch.cat([memory.to(embedded.dtype), embedded], dim=1), new_valid, positions, new_valid_on_device
    )
    cache.memory_state = memory
    cache.filled = [1 if c else count + 1 for c, count in zip(crossing, cache.filled, strict=True)]
    cache.filled_on_device = torch.where(cross_on_device, 1, cache.filled_on_device + 1)
    cache.drop_dead_columns()
    return model.lm_head_logits(hidden[:, -1:])


class RMTGenerationMixin(GenerationMixin):
    """`generate()` for RMTForCausalLM: every GenerationMixin strategy runs over our cache object."""

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        past_key_values: Any = None,
        attention_mask: torch.Tensor | None = None,
        memory_state: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        if isinstance(past_key_values, RMTGenerationCache):
            return {"input_ids": input_ids[:, past_key_values.seen_tokens :], "past_key_values": past_key_values}
        for option in ("output_attentions", "output_hidden_states"):
            if kwargs.get(option):
                raise ValueError(f"RMTForCausalLM.generate does not return per-layer outputs; drop {option}=True.")
        if attention_mask is not None and attention_mask.shape[1] != input_ids.shape[1]:
            raise ValueError("RMTForCausalLM reads prompts segment by segment itself: drop prefill_chunk_size.")
        if attention_mask is not None and bool((attention_mask[:, -1] == 0).any()):
            raise ValueError(
                "A prompt has padding on the right; generation continues each prompt at its end, so pad on "
                "the left: set tokenizer.padding_side = 'left'."
            )
        if use_cache is False:
            raise ValueError("RMTForCausalLM.generate needs use_cache=True: decoding continues the cached segment.")
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "memory_state": memory_state,
            "past_key_values": past_key_values,
            "use_cache": True,
        }
