"""Recurrent Memory Transformer models around any supported Transformers backbone: the encoder base,
`RMTModel`, and the heads. Their shared base and the segment recurrence are in `pretrained.py`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from .configuration_rmt import CAUSAL_ENCODER_FAMILIES, RMTConfig, is_decoder_family
from .generation import RMTGenerationMixin, decode, prefill
from .generation_cache import RMTGenerationCache
from .layout import BackboneCall, decoder_segment, encoder_segment, memory_slots
from .loading import bert_as_decoder
from .memory import MemoryState
from .outputs import CACHE_NAME, RMTCausalLMOutput, RMTModelOutput, RMTSequenceClassifierOutput
from .pretrained import RMTPreTrainedModel, check_wrapper_arguments, scatter_rows
from .segmenting import Segment


class RMTEncoderPreTrainedModel(RMTPreTrainedModel):
    """Encoder RMT: every segment is `[CLS] memory [SEP] tokens [SEP]`."""

    def _check_backbone(self, config: RMTConfig) -> None:
        if is_decoder_family(config.text_config):
            raise ValueError(
                f"{type(self).__name__} needs an encoder backbone; {config.text_config.model_type!r} is a decoder: "
                "use RMTForCausalLM."
            )
        for name in ("cls_token_id", "sep_token_id"):
            if getattr(config, name) is None:
                token = name.removesuffix("_token_id")
                raise ValueError(
                    f"config.{name} is not set, and encoder segments need it: each is `[CLS] memory [SEP] tokens "
                    f"[SEP]`. Pass {name}=tokenizer.{name} (from_backbone reads it from the tokenizer it is given); "
                    f"a tokenizer without a {token.upper()} token, such as a decoder's, needs an id chosen for it, "
                    f"e.g. {name}=tokenizer.{'bos' if token == 'cls' else 'eos'}_token_id."
                )

    def _backbone_call(self, segment: Segment, state: MemoryState, **backbone_kwargs: Any) -> BackboneCall:
        """`[CLS] memory [SEP] tokens [SEP]` (`layout.encoder_segment`) through the backbone with its head."""
        config = self.config
        inputs, memory_index = encoder_segment(
            self.get_input_embeddings(), segment, self.memory.tokens(state),
            config.cls_token_id, config.sep_token_id, 0 if config.pad_token_id is None else config.pad_token_id,
        )  # fmt: skip
        return BackboneCall(self.backbone, {**inputs, **backbone_kwargs}, memory_index)


class RMTModel(RMTEncoderPreTrainedModel):
    """The memory-augmented backbone: hidden states of the final segment and the memory."""

    _hold_base_model = True

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
                segment_states.append(scatter_rows(segment.rows, outputs.last_hidden_state, plan.batch_size))
        output = RMTModelOutput(
            last_hidden_state=outputs.last_hidden_state,
            memory_state=state,
            segment_hidden_states=tuple(segment_states) if segment_states is not None else None,
            segments_mask=plan.active_mask(),
        )
        return output if return_dict is not False else output.to_tuple()


class RMTForSequenceClassification(RMTEncoderPreTrainedModel):
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
        inputs_embeds: None = None,
        output_attentions: None = None,
    ) -> RMTSequenceClassifierOutput | tuple:
        check_wrapper_arguments(inputs_embeds, output_attentions=output_attentions)
        plan = self._plan(input_ids, attention_mask, token_type_ids)
        ignored = self._check_labels(labels, plan.batch_size) if labels is not None else None
        mean_loss = labels is not None and self.config.segment_loss == "mean"
        # documents labelled -100 (the ignore index): left out of the mean loss as cross-entropy leaves them out
        skipped = set(ignored.nonzero().flatten().tolist()) if mean_loss and ignored is not None else set()
        segment_logits, segment_states = [], []
        loss_sums = None
        for segment, outputs, state in self._segments(plan, memory_state, output_hidden_states=True):  # noqa: B007
            if output_segment_logits:
                segment_logits.append(scatter_rows(segment.rows, outputs.logits, plan.batch_size))
            if output_hidden_states:
                segment_states.append(scatter_rows(segment.rows, outputs.hidden_states[-1], plan.batch_size))
            if mean_loss:  # each document's loss, summed over its segments
                row_losses = torch.stack(
                    [self.loss_function(labels[row : row + 1], outputs.logits[i : i + 1], self.config)
                     if row not in skipped else outputs.logits.new_zeros(())
                     for i, row in enumerate(segment.rows.tolist())]
                )  # fmt: skip
                loss_sums = row_losses.new_zeros(plan.batch_size) if loss_sums is None else loss_sums
                loss_sums = loss_sums.index_add(0, segment.rows, row_losses)
        logits = outputs.logits  # every document is active at the last step, in batch order
        loss = None
        if labels is not None:
            if mean_loss:  # the mean over each document's segments, then over documents
                per_document = loss_sums / plan.segments_per_document.to(loss_sums.dtype)
                loss = per_document[~ignored].mean() if skipped else per_document.mean()
            else:
                loss = self.loss_function(labels, logits, self.config)
        output = RMTSequenceClassifierOutput(
            loss=loss,
            logits=logits,
            memory_state=state,
            segment_logits=torch.stack(segment_logits, dim=1) if output_segment_logits else None,
            segment_hidden_states=tuple(segment_states) if output_hidden_states else None,
            segments_mask=plan.active_mask(),
        )
        return output if return_dict is not False else output.to_tuple()

    def _check_labels(self, labels: torch.Tensor, batch_size: int) -> torch.Tensor | None:
        """Check labels against the problem type the loss will use (inferred as transformers does); for
        single-label classification, return which documents are labelled -100 (ignored, as by cross-entropy)."""
        num_labels, shape = self.config.num_labels, tuple(labels.shape)
        integer = not labels.is_floating_point()
        problem = self.config.problem_type or (
            "regression"
            if num_labels == 1
            else "single_label_classification"
            if labels.dtype in (torch.long, torch.int)
            else "multi_label_classification"
        )
        if problem == "single_label_classification":
            valid, expected = integer and shape in {(batch_size,), (batch_size, 1)}, f"class indices ({batch_size},)"
        elif problem == "multi_label_classification":
            valid, expected = not integer and shape == (batch_size, num_labels), f"floats ({batch_size}, {num_labels})"
        else:
            shapes = {(batch_size,), (batch_size, 1)} if num_labels == 1 else {(batch_size, num_labels)}
            valid, expected = not integer and shape in shapes, f"floats ({batch_size}, {num_labels})"
        if not valid:
            raise ValueError(
                f"labels have shape {shape} and dtype {labels.dtype}; a {problem} head with {num_labels} labels "
                f"expects {expected} for a batch of {batch_size} documents."
            )
        if problem != "single_label_classification":
            return None
        labels = labels.reshape(-1)
        ignored = labels == -100
        outside = ~ignored & ((labels < 0) | (labels >= num_labels))
        if bool(outside.any()):
            row = int(outside.nonzero()[0, 0])
            raise ValueError(
                f"labels[{row}] is {int(labels[row])}, outside this head's {num_labels} classes (0..{num_labels - 1}); "
                "-100 marks a document left out of the loss. Check the label mapping, or set num_labels."
            )
        return ignored.to(self.device)


def finish_logits(logits: torch.Tensor, text_config: Any) -> torch.Tensor:
    """What some causal LM heads do to the output projection's logits in their forward, told by the config
    fields that ask for it: Cohere multiplies by `logit_scale`, Granite divides by `logits_scaling`, Gemma 2
    and 3 soft-cap at `final_logit_softcapping`."""
    if (scale := getattr(text_config, "logit_scale", None)) is not None:
        logits = logits * scale
    if (divisor := getattr(text_config, "logits_scaling", None)) is not None:
        logits = logits / divisor
    if (cap := getattr(text_config, "final_logit_softcapping", None)) is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _check_token_labels(labels: torch.Tensor, vocab_size: int) -> None:
    """Causal LM labels are token ids of the output vocabulary, or -100 where no loss is wanted."""
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer token ids (-100 where no loss is wanted), got dtype {labels.dtype}.")
    outside = (labels != -100) & ((labels < 0) | (labels >= vocab_size))
    if bool(outside.any()):
        row, column = outside.nonzero()[0].tolist()
        raise ValueError(
            f"labels[{row}, {column}] is {int(labels[row, column])}, outside the output vocabulary of {vocab_size} "
            "tokens; use the tokenizer's ids, and -100 where no loss is wanted."
        )


def _labels_in_window(labels: torch.Tensor, first_kept: int) -> torch.Tensor:
    """The labels scored by logits kept from column `first_kept` on (the logit at column t predicts the
    label at t + 1); any label the window cannot score is an error, never silently dropped."""
    if first_kept == 0:
        return labels
    outside = (labels[:, : first_kept + 1] != -100).nonzero()
    if len(outside):
        needed = labels.shape[1] - int(outside[:, 1].min()) + 1
        raise ValueError(
            f"labels are set at column {int(outside[:, 1].min())}, which the last {labels.shape[1] - first_kept} "
            f"logits (logits_to_keep) cannot score: pass logits_to_keep >= {needed}, or 0 to keep them all."
        )
    return labels[:, first_kept:]


class RMTForCausalLM(RMTPreTrainedModel, RMTGenerationMixin):
    """Decoder RMT: every segment is `[read memory] tokens [write memory]` under the backbone's causal
    mask, positions restarting in each segment; next memory = last-layer states at the write positions.

    `logits_to_keep=k` computes only the last k logits, with labels too: the loss then covers the labels
    those logits predict (an answer-only loss on a long document needs only its last few)."""

    _backbone_auto_class = AutoModelForCausalLM
    _alignment = "start"  # segments are cut from each document's first token
    # Decoding state lives in our own cache: generate() must not roll it back (assisted decoding).
    _is_stateful = True
    # The loss is a sum over tokens divided by Trainer's `num_items_in_batch` when it passes one.
    accepts_loss_kwargs = True

    def _check_backbone(self, config: RMTConfig) -> None:
        if not is_decoder_family(config.text_config):
            family = config.text_config.model_type
            hint = (
                " (or set is_decoder=True in its config to run it as a decoder)"
                if family in CAUSAL_ENCODER_FAMILIES
                else ""
            )
            raise ValueError(
                f"RMTForCausalLM needs a decoder backbone; {family!r} is an encoder: use RMTForSequenceClassification"
                f"{hint}."
            )

    @classmethod
    def from_backbone(cls, pretrained_model_name_or_path: str | nn.Module, **kwargs: Any) -> RMTForCausalLM:
        """Wrap a pretrained decoder with memory, keeping its weights (see `RMTPreTrainedModel.from_backbone`).
        An encoder of `CAUSAL_ENCODER_FAMILIES` (BERT) is loaded as a decoder: `is_decoder=True`."""
        backbone_kwargs = dict(kwargs.pop("backbone_kwargs", None) or {})
        if isinstance(pretrained_model_name_or_path, nn.Module):  # loaded: checked, not reloaded as a decoder
            loaded = getattr(pretrained_model_name_or_path, "config", None)
            if loaded is not None and loaded.model_type in CAUSAL_ENCODER_FAMILIES and not loaded.is_decoder:
                raise ValueError(f"This loaded {loaded.model_type} is an encoder: load it with is_decoder=True.")
        elif AutoConfig.from_pretrained(pretrained_model_name_or_path).model_type in CAUSAL_ENCODER_FAMILIES:
            backbone_kwargs.setdefault("is_decoder", True)
        return super().from_backbone(pretrained_model_name_or_path, backbone_kwargs=backbone_kwargs, **kwargs)

    @classmethod
    def _load_backbone(cls, name: Any, backbone_kwargs: dict[str, Any]) -> Any:
        """A BERT encoder loads as a decoder whose LM head is tied to its embeddings (`bert_as_decoder`)."""
        if backbone_kwargs.get("is_decoder") and AutoConfig.from_pretrained(name).model_type == "bert":
            return bert_as_decoder(name, backbone_kwargs)
        return super()._load_backbone(name, backbone_kwargs)

    def get_output_embeddings(self) -> nn.Module:
        return self.backbone.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.backbone.set_output_embeddings(value)

    def lm_head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The backbone head's logits for last hidden states, as its own forward finishes them."""
        return finish_logits(self.backbone.get_output_embeddings()(hidden), self.config.text_config)

    def _backbone_call(self, segment: Segment, state: MemoryState, **backbone_kwargs: Any) -> BackboneCall:
        """`[read memory] tokens [write memory]` (`layout.decoder_segment`) through the base model; the tokens'
        last hidden states."""
        embedded = self.get_input_embeddings()(segment.input_ids)
        read, write = memory_slots(self.memory, state)
        inputs, write_index = decoder_segment(embedded, segment.attention_mask.sum(dim=1), read, write)
        tokens = slice(read.shape[1], read.shape[1] + embedded.shape[1])
        return BackboneCall(
            self.backbone.base_model, {**inputs, "use_cache": False}, write_index,
            lambda outputs: outputs.last_hidden_state[:, tokens],
        )  # fmt: skip

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        memory_state: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        token_type_ids: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        return_dict: bool | None = None,
        use_cache: bool | None = None,
        cache: RMTGenerationCache | None = None,
        inputs_embeds: None = None,
        output_attentions: None = None,
        output_hidden_states: None = None,
    ) -> RMTCausalLMOutput | tuple:
        """Logits (and the loss with `labels`) over whole documents of any length.

        `token_type_ids` (from BERT tokenizers) must be all 0. `num_items_in_batch` is `Trainer`'s loss
        normaliser. `cache` is set by `generate()` (an `RMTGenerationCache`: empty, the call reads the prompt;
        else it continues decoding); `use_cache` is accepted for compatibility: a call without a cache always
        runs the full forward pass.
        """
        check_wrapper_arguments(inputs_embeds, output_attentions=output_attentions,
                                output_hidden_states=output_hidden_states)  # fmt: skip
        if token_type_ids is not None and bool(token_type_ids.any()):
            raise ValueError("RMTForCausalLM reads every token as type 0; drop token_type_ids (or pass zeros).")
        if cache is not None and not isinstance(cache, RMTGenerationCache):
            raise ValueError(
                f"RMTForCausalLM keeps its own decoding cache (RMTGenerationCache); got a {type(cache).__name__}: "
                "call generate() (continue a document with memory_state)."
            )
        if cache is not None:  # inside generate(): read the prompt into the empty cache, then continue it
            reads_prompt = cache.get_seq_length() == 0
            logits = prefill(self, input_ids, attention_mask, cache) if reads_prompt else decode(self, cache, input_ids)
            output = RMTCausalLMOutput(logits=logits, memory_state=cache.memory_state, **{CACHE_NAME: cache})
        else:
            loss_kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
            output = self._full_forward(input_ids, attention_mask, labels, memory_state, logits_to_keep, **loss_kwargs)
        return output if return_dict is not False else output.to_tuple()

    def _full_forward(self, input_ids, attention_mask, labels, memory_state, logits_to_keep, **loss_kwargs):
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(
                f"logits_to_keep must be an int >= 0 (logits of the last k positions; 0: all), got {logits_to_keep!r}."
            )
        plan = self._plan(input_ids, attention_mask, None)
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(
                f"labels have shape {tuple(labels.shape)} but input_ids {tuple(input_ids.shape)}; pass one label "
                "per input token (-100 where no loss is wanted)."
            )
        length = input_ids.shape[1]
        first_kept = max(length - logits_to_keep, 0) if logits_to_keep else 0
        if labels is not None:
            if attention_mask is not None:
                labels = labels.masked_fill(attention_mask == 0, -100)
            _check_token_labels(labels, self.get_output_embeddings().weight.shape[0])
            labels = _labels_in_window(labels, first_kept)
        kept_rows, kept_columns, kept_hidden = [], [], []
        for segment, token_hidden, state in self._segments(plan, memory_state):  # noqa: B007
            width = token_hidden.shape[1]
            columns = segment.first_column[:, None] + torch.arange(width, device=input_ids.device)
            selected = segment.attention_mask.bool() & (columns >= first_kept)
            kept_rows.append(segment.rows[:, None].expand(-1, width)[selected])
            kept_columns.append(columns[selected] - first_kept)
            kept_hidden.append(token_hidden[selected])
        hidden = token_hidden.new_zeros((plan.batch_size, length - first_kept, token_hidden.shape[-1]))
        hidden = hidden.index_put((torch.cat(kept_rows), torch.cat(kept_columns)), torch.cat(kept_hidden))
        logits = self.lm_head_logits(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1], **loss_kwargs)
        return RMTCausalLMOutput(loss=loss, logits=logits, memory_state=state)


__all__ = ["RMTModel", "RMTForSequenceClassification", "RMTForCausalLM", "RMTPreTrainedModel"]
