"""Recurrent Memory Transformer models around any supported Transformers backbone."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel
from transformers.modeling_outputs import ModelOutput

from .configuration_rmt import ENCODER_SPECIAL_TOKENS, RMTConfig, backbone_position_limit
from .memory import TokenMemory, build_memory
from .segmenting import Segment, SegmentPlan, plan_segments

# Keyword arguments of `from_backbone` that configure the backbone's head rather than the RMT wrapper.
HEAD_KWARGS = ("num_labels", "id2label", "label2id", "problem_type", "classifier_dropout")


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
    memory_state: torch.Tensor | None = None
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
    memory_state: torch.Tensor | None = None
    segment_logits: torch.Tensor | None = None
    segment_hidden_states: tuple[torch.Tensor, ...] | None = None
    segments_mask: torch.Tensor | None = None


def _scatter_rows(rows: torch.Tensor, values: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Place the active documents' `values` into a zero tensor covering the whole batch."""
    if rows.numel() == batch_size:
        return values
    full = values.new_zeros((batch_size, *values.shape[1:]))
    return full.index_copy(0, rows, values)


class RMTPreTrainedModel(PreTrainedModel):
    """Shared machinery: building around a backbone, weight init and the segment recurrence."""

    config_class = RMTConfig
    config: RMTConfig
    base_model_prefix = "rmt"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _backbone_auto_class: Any = AutoModel

    def __init__(self, config: RMTConfig, backbone: PreTrainedModel | None = None) -> None:
        if backbone is not None:
            config.text_config = backbone.config
        super().__init__(config)
        if backbone is None:
            backbone = self._backbone_auto_class.from_config(
                config.text_config, attn_implementation=config._attn_implementation
            )
        # One config object for wrapper and backbone, with an explicit attention implementation: a
        # backbone left at None loses padding invariance on some versions.
        config.text_config._attn_implementation = backbone.config._attn_implementation or "sdpa"
        backbone.config = config.text_config
        self.backbone = backbone
        self.memory = build_memory(config.memory_type, config.num_mem_tokens, config.text_config.hidden_size)
        self._backbone_takes_token_types = "token_type_ids" in inspect.signature(backbone.forward).parameters
        for name in ("cls_token_id", "sep_token_id"):
            if getattr(config, name) is None:
                raise ValueError(
                    f"config.{name} is not set; pass {name}=tokenizer.{name.removesuffix('_id')}_token_id "
                    "(from_backbone reads it from the backbone's tokenizer)."
                )
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, TokenMemory):
            std = getattr(self.config.text_config, "initializer_range", 0.02)
            module.memory_tokens.normal_(mean=0.0, std=std)

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.backbone.set_input_embeddings(value)

    @classmethod
    def from_backbone(
        cls,
        pretrained_model_name_or_path: str,
        *,
        num_mem_tokens: int = 10,
        segment_size: int | None = None,
        tokenizer: Any = None,
        backbone_kwargs: dict[str, Any] | None = None,
        **config_kwargs: Any,
    ) -> RMTPreTrainedModel:
        """Wrap a pretrained backbone with memory, keeping its weights.

        `segment_size` defaults to the largest that fits the backbone's positions. Special-token ids
        come from `tokenizer` (or the backbone's own tokenizer). Head settings such as `num_labels`
        and loading options in `backbone_kwargs` (e.g. `dtype`) go to the backbone.
        """
        backbone_kwargs = dict(backbone_kwargs or {})
        for key in HEAD_KWARGS:
            if key in config_kwargs:
                backbone_kwargs[key] = config_kwargs.pop(key)
        backbone = cls._backbone_auto_class.from_pretrained(pretrained_model_name_or_path, **backbone_kwargs)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path)
        for name in ("cls_token_id", "sep_token_id", "pad_token_id"):
            config_kwargs.setdefault(name, getattr(tokenizer, name, None))
        if segment_size is None:
            segment_size = backbone_position_limit(backbone.config) - num_mem_tokens - ENCODER_SPECIAL_TOKENS
        config = RMTConfig(
            text_config=backbone.config, num_mem_tokens=num_mem_tokens, segment_size=segment_size, **config_kwargs
        )
        model = cls(config, backbone=backbone)
        embeddings = model.get_input_embeddings().weight
        with torch.no_grad():  # memory starts at the scale of the pretrained token embeddings
            model.memory.memory_tokens.normal_(0.0, float(embeddings.float().std()))
        return model.to(embeddings.dtype)

    # ----- the recurrence -------------------------------------------------------------------------

    def _plan(
        self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, token_type_ids: torch.Tensor | None
    ) -> SegmentPlan:
        if input_ids is None:
            raise ValueError("input_ids are required: pass the tokenizer's output for whole documents.")
        config = self.config
        plan = plan_segments(
            input_ids,
            attention_mask,
            token_type_ids if self._backbone_takes_token_types else None,
            segment_size=config.segment_size,
            cls_token_id=config.cls_token_id,
            sep_token_id=config.sep_token_id,
            pad_token_id=config.pad_token_id,
            alignment=config.segment_alignment,
        )
        cap = config.max_n_segments
        if cap is not None and self.training and torch.is_grad_enabled() and plan.num_segments > cap:
            raise ValueError(
                f"A training document needs {plan.num_segments} segments but config.max_n_segments is {cap}; "
                "shorten the training documents or raise max_n_segments (inference has no cap)."
            )
        return plan

    def _segments(
        self, plan: SegmentPlan, memory_state: torch.Tensor | None, **backbone_kwargs: Any
    ) -> Iterator[tuple[Segment, Any, torch.Tensor]]:
        """Run the segments in order, yielding (segment, backbone output, memory after it) per step."""
        memory, steps = self.memory, plan.num_segments
        if memory_state is None:
            state = memory.init_state(plan.batch_size)
        else:
            memory.check_state(memory_state, plan.batch_size)
            state = memory_state
        for step in range(steps):
            segment = plan.segment(step)
            if 0 <= self.config.bptt_depth <= steps - 1 - step:
                state = memory.detach(state)  # truncated BPTT: no gradient beyond bptt_depth transitions
            current = memory.select(state, segment.rows)
            outputs, memory_outputs = self._process_segment(segment, memory.read(current), **backbone_kwargs)
            state = memory.update(state, segment.rows, memory.write(current, memory_outputs))
            yield segment, outputs, state

    def _process_segment(self, segment: Segment, memory_tokens: torch.Tensor, **backbone_kwargs: Any) -> tuple:
        """Run `[CLS] memory [SEP] tokens [SEP]` through the backbone; return (outputs, memory outputs)."""
        config, ids, mask = self.config, segment.input_ids, segment.attention_mask
        active, num_mem = ids.shape[0], config.num_mem_tokens
        lengths = mask.sum(dim=1, keepdim=True)
        tail = torch.cat([ids, ids.new_full((active, 1), config.pad_token_id or 0)], dim=1)
        tail = tail.scatter(1, lengths, config.sep_token_id)
        tail_mask = torch.cat([mask, mask.new_zeros((active, 1))], dim=1).scatter(1, lengths, 1)
        head = ids.new_tensor([config.cls_token_id, config.sep_token_id]).expand(active, 2)
        embedded = self.get_input_embeddings()(torch.cat([head, tail], dim=1))
        inputs_embeds = torch.cat([embedded[:, :1], memory_tokens.to(embedded.dtype), embedded[:, 1:]], dim=1)
        attention_mask = torch.cat([mask.new_ones((active, num_mem + 2)), tail_mask], dim=1)
        if segment.token_type_ids is not None:
            tail_types = torch.cat([segment.token_type_ids, segment.token_type_ids.new_zeros((active, 1))], dim=1)
            backbone_kwargs["token_type_ids"] = torch.cat(
                [tail_types.new_zeros((active, num_mem + 2)), tail_types.scatter(1, lengths, 0)], dim=1
            )
        outputs = self.backbone(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **backbone_kwargs)
        last_hidden = outputs.hidden_states[-1] if "last_hidden_state" not in outputs else outputs.last_hidden_state
        return outputs, last_hidden[:, 1 : 1 + num_mem]


