"""The decoding state of `RMTForCausalLM.generate()` as a `transformers.Cache`: the backbone's KV cache of
each row's current segment, the memory that segment reads, and per-row segment bookkeeping.

`generate()` carries it as its cache (`cache`, `past_key_values` before transformers 5.24) the way it
carries a recurrent model's state: it is created empty holding the memory passed as `memory_state`,
expanded for beams and `num_return_sequences` by `batch_repeat_interleave`, filled by the prefill (an
empty cache, `get_seq_length() == 0`, means "read the prompt") and reordered by `reorder_cache`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import Cache, DynamicCache

from .layout import BackboneCall
from .memory import AssociativeMemory, MemoryState, TokenMemory
from .outputs import CACHE_NAME


def _last_hidden_state(outputs: Any) -> torch.Tensor:
    return outputs.last_hidden_state


class Mirrored:
    """A small per-row tensor kept on the host, where decoding decides without waiting for the device, and
    on the device, where the model reads it. Every change is one function applied to both copies."""

    def __init__(self, host: torch.Tensor, on_device: torch.Tensor) -> None:
        self.host = host
        self.on_device = on_device

    @classmethod
    def from_device(cls, on_device: torch.Tensor) -> Mirrored:
        """Copy a device tensor to the host (this waits for the device: only where decoding starts)."""
        return cls(on_device.cpu(), on_device)

    @classmethod
    def from_host(cls, host: torch.Tensor, device: torch.device) -> Mirrored:
        """Send a host tensor to the device without waiting for it (pinned, non-blocking on CUDA)."""
        source = host.pin_memory() if device.type == "cuda" else host
        return cls(host, source.to(device, non_blocking=True))

    def map(self, function: Callable[..., torch.Tensor], *others: Mirrored) -> Mirrored:
        """`function` of this tensor (and `others`, each on the same side), on the host and on the device."""
        return Mirrored(
            function(self.host, *(other.host for other in others)),
            function(self.on_device, *(other.on_device for other in others)),
        )


class RMTGenerationCache(Cache):
    """Decoding state: each row's current segment in the backbone's KV cache (`key_values`, a DynamicCache),
    the memory (`memory_state`: the state the current segments read, None for the learned memory until the
    prompt is read), how many tokens each row's segment holds (`filled`) and which KV columns each row
    attends to (`valid`), both `Mirrored`.

    Like `EncoderDecoderCache`, it holds another cache rather than layers of its own (`layers` are the
    backbone's). `get_seq_length()` counts the input tokens read (prompt and generated), which is what
    `generate()` asks it; the KV columns are the backbone cache's business.
    """

    is_compileable = False  # the KV cache grows and shrinks at segment boundaries
    is_croppable = False  # a written memory cannot be rolled back (no assisted decoding)

    def __init__(self, memory: TokenMemory | AssociativeMemory, memory_state: MemoryState | None = None) -> None:
        # Cache.__init__ would create layers of this cache; the layers are the backbone cache's (see `layers`).
        self.key_values = DynamicCache()
        self.memory = memory
        self.memory_state = memory_state
        self.filled: Mirrored | None = None  # [B] tokens in each row's current segment
        self.valid: Mirrored | None = None  # [B, columns] bool: which KV columns each row attends to
        self.seen_tokens = 0

    @property
    def layers(self) -> list:
        return self.key_values.layers

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seen_tokens={self.seen_tokens}, key_values={self.key_values})"

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Input tokens read so far (prompt and generated): 0 until the prompt is read."""
        return self.seen_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Follow the beams: KV cache and memory. Beams only move within their prompt's group, and the beams of
        one prompt share its segment phase, so `filled` and `valid` stay as they are (no host synchronisation)."""
        self.key_values.reorder_cache(beam_idx)
        if self.memory_state is not None:
            self.memory_state = self.memory.select(self.memory_state, beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every row `repeats` times in place (beams, `num_return_sequences`): KV cache, memory and
        bookkeeping."""
        self.key_values.batch_repeat_interleave(repeats)
        if self.memory_state is not None:
            rows = self.memory.batch_size(self.memory_state)
            index = torch.arange(rows, device=self.memory.memory_tokens.device).repeat_interleave(repeats)
            self.memory_state = self.memory.select(self.memory_state, index)
        for name in ("filled", "valid"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).map(lambda part: part.repeat_interleave(repeats, dim=0)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows `indices` in place: KV cache, memory and bookkeeping."""
        self.key_values.batch_select_indices(indices)
        if self.memory_state is not None:
            self.memory_state = self.memory.select(self.memory_state, indices)
        for name in ("filled", "valid"):
            if getattr(self, name) is not None:
                rows = Mirrored(indices.cpu(), indices)
                setattr(self, name, getattr(self, name).map(lambda part, index: part[index.to(part.device)], rows))

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("RMTGenerationCache cannot be cropped: its memory is written as tokens are read.")

    def start(self, memory_state: MemoryState, filled: Mirrored, seen_tokens: int) -> None:
        """Begin decoding after the prompt's finished segments: rows read `memory_state`, their current
        segments will hold `filled` tokens."""
        self.memory_state = memory_state
        self.filled = filled
        self.valid = Mirrored.from_host(torch.zeros(len(filled.host), 0, dtype=torch.bool), filled.on_device.device)
        self.seen_tokens = seen_tokens

    def append(
        self, model: Any, inputs_embeds: torch.Tensor, new_valid: Mirrored, positions: torch.Tensor,
        memory_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, MemoryState]:  # fmt: skip
        """Run new columns through the backbone on top of the cache, reading `memory_state` (`model.step`); return
        their last hidden states and the memory after them (written only with `memory_index`, positions among the
        new columns). `new_valid` says which rows attend to the new columns."""
        self.valid = self.valid.map(lambda valid, new: torch.cat([valid, new], dim=1), new_valid)
        inputs = {"inputs_embeds": inputs_embeds, "attention_mask": self.valid.on_device.long(),
                  "position_ids": positions, "use_cache": True, CACHE_NAME: self.key_values}  # fmt: skip
        call = BackboneCall(model.backbone.base_model, inputs, memory_index, _last_hidden_state)
        return model.step(call, self.memory_state)

    def drop_dead_columns(self) -> None:
        """Remove KV columns no row attends to any more (finished segments, placeholders)."""
        keep = self.valid.host.any(dim=0)
        if bool(keep.all()):
            return
        index = Mirrored.from_host(keep.nonzero().squeeze(1), self.valid.on_device.device)
        self.valid = self.valid.map(lambda valid, columns: valid.index_select(1, columns), index)
        for layer in self.key_values.layers:
            layer.keys = layer.keys.index_select(-2, index.on_device.to(layer.keys.device))
            layer.values = layer.values.index_select(-2, index.on_device.to(layer.values.device))
