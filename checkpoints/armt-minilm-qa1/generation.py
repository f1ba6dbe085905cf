"""Generation for the decoder RMT: memory keeps being written at segment boundaries while decoding.

The prompt is read segment by segment; its last (partial) segment goes into the backbone's KV cache
as `[read memory] tokens` (ARMT: `tokens`, its layers reading their associative memory) and decoding
continues there. When a document's segment holds `segment_size` tokens and another token comes, the
write memory `[write memory]` is run against the cached segment and written (RMT: its last-layer
states become the new memory; ARMT: every layer's delta-rule update), and the row starts a fresh
segment `[read memory] token` while its old columns are masked out and later dropped from the cache. Rows
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

from .outputs import CACHE_NAME


def memory_slots(memory: Any, state: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of a decoder segment's read and write memory positions: RMT places its state at both,
    ARMT its learned tokens at the end only (read memory of width 0)."""
    tokens = memory.tokens(state)
    return (tokens if memory.recurs_through_tokens else tokens[:, :0]), tokens


def decoder_segment_inputs(
    token_embeds: torch.Tensor, counts: torch.Tensor, read: torch.Tensor, write: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lay out `[read] tokens [write]` for rows holding `counts` tokens (left-packed).

    Returns inputs_embeds [A, r + w + m, d], attention_mask, position_ids (restarting at 0 in every
    segment) and the positions of the write memory [A, m].
    """
    rows, width, hidden = token_embeds.shape
    num_read, num_write = read.shape[1], write.shape[1]
    read, write = read.to(token_embeds.dtype), write.to(token_embeds.dtype)
    write_index = num_read + counts[:, None] + torch.arange(num_write, device=counts.device)[None, :]
    inputs_embeds = torch.cat([read, token_embeds, write.new_zeros((rows, num_write, hidden))], dim=1)
    inputs_embeds = inputs_embeds.scatter(1, write_index[..., None].expand(-1, -1, hidden), write)
    columns = torch.arange(num_read + width + num_write, device=counts.device)
    attention_mask = (columns[None, :] < num_read + num_write + counts[:, None]).long()
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
        memory_module: Any,
        memory: Any,
        filled: list[int],
        valid: torch.Tensor,
        seen_tokens: int,
        segment_size: int,
    ) -> None:
        self.key_values = key_values
        self.memory = memory_module
        self.memory_state = memory
        device = memory_module.memory_tokens.device
        self.filled = filled  # tokens in each row's current segment (host)
        self.valid = valid  # [B, columns] bool on the host: which cache columns each row attends to
        self.valid_on_device = valid.to(device)
        self.filled_on_device = torch.tensor(filled, device=device)
        self.seen_tokens = seen_tokens  # input tokens consumed so far (prompt + generated)
        self.segment_size = segment_size

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.key_values.get_seq_length(layer_idx)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Follow the beams. Beams only move within their prompt's group, and the beams of one prompt
        share its segment phase, so the bookkeeping of filled tokens and valid columns stays as it is."""
        self.key_values.reorder_cache(beam_idx)
        self.memory_state = self.memory.select(self.memory_state, beam_idx)

    def append(
        self,
        model: Any,
        inputs_embeds: torch.Tensor,
        new_valid: torch.Tensor,
        positions: torch.Tensor,
        new_valid_on_device: torch.Tensor | None = None,
        memory_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """Run new columns through the backbone on top of the cache, reading `memory_state`; return
        their last hidden states and, with `memory_index` (positions among the new columns), what the
        memory positions wrote.

        `new_valid` (host) says which rows attend to the new columns; pass its device copy too when it
        is not all True, so that no copy has to wait for the device."""
        self.valid = torch.cat([self.valid, new_valid], dim=1)
        if new_valid_on_device is None:
            new_valid_on_device = torch.ones(new_valid.shape, dtype=torch.bool, device=inputs_embeds.device)
        self.valid_on_device = torch.cat([self.valid_on_device, new_valid_on_device], dim=1)
        with self.memory.reading(self.memory_state, memory_index) as recording:
            hidden = model.backbone.base_model(
                inputs_embeds=inputs_embeds,
                attention_mask=self.valid_on_device.long(),
                position_ids=positions,
                use_cache=True,
                **{CACHE_NAME: self.key_values},
            ).last_hidden_state
        return hidden, None if memory_index is None else self.memory.collect(recording, hidden, memory_index)

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
    if key_values is not None and (type(key_values) is not DynamicCache or key_values.get_seq_length() > 0):
        raise ValueError(
            f"RMTForCausalLM keeps its own decoding cache; got a {type(key_values).__name__}. Do not pass "
            f"{CACHE_NAME} or cache_implementation (continue a document with memory_state instead)."
        )
    plan = model._plan(input_ids, attention_mask, None)
    state = model._read(plan.without_last_segments(), memory_state)
    config, device = model.config, input_ids.device
    read, _ = memory_slots(model.memory, state)
    num_read = read.shape[1]
    tail_counts = plan.lengths - (plan.segments_per_document - 1) * config.segment_size
    tail_start = plan.content_start + plan.lengths - tail_counts
    filled = tail_counts.tolist()
    width = num_read + max(filled)
    columns = torch.arange(width, device=device)[None, :]
    row_start = width - num_read - tail_counts[:, None]  # rows are right-aligned: all end on the last column
    offset = columns - row_start
    is_token = offset >= num_read
    token_index = (tail_start[:, None] + offset - num_read).clamp(0, input_ids.shape[1] - 1)
    embeds = model.get_input_embeddings()(input_ids.gather(1, token_index))
    if num_read:
        read_rows = read.to(embeds.dtype).gather(
            1, offset.clamp(0, num_read - 1)[..., None].expand(-1, -1, embeds.shape[-1])
        )
        embeds = torch.where(is_token[..., None], embeds, read_rows)
    valid_on_device = offset >= 0
    valid = valid_on_device.cpu()
    key_values = DynamicCache()  # plain layers: finished segments are dropped column by column
    cache = RMTGenerationCache(
        key_values, model.memory, state, filled, valid[:, :0], input_ids.shape[1], config.segment_size
    )
    hidden, _ = cache.append(model, embeds, valid, offset.clamp(min=0), valid_on_device)
    return model.lm_head_logits(hidden[:, -1:]), cache


def decode(model: Any, cache: RMTGenerationCache, token_ids: torch.Tensor) -> torch.Tensor:
    """Append tokens [B, k] one at a time, writing memory where a row's segment is full; logits [B, k, V]."""
    logits = [_decode_one(model, cache, token_ids[:, i : i + 1]) for i in range(token_ids.shape[1])]
    cache.seen_tokens += token_ids.shape[1]
    return torch.cat(logits, dim=1)


def _decode_one(model: Any, cache: RMTGenerationCache, token: torch.Tensor) -> torch.Tensor:
    size, memory = cache.segment_size, model.memory
    embedded = model.get_input_embeddings()(token)
    state = cache.memory_state
    read, write = memory_slots(memory, state)
    num_read, num_write = read.shape[1], write.shape[1]
    batch, device = token.shape[0], token.device
    crossing = [count == size for count in cache.filled]
    if not any(crossing):
        positions = (num_read + cache.filled_on_device)[:, None]
        hidden, _ = cache.append(model, embedded, torch.ones(batch, 1, dtype=torch.bool), positions)
        cache.filled = [count + 1 for count in cache.filled]
        cache.filled_on_device = cache.filled_on_device + 1
        return model.lm_head_logits(hidden)
    # Rows whose segment is full: write memory against it, then open a fresh segment with the token.
    cross = torch.tensor(crossing)
    cross_on_device = cache.filled_on_device == size  # the same rows, known on the device already
    write_columns = torch.arange(num_write, device=device)[None, :]
    write_positions = torch.where(cross_on_device[:, None], num_read + size + write_columns, 0)
    cross_columns = cross_on_device[:, None].expand(-1, num_write)
    _, written = cache.append(
        model, write.to(embedded.dtype), cross[:, None].expand(-1, num_write), write_positions, cross_columns,
        memory_index=write_columns.expand(batch, -1),
    )  # fmt: skip
    state = memory.where(cross_on_device, memory.write(state, written), state)
    cache.memory_state = state  # the fresh segments read the new memory
    cache.valid[cross] = False  # crossing rows are done with every column so far
    cache.valid_on_device = cache.valid_on_device & ~cross_on_device[:, None]
    read, _ = memory_slots(memory, state)
    read_columns = torch.arange(num_read, device=device)[None, :]
    new_valid = torch.cat([cross[:, None].expand(-1, num_read), torch.ones(batch, 1, dtype=torch.bool)], dim=1)
    token_position = torch.where(cross_on_device, num_read, num_read + cache.filled_on_device)[:, None]
    positions = torch.cat([torch.where(cross_on_device[:, None], read_columns, 0), token_position], dim=1)
    new_valid_on_device = torch.cat(
        [cross_on_device[:, None].expand(-1, num_read), torch.ones_like(cross_on_device[:, None])], dim=1
    )
    hidden, _ = cache.append(
        model, torch.cat([read.to(embedded.dtype), embedded], dim=1), new_valid, positions, new_valid_on_device
    )
    cache.filled = [1 if c else count + 1 for c, count in zip(crossing, cache.filled, strict=True)]
    cache.filled_on_device = torch.where(cross_on_device, 1, cache.filled_on_device + 1)
    cache.drop_dead_columns()
    return model.lm_head_logits(hidden[:, -1:])


# Settings that make transformers draft tokens and roll back the ones it rejects (assisted decoding).
ASSISTED_DECODING_OPTIONS = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit", "use_mtp")


def _assisted_options(generation_config: Any, kwargs: dict[str, Any]) -> list[str]:
    """The assisted-decoding options set in `kwargs` or in a generation config."""
    found = []
    for name in ASSISTED_DECODING_OPTIONS:
        value = kwargs.get(name, getattr(generation_config, name, None))
        if value is not None and value is not False:
            found.append(name)
    return found


class RMTGenerationMixin(GenerationMixin):
    """`generate()` for RMTForCausalLM: every GenerationMixin strategy runs over our cache object."""

    def generate(self, inputs: Any = None, generation_config: Any = None, **kwargs: Any) -> Any:
        """GenerationMixin.generate, refusing what cannot work with a memory that is written while decoding
        before transformers' own checks (whose wording and order change between releases)."""
        for config in (generation_config, getattr(self, "generation_config", None)):
            options = _assisted_options(config, kwargs)
            if options:
                raise ValueError(
                    f"RMTForCausalLM does not support assisted or prompt-lookup decoding ({', '.join(options)} "
                    "set): its memory is stateful, written as tokens are accepted, and cannot roll back rejected "
                    f"draft tokens. Drop {', '.join(options)} (from the generation config too)."
                )
        return super().generate(inputs, generation_config, **kwargs)

    def _expand_inputs_for_generation(
        self, expand_size: int = 1, is_encoder_decoder: bool = False, input_ids: Any = None, **model_kwargs: Any
    ) -> tuple[Any, dict[str, Any]]:
        """As transformers does for beams and returned sequences, and also for ARMT's (A, z) memory
        state: transformers expands only the tensors among the kwargs, not tuples of them."""
        memory_state = model_kwargs.get("memory_state")
        if isinstance(memory_state, tuple) and expand_size > 1:
            model_kwargs["memory_state"] = tuple(part.repeat_interleave(expand_size, dim=0) for part in memory_state)
        return super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids, **model_kwargs)

    def _prefill(self, input_ids: torch.Tensor, generation_config: Any, model_kwargs: dict, *args: Any, **kwargs: Any):
        if getattr(generation_config, "prefill_chunk_size", None) is not None:
            raise ValueError("RMTForCausalLM reads prompts segment by segment itself: drop prefill_chunk_size.")
        return super()._prefill(input_ids, generation_config, model_kwargs, *args, **kwargs)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        memory_state: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        cache = kwargs.pop(CACHE_NAME, None)  # `cache` from transformers 5.24 on, `past_key_values` before
        if isinstance(cache, RMTGenerationCache):
            return {"input_ids": input_ids[:, cache.seen_tokens :], CACHE_NAME: cache}
        for option in ("output_attentions", "output_hidden_states"):
            if kwargs.get(option):
                raise ValueError(f"RMTForCausalLM.generate does not return per-layer outputs; drop {option}=True.")
        if attention_mask is not None and attention_mask.shape[1] != input_ids.shape[1]:
            raise ValueError(
                f"attention_mask has {attention_mask.shape[1]} columns but the prompt {input_ids.shape[1]} tokens; "
                "pass the mask the tokenizer made for these input_ids."
            )
        if input_ids.shape[1] == 0:
            raise ValueError("The prompt is empty: generation continues a prompt, so give each row at least one token.")
        empty = (attention_mask == 0).all(dim=1) if attention_mask is not None else None
        if empty is not None and bool(empty.any()):
            raise ValueError(
                f"Prompt(s) at batch index {empty.nonzero().flatten().tolist()} have no tokens (their attention_mask "
                "is all zeros): remove empty prompts before calling generate."
            )
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
            CACHE_NAME: cache,
            "use_cache": True,
            "prefill_prompt": True,
        }
