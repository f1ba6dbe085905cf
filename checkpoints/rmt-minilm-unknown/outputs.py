"""Output dataclasses of the RMT models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.generation.utils import ALL_CACHE_NAMES
from transformers.modeling_outputs import ModelOutput

# The name transformers gives the decoding cache in model inputs and outputs: `cache` from 5.24 on
# (where `past_key_values` is a deprecated alias), `past_key_values` before.
CACHE_NAME: str = ALL_CACHE_NAMES[0]


@dataclass
class RMTModelOutput(ModelOutput):
    """Output of `RMTModel`.

    last_hidden_state: the final segment's last-layer states `[batch, length, hidden]`, laid out as
        `[CLS] memory [SEP] tokens [SEP]` (padding after the content).
    memory_state: the memory after the final segment; pass it back as `memory_state` to continue.
    segment_hidden_states: per step, the last-layer states of every document (zeros for documents
        with no tokens at that step); only with `output_hidden_states=True`.
    segments_mask: `[batch, steps]`, True where a document had tokens at that step.
    """

    last_hidden_state: torch.Tensor | None = None
    memory_state: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None  # RMT: tensor; ARMT: (A, z)
    segment_hidden_states: tuple[torch.Tensor, ...] | None = None
    segments_mask: torch.Tensor | None = None


@dataclass
class RMTSequenceClassifierOutput(ModelOutput):
    """Output of `RMTForSequenceClassification`.

    loss: on the final segment's logits, or the mean over segments (`config.segment_loss`).
    logits: the backbone head's logits on each document's final segment, `[batch, num_labels]`.
    memory_state: the memory after the final segment.
    segment_logits: `[batch, steps, num_labels]` logits after every step (zeros where a document had
        no tokens); only with `output_segment_logits=True`.
    segment_hidden_states, segments_mask: as in `RMTModelOutput`.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    memory_state: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None  # RMT: tensor; ARMT: (A, z)
    segment_logits: torch.Tensor | None = None
    segment_hidden_states: tuple[torch.Tensor, ...] | None = None
    segments_mask: torch.Tensor | None = None


@dataclass
class _RMTCausalLMFields(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    memory_state: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None  # RMT: tensor; ARMT: (A, z)


if CACHE_NAME == "cache":

    @dataclass
    class RMTCausalLMOutput(_RMTCausalLMFields):
        cache: Any = None  # RMTGenerationCache while decoding

else:

    @dataclass
    class RMTCausalLMOutput(_RMTCausalLMFields):
        past_key_values: Any = None  # RMTGenerationCache while decoding


RMTCausalLMOutput.__doc__ = """Output of `RMTForCausalLM`.

    loss: next-token cross-entropy over all segments, the shift crossing segment boundaries.
    logits: `[batch, length, vocab]` in the input's layout (the last `logits_to_keep` positions if set).
    memory_state: the memory after the final segment (while generating: the memory the current
        segment reads).
    cache (`past_key_values` before transformers 5.24): the generation cache (`RMTGenerationCache`)
        when decoding.
    """
