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
from transformers import GenerationMixin

from .generation_cache import Mirrored, RMTGenerationCache
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


def prefill(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: RMTGenerationCache):
    """Read a (left-padded) prompt into the empty `cache`: all segments but the last update the memory it
    holds, the last goes to its KV cache. Returns the next-token logits [B, 1, V]."""
    plan = model._plan(input_ids, attention_mask, None)
    state = model._read(plan.without_last_segments(), cache.memory_state)
    config, device = model.config, input_ids.device
    read, _ = memory_slots(model.memory, state)
    num_read = read.shape[1]
    tail_counts = plan.lengths - (plan.segments_per_document - 1) * config.segment_size
    tail_start = plan.content_start + plan.lengths - tail_counts
    filled = Mirrored.from_device(tail_counts)
    width = num_read + int(filled.host.max())
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
    cache.start(state, filled, input_ids.shape[1])
    hidden, _ = cache.append(model, embeds, Mirrored.from_device(offset >= 0), offset.clamp(min=0))
    return model.lm_head_logits(hidden[:, -1:])


def decode(model: Any, cache: RMTGenerationCache, token_ids: torch.Tensor) -> torch.Tensor:
    """Append tokens [B, k] one at a time, writing memory where a row's segment is full; logits [B, k, V]."""
    logits = [_decode_one(model, cache, token_ids[:, i : i + 1]) for i in range(token_ids.shape[1])]
    cache.seen_tokens += token_ids.shape[1]
    return torch.cat(logits, dim=1)


def _all_rows(batch: int, width: int, device: torch.device) -> Mirrored:
    """New columns every row attends to."""
    host = torch.ones(batch, width, dtype=torch.bool)
    return Mirrored(host, torch.ones(batch, width, dtype=torch.bool, device=device))


def _decode_one(model: Any, cache: RMTGenerationCache, token: torch.Tensor) -> torch.Tensor:
    size, memory = model.config.segment_size, model.memory
    embedded = model.get_input_embeddings()(token)
    state = cache.memory_state
    read, write = memory_slots(memory, state)
    num_read, num_write = read.shape[1], write.shape[1]
    batch, device = token.shape[0], token.device
    cross = cache.filled.map(lambda filled: filled == size)  # rows whose segment is full
    if not bool(cross.host.any()):
        positions = (num_read + cache.filled.on_device)[:, None]
        hidden, _ = cache.append(model, embedded, _all_rows(batch, 1, device), positions)
        cache.filled = cache.filled.map(lambda filled: filled + 1)
        return model.lm_head_logits(hidden)
    # Rows whose segment is full: write memory against it, then open a fresh segment with the token.
    crossing = cross.on_device
    write_columns = torch.arange(num_write, device=device)[None, :]
    write_positions = torch.where(crossing[:, None], num_read + size + write_columns, 0)
    _, written = cache.append(
        model, write.to(embedded.dtype), cross.map(lambda rows: rows[:, None].expand(-1, num_write)), write_positions,
        memory_index=write_columns.expand(batch, -1),
    )  # fmt: skip
    state = memory.where(crossing, memory.write(state, written), state)
    cache.memory_state = state  # the fresh segments read the new memory
    cache.valid = cache.valid.map(lambda valid, rows: valid & ~rows[:, None], cross)  # done with every column so far
    read, _ = memory_slots(memory, state)
    read_columns = torch.arange(num_read, device=device)[None, :]
    token_position = torch.where(crossing, num_read, num_read + cache.filled.on_device)[:, None]
    positions = torch.cat([torch.where(crossing[:, None], read_columns, 0), token_position], dim=1)
    new_valid = cross.map(  # crossing rows attend to their fresh read memory; every row to the token
        lambda rows: torch.cat([rows[:, None].expand(-1, num_read), torch.ones_like(rows[:, None])], dim=1)
    )
    hidden, _ = cache.append(model, torch.cat([read.to(embedded.dtype), embedded], dim=1), new_valid, positions)
    cache.filled = cache.filled.map(lambda filled, rows: torch.where(rows, 1, filled + 1), cross)
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
    """`generate()` for RMTForCausalLM: every GenerationMixin strategy runs over an `RMTGenerationCache`."""

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
        for name in ("cache", "past_key_values"):  # both names: transformers renames the deprecated one later
            if kwargs.get(name) is not None:
                raise ValueError(_own_cache_message(f"got {name}={type(kwargs[name]).__name__}"))
        return super().generate(inputs, generation_config, **kwargs)

    def _expand_inputs_for_generation(
        self, expand_size: int = 1, is_encoder_decoder: bool = False, input_ids: Any = None, **model_kwargs: Any
    ) -> tuple[Any, dict[str, Any]]:
        """Where transformers repeats each prompt's inputs for beams and returned sequences (before it prepares
        a cache), the memory passed as `memory_state` moves into a new, empty RMTGenerationCache, which repeats
        it with its own `batch_repeat_interleave` (transformers repeats only the tensors among the inputs,
        not ARMT's (A, z) tuple)."""
        cache = RMTGenerationCache(self.memory, model_kwargs.pop("memory_state", None))
        cache.batch_repeat_interleave(expand_size)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        return input_ids, {**model_kwargs, CACHE_NAME: cache}

    def _prepare_cache_for_generation(
        self, generation_config: Any, model_kwargs: dict, generation_mode: Any, batch_size: int, max_cache_length: int
    ) -> None:
        """Keep the RMTGenerationCache made with the inputs (instead of transformers' DynamicCache): refuse
        the settings that ask for another cache or none."""
        if generation_config.cache_implementation is not None:
            raise ValueError(_own_cache_message(f"got cache_implementation={generation_config.cache_implementation!r}"))
        if generation_config.use_cache is False:
            raise ValueError("RMTForCausalLM.generate needs use_cache=True: decoding continues the cached segment.")

    def _prefill(self, input_ids: torch.Tensor, generation_config: Any, model_kwargs: dict, *args: Any, **kwargs: Any):
        if getattr(generation_config, "prefill_chunk_size", None) is not None:
            raise ValueError("RMTForCausalLM reads prompts segment by segment itself: drop prefill_chunk_size.")
        return super()._prefill(input_ids, generation_config, model_kwargs, *args, **kwargs)

    def prepare_inputs_for_generation(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        cache: RMTGenerationCache = kwargs[CACHE_NAME]  # `cache` from transformers 5.24 on, `past_key_values` before
        if cache.get_seq_length() > 0:  # decoding: the tokens the cache has not read
            return {"input_ids": input_ids[:, cache.get_seq_length() :], "cache": cache}
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
        return {"input_ids": input_ids, "attention_mask": attention_mask, "cache": cache}


def _own_cache_message(got: str) -> str:
    return (
        f"RMTForCausalLM keeps its own decoding cache (RMTGenerationCache); {got}. Do not pass a cache or "
        "cache_implementation (continue a document with memory_state instead)."
    )
