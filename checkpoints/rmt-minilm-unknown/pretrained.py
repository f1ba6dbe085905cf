"""The base of every RMT model: building around a pretrained backbone, weight initialisation, and the
segment recurrence (`RMTPreTrainedModel._segments`) that the heads in `modeling_rmt.py` run."""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer, GenerationConfig, PreTrainedModel
from transformers import initialization as init

from .configuration_rmt import RMTConfig, backbone_position_limit, is_decoder_family, segment_overhead
from .diagonal import DiagonalExecutor
from .layout import BackboneCall
from .loading import check_export_id, check_layer_layout, local_export
from .memory import AssociativeLayer, AssociativeMemory, MemoryState, TokenMemory, build_memory
from .segmenting import Segment, SegmentPlan, plan_segments

# Keyword arguments of `from_backbone` that configure the backbone's head rather than the RMT wrapper.
HEAD_KWARGS = ("num_labels", "id2label", "label2id", "problem_type", "classifier_dropout")
# Keyword arguments of `from_backbone` that say how to load the backbone (the first group its tokenizer too).
SOURCE_KWARGS = ("revision", "cache_dir", "local_files_only", "token", "trust_remote_code", "subfolder")
LOADING_KWARGS = (*SOURCE_KWARGS, "dtype", "torch_dtype", "device_map", "quantization_config")


def scatter_rows(rows: torch.Tensor, values: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Place the active documents' `values` into a zero tensor covering the whole batch."""
    if rows.numel() == batch_size:
        return values
    full = values.new_zeros((batch_size, *values.shape[1:]))
    return full.index_copy(0, rows, values)


def check_wrapper_arguments(inputs_embeds: Any = None, **flags: Any) -> None:
    """Arguments that wrappers such as PEFT's task models pass to every model: accepted while they ask for
    nothing this model does not give (`flags`: output switches it does not support)."""
    if inputs_embeds is not None:
        raise ValueError(
            "inputs_embeds is not supported: RMT embeds each segment's tokens itself, beside memory; pass input_ids."
        )
    for name, value in flags.items():
        if value is not None and value is not False:
            raise ValueError(f"{name}={value!r} is not supported by this RMT model; leave it unset.")


def adopted_generation_config(backbone_generation: GenerationConfig, pad_token_id: int | None) -> GenerationConfig:
    """The backbone's own generation settings (its `generation_config.json`: stop ids such as Llama 3's several
    EOS ids, sampling defaults), with the tokenizer's pad id where the backbone names none."""
    generation = copy.deepcopy(backbone_generation)
    if generation.pad_token_id is None and pad_token_id is not None:
        generation.pad_token_id = pad_token_id
    return generation


def loaded_backbone(backbone: nn.Module, tokenizer: Any, backbone_kwargs: dict[str, Any]) -> PreTrainedModel:
    """A backbone given to `from_backbone` as a loaded model: plain (not already inside a memory), with a tokenizer."""
    if isinstance(backbone, BaseModelHolder):  # an RMTModel's backbone
        backbone = backbone.model
    if not isinstance(backbone, PreTrainedModel):
        raise ValueError(f"A loaded backbone must be a transformers PreTrainedModel, not {type(backbone).__name__}.")
    if any(isinstance(module, AssociativeLayer) for module in backbone.modules()):
        raise ValueError(
            "This backbone's layers are already wrapped by an ARMT memory (an ARMT model's backbone, or one given "
            "to `from_backbone` before: it wraps a loaded model's layers in place): give a plain model, e.g. the "
            "backbone of an RMT-memory model or a freshly loaded one."
        )
    if tokenizer is None:
        raise ValueError("A backbone given as a loaded model needs `tokenizer=` (its special tokens go in the config).")
    if backbone_kwargs:
        raise ValueError(
            f"{sorted(backbone_kwargs)} configure or load a backbone given by name (head settings such as num_labels, "
            "loading options such as dtype); a loaded model has them already: set them on it instead."
        )
    return backbone


def sequential_segments(
    model: RMTPreTrainedModel, plan: SegmentPlan, memory_state: MemoryState | None, **backbone_kwargs: Any
) -> Iterator[tuple[Segment, Any, MemoryState]]:
    """The reference segment executor: one segment after another, each through the whole backbone; yields
    (segment, outputs, memory after it). `DiagonalExecutor` is its peer for inference (same signature)."""
    memory, steps = model.memory, plan.num_segments
    state = model._initial_state(plan.batch_size, memory_state)
    first_step = plan.grid_offset // plan.segment_size
    # The learned initial memory is a parameter, not a transition: as in the authors' code it is never cut,
    # so the segments that read it directly (a decoder's first segment, say) still train it.
    learned_start = memory_state is None
    for step in range(steps):
        segment = plan.segment(step)
        if 0 <= model.config.bptt_depth <= steps - 1 - step:  # truncated BPTT: cut older transitions
            has_history = first_step < step if learned_start else first_step <= step
            state = memory.detach(state, has_history)  # of documents whose memory came from a segment
        current = memory.select(state, segment.rows)
        outputs, new_state = model.step(model._backbone_call(segment, current, **backbone_kwargs), current)
        state = memory.update_rows(state, segment.rows, new_state)
        yield segment, outputs, state


class BaseModelHolder(nn.Module):
    """Holds a base model under its own prefix (e.g. `bert`), so its weights keep the keys they have
    inside a task model: checkpoints of RMTModel and of the task heads load into each other."""

    def __init__(self, base_model: PreTrainedModel) -> None:
        super().__init__()
        self.prefix = base_model.base_model_prefix
        self.add_module(self.prefix, base_model)

    @property
    def model(self) -> PreTrainedModel:
        return getattr(self, self.prefix)

    @property
    def config(self) -> Any:
        return self.model.config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)


