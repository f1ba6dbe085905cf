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

from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationMixin

from .generation_cache import Mirrored, RMTGenerationCache
from .layout import memory_slots, prompt_tail, token_positions, write_positions
from .outputs import CACHE_NAME


def prefill(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: RMTGenerationCache):
    """Read a (left-padded) prompt into the empty `cache`: all segments but the last update the memory it
    holds, the last goes to its KV cache (`layout.prompt_tail`). Returns the next-token logits [B, 1, V]."""
    plan = model._plan(input_ids, attention_mask, None)
    state = model._read(plan.without_last_segments(), cache.memory_state)
    read, _ = memory_slots(model.memory, state)
    counts = plan.lengths - (plan.segments_per_document - 1) * model.config.segment_size
    filled = Mirrored.from_device(counts)
    width = read.shape[1] + int(filled.host.max())
    first = plan.content_start + plan.lengths - counts
    embeds, valid, positions = prompt_tail(model.get_input_embeddings(), input_ids, first, counts, width, read)
    cache.start(state, filled, input_ids.shape[1])
    hidden, _ = cache.append(model, embeds, Mirrored.from_device(valid), positions)
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
    read, write = memory_slots(memory, cache.memory_state)
    num_read, num_write = read.shape[1], write.shape[1]
    batch, device = token.shape[0], token.device
    cross = cache.filled.map(lambda filled: filled == size)  # rows whose segment is full
    if not bool(cross.host.any()):
        positions = token_positions(num_read, cache.filled.on_device)
        hidden, _ = cache.append(model, embedded, _all_rows(batch, 1, device), positions)
        cache.filled = cache.filled.map(lambda filled: filled + 1)
        return model.lm_head_logits(hidden)
    # Rows whose segment is full: write memory against it, then open a fresh segment with the token.
    crossing = cross.on_device
    write_index = torch.arange(num_write, device=device)[None, :].expand(batch, -1)  # among the new columns
    full = torch.full((batch,), size, device=device)
    write_at = torch.where(crossing[:, None], write_positions(num_read, full, num_write), 0)
    writers = cross.map(lambda rows: rows[:, None].expand(-1, num_write))
    _, written = cache.append(model, write.to(embedded.dtype), writers, write_at, memory_index=write_index)
    cache.memory_state = memory.where(crossing, written, cache.memory_state)  # the fresh segments read it
    cache.valid = cache.valid.map(lambda valid, rows: valid & ~rows[:, None], cross)  # done with every column so far
    read, _ = memory_slots(memory, cache.memory_state)
    filled = cache.filled.map(lambda filled, rows: torch.where(rows, 0, filled), cross)
    read_at = torch.where(crossing[:, None], torch.arange(num_read, device=device)[None, :], 0)
    positions = torch.cat([read_at, token_positions(num_read, filled.on_device)], dim=1)
    new_valid = cross.map(  # crossing rows attend to their fresh read memory; every row to the token
        lambda rows: torch.cat([rows[:, None].expand(-1, num_read), torch.ones_like(rows[:, None])], dim=1)
    )
    hidden, _ = cache.append(model, torch.cat([read.to(embedded.dtype), embedded], dim=1), new_valid, positions)
    cache.filled = filled.map(lambda filled: filled + 1)
    cache.drop_dead_columns()
    return model.lm_head_logits(hidden[:, -1:])


@dataclass(frozen=True)
class PromptMemory:
    """The memory passed to `generate()` on its way to the decoding state (None: the learned memory)."""

    state: Any


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
        # The memory to continue from travels wrapped (transformers repeats the tensors among the inputs for beams,
        # which would repeat an RMT state but not an ARMT one) to `_prepare_cache_for_generation`, which makes the
        # decoding state from it and repeats that.
        prompts = inputs if inputs is not None else kwargs.get("input_ids")
        kwargs["memory_state"] = PromptMemory(self._prompt_memory(prompts, kwargs.pop("memory_state", None)))
        return super().generate(inputs, generation_config, **kwargs)

    def _prompt_memory(self, prompts: Any, memory_state: Any) -> Any:
        """The memory passed to `generate()`, its shape checked against the prompts (one state per prompt) so that
        the cache can repeat it for beams; its values are checked and cast once, where the prompt is read."""
        if memory_state is None:
            return None
        if not isinstance(prompts, torch.Tensor) or prompts.dim() != 2:
            raise ValueError("generate() with memory_state needs the prompts as input_ids (a [batch, length] tensor).")
        return self.memory.check_state(memory_state, prompts.shape[0])

    def _prepare_cache_for_generation(
        self, generation_config: Any, model_kwargs: dict, generation_mode: Any, batch_size: int, max_cache_length: int
    ) -> None:
        """The decoding state, an RMTGenerationCache (instead of transformers' DynamicCache) empty but for the memory
        passed to `generate()`, its rows repeated as transformers has repeated the prompts (beams,
        `num_return_sequences`); refuse the settings that ask for another cache or none."""
        if generation_config.cache_implementation is not None:
            raise ValueError(_own_cache_message(f"got cache_implementation={generation_config.cache_implementation!r}"))
        if generation_config.use_cache is False:
            raise ValueError("RMTForCausalLM.generate needs use_cache=True: decoding continues the cached segment.")
        cache = RMTGenerationCache(self.memory, model_kwargs.pop("memory_state").state)
        cache.batch_repeat_interleave(max(generation_config.num_beams, generation_config.num_return_sequences))
        model_kwargs[CACHE_NAME] = cache

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