class RMTModel(RMTPreTrainedModel):
    """The memory-augmented backbone: hidden states of the final segment and the memory."""

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        memory_state: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> RMTModelOutput | tuple:
        plan = self._plan(input_ids, attention_mask, token_type_ids)
        segment_states = [] if output_hidden_states else None
        for segment, outputs, state in self._segments(plan, memory_state):  # noqa: B007 (final state)
            if segment_states is not None:
                segment_states.append(_scatter_rows(segment.rows, outputs.last_hidden_state, plan.batch_size))
        output = RMTModelOutput(
            last_hidden_state=outputs.last_hidden_state,
            memory_state=state,
            segment_hidden_states=tuple(segment_states) if segment_states is not None else None,
            segments_mask=plan.active_mask(),
        )
        return output if return_dict is not False else output.to_tuple()


class RMTForSequenceClassification(RMTPreTrainedModel):
    """Encoder RMT: memory carries each document through its segments; the backbone's own head
    classifies the final segment."""

    _backbone_auto_class = AutoModelForSequenceClassification
    # The loss is a mean over documents, so Trainer must scale it for gradient accumulation itself.
    accepts_loss_kwargs = False

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        memory_state: torch.Tensor | None = None,
        output_segment_logits: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> RMTSequenceClassifierOutput | tuple:
        plan = self._plan(input_ids, attention_mask, token_type_ids)
        if labels is not None:
            self._check_labels(labels, plan.batch_size)
        mean_loss = labels is not None and self.config.segment_loss == "mean"
        segment_logits, segment_states, segment_losses = [], [], []
        for segment, outputs, state in self._segments(plan, memory_state, output_hidden_states=True):  # noqa: B007
            if output_segment_logits:
                segment_logits.append(_scatter_rows(segment.rows, outputs.logits, plan.batch_size))
            if output_hidden_states:
                segment_states.append(_scatter_rows(segment.rows, outputs.hidden_states[-1], plan.batch_size))
            if mean_loss:
                segment_losses.append(self.loss_function(labels[segment.rows], outputs.logits, self.config))
        logits = outputs.logits  # every document is active at the last step, in batch order
        loss = None
        if labels is not None:
            loss = torch.stack(segment_losses).mean() if mean_loss else self.loss_function(labels, logits, self.config)
        output = RMTSequenceClassifierOutput(
            loss=loss,
            logits=logits,
            memory_state=state,
            segment_logits=torch.stack(segment_logits, dim=1) if output_segment_logits else None,
            segment_hidden_states=tuple(segment_states) if output_hidden_states else None,
            segments_mask=plan.active_mask(),
        )
        return output if return_dict is not False else output.to_tuple()

    def _check_labels(self, labels: torch.Tensor, batch_size: int) -> None:
        num_labels = self.config.num_labels
        multi = self.config.problem_type == "multi_label_classification" or labels.is_floating_point()
        allowed = {(batch_size,), (batch_size, 1)} if num_labels == 1 or not multi else set()
        if multi:
            allowed |= {(batch_size, num_labels)}
        if tuple(labels.shape) not in allowed:
            raise ValueError(
                f"labels have shape {tuple(labels.shape)} for a batch of {batch_size} documents; expected one of "
                f"{sorted(allowed)} (one class index per document, or {num_labels} targets per document for "
                "multi-label or regression)."
            )


__all__ = ["RMTModel", "RMTForSequenceClassification", "RMTPreTrainedModel"]