class RMTPreTrainedModel(PreTrainedModel):
    """Shared machinery: building around a backbone, weight init and the segment recurrence.

    `diagonal_executor` holds the stacked copy of the layer weights that diagonal batching runs on: None until
    the first diagonal call, rebuilt when the weights have changed since, None again after
    `release_diagonal_weights()` or `train()`. A plain attribute: never in `state_dict()` or `parameters()`.
    """

    config_class = RMTConfig
    config: RMTConfig
    base_model_prefix = "rmt"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    # With the backbone's own layer class (gathered by post_init): an ARMT layer keeps its memory weights with it.
    _no_split_modules = ["AssociativeLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _backbone_auto_class: Any = AutoModel
    _hold_base_model = False  # keep a base-model backbone under its prefix (see BaseModelHolder)

    def __init__(self, config: RMTConfig, backbone: PreTrainedModel | None = None) -> None:
        if backbone is not None:  # the backbone's head decides the labels
            config.text_config = backbone.config
            config.id2label, config.label2id = dict(backbone.config.id2label), dict(backbone.config.label2id)
        config.sync_labels_to_backbone()
        config.validate_rmt()
        requested = config._attn_implementation  # before PreTrainedModel sets its own default
        super().__init__(config)
        if backbone is None:  # the backbone's class picks its default (sdpa, or eager where it has no sdpa)
            backbone = self._backbone_auto_class.from_config(config.text_config, attn_implementation=requested)
        # One config object for wrapper and backbone, with an explicit attention implementation: a
        # backbone left at None loses padding invariance on some versions.
        config.text_config._attn_implementation = backbone.config._attn_implementation or "sdpa"
        backbone.config = config.text_config
        self._backbone_takes_token_types = "token_type_ids" in inspect.signature(backbone.forward).parameters
        self.backbone = BaseModelHolder(backbone) if self._hold_base_model else backbone
        self.memory = build_memory(config, backbone)  # ARMT wraps the backbone's layers
        self._check_backbone(config)
        self._built_with = config.build_settings()  # what `_check_config` holds the config to
        self._checked_settings = config.settings_snapshot()
        self.diagonal_executor: DiagonalExecutor | None = None
        self.post_init()

    def post_init(self) -> None:
        """transformers' post_init; then `_no_split_modules` (gathered from the backbone) loses any module that
        holds the input embeddings, such as BERT's `BertEmbeddings`: RMT embeds each segment with the word
        embeddings directly, outside that module's forward, so FSDP (whose wrap policy reads this list) must keep
        them in the model's own group rather than shard them in a group gathered only around that forward."""
        super().post_init()
        embeddings = self.get_input_embeddings()
        path = next(name for name, module in self.named_modules() if module is embeddings).split(".")
        holders = {type(self.get_submodule(".".join(path[:depth]))).__name__ for depth in range(len(path))}
        self._no_split_modules = set(self._no_split_modules) - holders

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        """As transformers loads any model; refuses a checkpoint of the other memory type's layer layout, and
        a local export folder replaced while loading (`check_export_id`)."""
        wants_info = kwargs.pop("output_loading_info", False)
        name, subfolder = pretrained_model_name_or_path, kwargs.get("subfolder") or ""
        folder, export_id = local_export(name, subfolder)
        try:
            model, info = super().from_pretrained(name, *args, output_loading_info=True, **kwargs)
        except Exception as error:  # an export folder swapped mid-load fails in many ways (a file's size, say)
            if export_id is not None and local_export(name, subfolder)[1] != export_id:
                replaced = f"{folder} was replaced while it was being loaded ({error}). Load it again."
                raise ValueError(replaced) from error
            raise
        check_layer_layout(info["missing_keys"], info["unexpected_keys"], cls.__name__)
        check_export_id(folder, getattr(model.config, "export_id", None))
        return (model, info) if wants_info else model

    def _check_backbone(self, config: RMTConfig) -> None:
        """Raise ValueError when this head cannot run on the configured backbone."""

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (TokenMemory, AssociativeMemory)):
            init.normal_(module.memory_tokens, mean=0.0, std=self._initializer_range)

    def _check_config(self) -> None:
        """Once per call (forward, generate, save_pretrained): the settings the memory was built from cannot
        change on this model's config; other settings changed since the last call are validated again."""
        if self.config.settings_snapshot() != self._checked_settings:
            self.config.refuse_changed_build_settings(self._built_with, type(self).__name__)
            self.config.validate_rmt()
            self._checked_settings = self.config.settings_snapshot()

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        """As transformers saves, once the config is checked to still describe this model (`_check_config`):
        a checkpoint that could not be loaded back is never written."""
        self._check_config()
        return super().save_pretrained(save_directory, *args, **kwargs)

    def release_diagonal_weights(self) -> None:
        """Free the stacked copy of the layer weights that diagonal batching builds on first use (it is
        rebuilt when needed again). `train()` frees it too: training never uses it."""
        self.diagonal_executor = None

    def _current_diagonal_executor(self) -> DiagonalExecutor:
        """`diagonal_executor`, built when there is none or the weights changed since it was built."""
        if self.diagonal_executor is None or not self.diagonal_executor.is_current():
            self.diagonal_executor = None  # free the old stacked weights before stacking new ones
            self.diagonal_executor = DiagonalExecutor(self.memory)
        return self.diagonal_executor

    def train(self, mode: bool = True) -> RMTPreTrainedModel:
        if mode:
            self.release_diagonal_weights()
        return super().train(mode)

    @property
    def _initializer_range(self) -> float:
        return getattr(self.config.text_config, "initializer_range", 0.02)

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """As transformers does, then ARMT's layer memories: they sit inside the backbone, whose own
        `_init_weights` would treat them as ordinary linear layers. Loaded weights are left alone."""
        super().initialize_weights()
        for layer in getattr(self.memory, "layers", ()):
            # queries and keys of unit scale whatever the width: the DPFP features are products of pairs
            for weight in (layer.W_mq.weight, layer.W_mk.weight):
                init.normal_(weight, mean=0.0, std=weight.shape[1] ** -0.5)
            init.normal_(layer.W_mb.weight, mean=0.0, std=self._initializer_range)
            init.zeros_(layer.W_mb.bias)
            init.zeros_(layer.W_mv.weight)  # W_mv = 0: an untrained ARMT equals its backbone

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.backbone.set_input_embeddings(value)

    @classmethod
    def _load_backbone(cls, name: str | os.PathLike, backbone_kwargs: dict[str, Any]) -> PreTrainedModel:
        """The backbone `from_backbone` wraps, loaded by name with its head."""
        return cls._backbone_auto_class.from_pretrained(name, **backbone_kwargs)

    @classmethod
    def from_backbone(
        cls,
        pretrained_model_name_or_path: str | nn.Module,
        *,
        num_mem_tokens: int = 10,
        segment_size: int | None = None,
        tokenizer: Any = None,
        backbone_kwargs: dict[str, Any] | None = None,
        **config_kwargs: Any,
    ) -> RMTPreTrainedModel:
        """Wrap a pretrained backbone (a folder, a Hub id, or a loaded model) with memory, keeping its weights.
        A loaded model becomes the new model's backbone in place: ARMT wraps its layers, and it moves to the
        new model's device and dtype.

        `segment_size` defaults to the largest that fits the backbone's positions. Special-token ids
        come from `tokenizer` (or the backbone's own tokenizer). Head settings such as `num_labels` and
        loading options such as `dtype` or `device_map` go to the backbone, given directly or in `backbone_kwargs`.
        """
        backbone_kwargs = dict(backbone_kwargs or {})
        for key in (*HEAD_KWARGS, *LOADING_KWARGS):
            if key in config_kwargs:
                backbone_kwargs[key] = config_kwargs.pop(key)
        if config_kwargs.get("attn_implementation") is not None:  # the backbone runs the attention
            backbone_kwargs.setdefault("attn_implementation", config_kwargs["attn_implementation"])
        if isinstance(pretrained_model_name_or_path, nn.Module):
            backbone = loaded_backbone(pretrained_model_name_or_path, tokenizer, backbone_kwargs)
        else:
            backbone = cls._load_backbone(pretrained_model_name_or_path, backbone_kwargs)
        if tokenizer is None:
            source = {key: backbone_kwargs[key] for key in SOURCE_KWARGS if key in backbone_kwargs}
            tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **source)
        for name in ("cls_token_id", "sep_token_id", "pad_token_id"):
            config_kwargs.setdefault(name, getattr(tokenizer, name, None))
        counted = isinstance(num_mem_tokens, int) and not isinstance(num_mem_tokens, bool)  # else RMTConfig says why
        if segment_size is None and counted:
            overhead = segment_overhead(backbone.config, num_mem_tokens, config_kwargs.get("memory_type", "rmt"))
            segment_size = backbone_position_limit(backbone.config) - overhead
        config = RMTConfig(
            text_config=backbone.config, num_mem_tokens=num_mem_tokens, segment_size=segment_size, **config_kwargs
        )
        model = cls(config, backbone=backbone)
        if model.can_generate() and backbone.generation_config is not None:
            model.generation_config = adopted_generation_config(backbone.generation_config, config.pad_token_id)
        embeddings = model.get_input_embeddings().weight
        with torch.no_grad():  # memory starts at the scale of the pretrained token embeddings
            model.memory.memory_tokens.normal_(0.0, float(embeddings.float().std()))
        model.config.dtype = embeddings.dtype  # as from_pretrained records it
        return model.to(device=embeddings.device, dtype=embeddings.dtype)

    # ----- the recurrence -------------------------------------------------------------------------

    _alignment: str | None = None  # None: config.segment_alignment

    def _plan(
        self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, token_type_ids: torch.Tensor | None
    ) -> SegmentPlan:
        if input_ids is None:
            raise ValueError("input_ids are required: pass the tokenizer's output for whole documents.")
        self._check_config()
        config = self.config
        decoder = is_decoder_family(config.text_config)  # decoders keep every token, pad ids included
        plan = plan_segments(
            input_ids,
            attention_mask,
            token_type_ids if self._backbone_takes_token_types else None,
            segment_size=config.segment_size,
            cls_token_id=None if decoder else config.cls_token_id,
            sep_token_id=None if decoder else config.sep_token_id,
            pad_token_id=config.pad_token_id,
            alignment=self._alignment or config.segment_alignment,
            padding_needs_mask=not decoder,
            vocab_size=self.get_input_embeddings().weight.shape[0],
        )
        if decoder and plan.compacted:  # logits and the KV cache follow the input's own columns
            raise ValueError("The attention_mask has holes inside a sequence; pass contiguous sequences.")
        cap = config.max_n_segments
        if cap is not None and self.training and torch.is_grad_enabled() and plan.num_segments > cap:
            raise ValueError(
                f"A training document needs {plan.num_segments} segments but config.max_n_segments is {cap}; "
                "shorten the training documents or raise max_n_segments (inference has no cap)."
            )
        return plan

    def _segments(
        self, plan: SegmentPlan, memory_state: MemoryState | None, **backbone_kwargs: Any
    ) -> Iterator[tuple[Segment, Any, MemoryState]]:
        """Run the segments in order, yielding (segment, backbone output, memory after it) per step; the
        executor is chosen here, and only here. Diagonal batching serves inference: with gradients on
        (training, or probing a model in eval mode) the sequential loop runs, so that gradients reach every
        weight. Its memory is complete only after the last segment (earlier steps yield None)."""
        if self.config.diagonal_batching and not self.training and not torch.is_grad_enabled():
            execute = self._current_diagonal_executor()
        else:
            execute = sequential_segments
        return execute(self, plan, memory_state, **backbone_kwargs)

    def step(self, call: BackboneCall, state: MemoryState) -> tuple[Any, MemoryState]:
        """The recurrence: one backbone call reading memory `state` -> (its outputs, the memory after it).

        Every path runs its segments through here: the sequential loop (a whole segment per call), the
        prompt prefill and decoding (a segment's columns through a KV cache; the call at a segment boundary
        runs the write memory). A call without `memory_index` writes nothing: the state is returned as it is.
        `DiagonalExecutor`, the fast path for inference, computes the same per layer (see diagonal.py).
        """
        with self.memory.reading(state, call.memory_index) as recording:
            outputs = call.module(**call.inputs)
        if call.memory_index is None:
            return call.finish(outputs), state
        hidden = outputs.last_hidden_state if "last_hidden_state" in outputs else (outputs.hidden_states or [None])[-1]
        written = self.memory.collect(recording, hidden, call.memory_index)
        return call.finish(outputs), self.memory.write(state, written)

    def _initial_state(self, batch_size: int, memory_state: MemoryState | None) -> MemoryState:
        if memory_state is None:
            return self.memory.init_state(batch_size)
        return self.memory.prepare_state(memory_state, batch_size)

    def _read(self, plan: SegmentPlan, memory_state: MemoryState | None) -> MemoryState:
        """The memory after reading every segment of `plan` (outputs are discarded)."""
        if plan.num_segments == 0:
            return self._initial_state(plan.batch_size, memory_state)
        for _, _, state in self._segments(plan, memory_state):  # noqa: B007 (the final state)
            pass
        return state

    def _backbone_call(self, segment: Segment, state: MemoryState, **backbone_kwargs: Any) -> BackboneCall:
        """How this head runs `segment` through the backbone with memory `state`."""
        raise NotImplementedError
