"""Configuration of Recurrent Memory Transformer models wrapping any supported backbone."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, ClassVar

from transformers import AutoConfig, BertConfig, PreTrainedConfig
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)

from .layout import overhead

# RoBERTa-style models number positions from `pad_token_id + 1`.
POSITIONS_AFTER_PAD = ("roberta", "xlm-roberta", "camembert")
# Encoder families that run as decoders with `is_decoder=True` (causal attention and a KV cache, as in
# transformers' BERT2BERT): a pretrained encoder can then back an RMTForCausalLM.
CAUSAL_ENCODER_FAMILIES = ("bert",)
MEMORY_TYPES = ("rmt", "armt")
SEGMENT_ALIGNMENTS = ("right", "left")
SEGMENT_LOSSES = ("final", "mean")
# The input length RMT models advertise to clients that ask for one (`config.max_position_embeddings`, the saved
# tokenizers' `model_max_length`): the segments make inputs unbounded, and this bound is far beyond any document.
LONG_DOCUMENT_TOKENS = 2**24
AUTO_MAP = {
    "AutoConfig": "configuration_rmt.RMTConfig",
    "AutoModel": "modeling_rmt.RMTModel",
    "AutoModelForSequenceClassification": "modeling_rmt.RMTForSequenceClassification",
    "AutoModelForCausalLM": "modeling_rmt.RMTForCausalLM",
}


# Setting types, checked before any value (values come from code and from hand-edited config.json files alike).
COUNT_SETTINGS = ("num_mem_tokens", "segment_size", "max_n_segments", "bptt_depth", "armt_d_mem", "armt_num_heads")
TOKEN_SETTINGS = ("cls_token_id", "sep_token_id", "pad_token_id")
FLAG_SETTINGS = ("armt_correction", "armt_normalize_features", "diagonal_batching")
# Keyword arguments PreTrainedConfig takes besides its fields (popped in its __post_init__ or set by from_dict).
PRETRAINED_CONFIG_KWARGS = ("name_or_path", "_name_or_path", "torch_dtype", "attn_implementation", "num_labels",
                            "experts_implementation", "output_attentions", "per_layer_config", "_commit_hash",
                            "auto_map", "model_type", "tie_word_embeddings")  # fmt: skip


def one_edit_apart(a: str, b: str) -> bool:
    """Whether `a` becomes `b` by one insertion, deletion, substitution or swap of neighbouring characters."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diffs = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
        swapped = (
            len(diffs) == 2 and diffs[1] == diffs[0] + 1 and a[diffs[0]] == b[diffs[1]] and a[diffs[1]] == b[diffs[0]]
        )
        return len(diffs) == 1 or swapped
    short, long = sorted((a, b), key=len)
    first = next((i for i, (x, y) in enumerate(zip(short, long, strict=False)) if x != y), len(short))
    return short[first:] == long[first + 1 :]


def is_decoder_family(text_config: PreTrainedConfig) -> bool:
    """Whether the backbone runs as a decoder, told from transformers' own model tables: a family with a causal
    LM head and no masked-LM one (Llama, GPT-2, ...), or an encoder family with a causal LM head configured with
    `is_decoder=True` (BERT as in BERT2BERT)."""
    family = text_config.model_type
    if family in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return family in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and bool(getattr(text_config, "is_decoder", False))
    return family in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def backbone_problem(text_config: PreTrainedConfig) -> str | None:
    """Why RMT cannot wrap this backbone, told from its structure; None when it can."""
    family = text_config.model_type
    if getattr(text_config, "is_encoder_decoder", False):
        return (f"{family!r} is an encoder-decoder model; RMT carries memory through one stack of layers that reads "
                "its own output as input. Wrap a decoder-only or encoder-only model instead.")  # fmt: skip
    if (
        family not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and family not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    ):
        return (f"{family!r} has neither a causal LM nor a sequence classification model in transformers (a vision, "
                "audio or embedding-only backbone?); RMT needs a text model that reads token embeddings.")  # fmt: skip
    return None


def attention_window(text_config: PreTrainedConfig) -> int | None:
    """The sliding window of a decoder whose layers (all, or those `layer_types` names) attend locally; None when
    every layer attends to the whole input (qwen2-style configs keep a `sliding_window` value but no such layer)."""
    window = getattr(text_config, "sliding_window", None)
    layer_types = getattr(text_config, "layer_types", None)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    if getattr(text_config, "use_sliding_window", True) is False:
        return None
    return int(window)


def backbone_position_limit(text_config: PreTrainedConfig) -> int:
    """Longest input (in tokens) the backbone's position embeddings can address."""
    reserved = 0
    if text_config.model_type in POSITIONS_AFTER_PAD:
        reserved = (0 if text_config.pad_token_id is None else text_config.pad_token_id) + 1
    limit = getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)
    return int(limit) - reserved


def segment_overhead(text_config: PreTrainedConfig, num_mem_tokens: int, memory_type: str = "rmt") -> int:
    """Positions a segment needs besides its content, as `layout.py` lays segments out."""
    return overhead(is_decoder_family(text_config), num_mem_tokens, memory_type)


def _as_backbone_config(text_config: Any) -> PreTrainedConfig:
    if text_config is None:
        return BertConfig()
    if isinstance(text_config, PreTrainedConfig):
        return copy.deepcopy(text_config)  # the caller's config is never changed
    if isinstance(text_config, dict):
        if "model_type" not in text_config:
            raise ValueError(
                "`text_config` is a dict without `model_type`; pass e.g. AutoConfig.from_pretrained(name) "
                "or a dict with `model_type` set."
            )
        values = dict(text_config)
        return AutoConfig.for_model(values.pop("model_type"), **values)
    raise TypeError(f"`text_config` must be a PreTrainedConfig or a dict, got {type(text_config).__name__}.")


class RMTConfig(PreTrainedConfig):
    r"""Configuration of a Recurrent Memory Transformer around a backbone given as `text_config`.

    Args:
        text_config: the backbone's config (any supported AutoConfig or its dict); BERT-base if omitted.
        num_mem_tokens: number of memory tokens carried from segment to segment.
        segment_size: content tokens per segment (memory and special tokens come on top).
        max_n_segments: the most segments a document may have in training (inference is unbounded);
            `None` for no cap.
        bptt_depth: gradients cross at most this many memory transitions back from the last segment;
            -1 for full backpropagation through time. The learned initial memory is never cut off: it
            gets the gradient of every segment within reach that reads it (a decoder's first segment).
        segment_alignment: "right" (the authors' default: the last segment is full, a short first
            segment is padded) or "left" (the first segment is full, the last is short).
        segment_loss: "final" (loss on the last segment's logits) or "mean" (mean over each
            document's segments).
        memory_type: "rmt" (memory tokens recur through the last layer's states) or "armt" (an
            associative matrix memory in every layer, written by memory tokens at each segment's end).
        armt_d_mem: ARMT key size before the DPFP feature map (keys have 6 * armt_d_mem features).
        armt_num_heads: ARMT memory heads (each holds its share of the keys and values).
        armt_correction: ARMT's gamma correction of the normaliser z (count only new key directions).
        armt_normalize_features: L2-normalise ARMT's key features phi(q), phi(k) per head, as the authors'
            code does from August 2024 on (the paper's GPT-2 checkpoints predate it: False).
        diagonal_batching: run inference (not training) with diagonal batching: every (layer, segment)
            cell whose inputs are ready runs in one batched call; the same outputs up to float error.
            ARMT only.
        cls_token_id, sep_token_id, pad_token_id: the backbone tokenizer's special tokens.
    """

    model_type: ClassVar[str] = "rmt"
    sub_configs: ClassVar[dict[str, type]] = {"text_config": AutoConfig}
    # Trainer's predictions are the logits; the memory is state, not a prediction.
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["memory_state", "segments_mask", "segment_hidden_states"]

    text_config: dict | PreTrainedConfig | None = None
    num_mem_tokens: int = 10
    segment_size: int = 499
    max_n_segments: int | None = None
    bptt_depth: int = -1
    segment_alignment: str = "right"
    segment_loss: str = "final"
    memory_type: str = "rmt"
    armt_d_mem: int = 64
    armt_num_heads: int = 1
    armt_correction: bool = True
    armt_normalize_features: bool = False
    diagonal_batching: bool = False
    cls_token_id: int | None = None
    sep_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        self.refuse_misspelt_settings(kwargs)
        text_config_given = self.text_config is not None
        self.text_config = _as_backbone_config(self.text_config)
        backbone_attention = self.text_config._attn_implementation  # set on the backbone's config, if at all
        if not text_config_given:  # the default backbone: bert-base-uncased's vocabulary
            self.cls_token_id = 101 if self.cls_token_id is None else self.cls_token_id
            self.sep_token_id = 102 if self.sep_token_id is None else self.sep_token_id
        if self.pad_token_id is None:
            self.pad_token_id = getattr(self.text_config, "pad_token_id", None)
        labels_given = self.id2label is not None or "num_labels" in kwargs
        if not labels_given:  # the backbone's head decides the labels
            self.id2label = dict(self.text_config.id2label)
            self.label2id = dict(self.text_config.label2id)
            self.problem_type = self.problem_type or self.text_config.problem_type
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        super().__post_init__(**kwargs)
        if kwargs.get("attn_implementation") is None and backbone_attention is not None:
            self._attn_implementation = backbone_attention  # kept unless this config names its own
        if labels_given:  # labels given here are pushed down to the backbone's head
            self.sync_labels_to_backbone()
        self.validate_rmt()

    @property
    def max_position_embeddings(self) -> int:
        """The input length this model advertises, LONG_DOCUMENT_TOKENS (read by clients such as `generate()`'s
        default length): segments make inputs unbounded. The backbone's own limit is `text_config`'s. Not saved."""
        return LONG_DOCUMENT_TOKENS

    @classmethod
    def setting_names(cls) -> tuple[str, ...]:
        """The RMT settings: this class's own fields besides `text_config`."""
        inherited = {field.name for field in dataclasses.fields(PreTrainedConfig)} | {"text_config"}
        return tuple(field.name for field in dataclasses.fields(cls) if field.name not in inherited)

    @classmethod
    def refuse_misspelt_settings(cls, kwargs: dict[str, Any]) -> None:
        """ValueError for a keyword one edit away from an RMT setting (e.g. `num_mem_token=4`): PreTrainedConfig
        would store it as an unused attribute and the setting would silently keep its default."""
        known = set(dir(PreTrainedConfig)) | set(PRETRAINED_CONFIG_KWARGS)
        for key, value in kwargs.items():
            if key in known:
                continue
            near = [name for name in cls.setting_names() if one_edit_apart(key, name)]
            if near:
                raise ValueError(
                    f"RMTConfig got {key}={value!r}, which is not a setting: did you mean {near[0]}? Spell it "
                    f"{near[0]} (in config.json too); a misspelt setting would be ignored."
                )

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        """As transformers builds a config; settings given as keyword arguments (set after construction by
        transformers) are checked like the file's own."""
        cls.refuse_misspelt_settings(kwargs)
        loaded = super().from_dict(config_dict, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        if set(kwargs) & set(cls.setting_names()):
            config.validate_rmt()
        return loaded

    def settings_snapshot(self) -> tuple:
        """Every RMT setting's (name, type, value): compares unequal when any setting changed, even 1 to True."""
        return tuple((name, type(value), value) for name in self.setting_names() for value in [getattr(self, name)])

    def build_settings(self) -> dict[str, Any]:
        """The settings a model's memory is built from (weight shapes, the layers' update rule): fixed for the
        model's lifetime."""
        names = ["memory_type", "num_mem_tokens"]
        if self.memory_type == "armt":
            names += ["armt_d_mem", "armt_num_heads", "armt_correction", "armt_normalize_features"]
        return {name: getattr(self, name) for name in names}

    def refuse_changed_build_settings(self, built: dict[str, Any], model_class: str) -> None:
        """ValueError when a setting of `build_settings` differs from `built`, the value the model was built with."""
        self._check_setting_types()  # a wrong type is named as such first
        for name, value in built.items():
            now = getattr(self, name)
            if type(now) is not type(value) or now != value:
                raise ValueError(
                    f"model.config.{name} was changed to {now!r}, but this model was built with {name}={value!r}: "
                    "its memory's weights and modules keep that setting, so the config no longer describes the model "
                    f"(a checkpoint saved now could not be loaded back). Set it back to {value!r}, or build a new "
                    f"model with it: {model_class}.from_backbone(<backbone>, {name}={now!r}, ...) puts a fresh memory "
                    "on a backbone; from_pretrained reloads a saved one."
                )

    def _check_setting_types(self) -> None:
        """Counts and token ids must be ints (not bool, str or float), flags bools: values from code and from
        hand-edited config.json files alike."""
        for name in (*COUNT_SETTINGS, *TOKEN_SETTINGS):
            value = getattr(self, name)
            optional = name in TOKEN_SETTINGS or name == "max_n_segments"
            values = value if isinstance(value, list) and name in TOKEN_SETTINGS else [value]
            for item in values:
                if (item is None and optional) or (isinstance(item, int) and not isinstance(item, bool)):
                    continue
                raise ValueError(
                    f"{name} must be an integer{' or None' if optional else ''}, got {item!r} ({type(item).__name__}):"
                    " write a whole number, without quotes or a decimal point (in config.json too)."
                )
        for name in FLAG_SETTINGS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(
                    f"{name} must be True or False, got {value!r} ({type(value).__name__}); in config.json write "
                    f"true or false without quotes."
                )

    def validate_rmt(self) -> None:
        """Check every RMT setting against the backbone; raise ValueError naming the fix."""
        self._check_setting_types()
        family = self.text_config.model_type
        if (problem := backbone_problem(self.text_config)) is not None:
            raise ValueError(problem)
        if getattr(self.text_config, "output_router_logits", False) is True:
            raise ValueError(
                f"The {family} backbone's config sets output_router_logits=True, asking for its mixture-of-experts "
                "load-balancing loss, which RMT does not add to its own loss; set output_router_logits=False "
                "(from_backbone(..., backbone_kwargs={'output_router_logits': False}), or in text_config)."
            )
        embedding_size = getattr(self.text_config, "embedding_size", None) or self.text_config.hidden_size
        if embedding_size != self.text_config.hidden_size:
            raise ValueError(
                f"The {family} backbone embeds tokens in {embedding_size} dimensions but its layers output "
                f"{self.text_config.hidden_size}; memory fed back as input needs embedding_size == hidden_size."
            )
        if self.memory_type not in MEMORY_TYPES:
            raise ValueError(f"Unknown memory_type {self.memory_type!r}; choose one of {MEMORY_TYPES}.")
        if self.memory_type == "armt":
            self._validate_armt()
        if self.diagonal_batching:
            self._validate_diagonal()
        if not isinstance(self.num_mem_tokens, int) or self.num_mem_tokens < 1:
            raise ValueError(f"num_mem_tokens must be an integer >= 1, got {self.num_mem_tokens!r}.")
        if not isinstance(self.segment_size, int) or self.segment_size < 1:
            raise ValueError(f"segment_size must be an integer >= 1, got {self.segment_size!r}.")
        if self.max_n_segments is not None and (not isinstance(self.max_n_segments, int) or self.max_n_segments < 1):
            raise ValueError(f"max_n_segments must be None or an integer >= 1, got {self.max_n_segments!r}.")
        if not isinstance(self.bptt_depth, int) or self.bptt_depth < -1:
            raise ValueError(f"bptt_depth must be -1 (full) or an integer >= 0, got {self.bptt_depth!r}.")
        if self.segment_alignment not in SEGMENT_ALIGNMENTS:
            raise ValueError(
                f"Unknown segment_alignment {self.segment_alignment!r}; choose one of {SEGMENT_ALIGNMENTS}."
            )
        if self.segment_loss not in SEGMENT_LOSSES:
            raise ValueError(f"Unknown segment_loss {self.segment_loss!r}; choose one of {SEGMENT_LOSSES}.")
        limit = backbone_position_limit(self.text_config)
        needed = self.segment_input_length
        overhead = needed - self.segment_size
        if needed > limit:
            raise ValueError(
                f"A segment needs {needed} positions (segment_size {self.segment_size} + {overhead} for memory "
                f"and special tokens) but the {family} backbone addresses at most {limit}. Use segment_size <= "
                f"{limit - overhead}."
            )
        window = attention_window(self.text_config) if is_decoder_family(self.text_config) else None
        if window is not None and needed > window:
            raise ValueError(
                f"The {family} backbone attends within a sliding window of {window} positions, and a segment takes "
                f"{needed} ({self.segment_size} tokens + {overhead} for memory): lower segment_size to at most "
                f"{window - overhead}, where sliding-window attention within a "
                "segment is exactly full attention."
            )
        vocab = self.text_config.vocab_size
        for name in ("cls_token_id", "sep_token_id", "pad_token_id"):
            value = getattr(self, name)
            if isinstance(value, list):  # some decoder configs list several ids
                value = value[0] if value else None
            if value is not None and not 0 <= value < vocab:
                raise ValueError(f"{name}={value} is outside the backbone's vocabulary of {vocab} tokens.")

    def _validate_armt(self) -> None:
        heads, d_mem, hidden = self.armt_num_heads, self.armt_d_mem, self.text_config.hidden_size
        if not isinstance(d_mem, int) or d_mem < 1:
            raise ValueError(f"armt_d_mem must be an integer >= 1, got {d_mem!r}.")
        if not isinstance(heads, int) or heads < 1 or d_mem % heads or hidden % heads:
            raise ValueError(
                f"armt_num_heads={heads!r} must be an integer >= 1 dividing both armt_d_mem ({d_mem}) and the "
                f"backbone's hidden_size ({hidden})."
            )

    def _validate_diagonal(self) -> None:
        if self.memory_type != "armt":
            raise ValueError(
                f"diagonal_batching needs a memory in every layer (memory_type='armt'); memory_type="
                f"{self.memory_type!r} recurs from the last layer to the first, which has no diagonal. "
                "Set diagonal_batching=False or memory_type='armt'."
            )

    def sync_labels_to_backbone(self) -> None:
        """Give the backbone's head this config's labels (they may be set after construction)."""
        if self.text_config.id2label != self.id2label:
            self.text_config.id2label = dict(self.id2label)
            self.text_config.label2id = dict(self.label2id)
        self.text_config.problem_type = self.problem_type

    @property
    def segment_input_length(self) -> int:
        """Positions one full segment occupies in the backbone."""
        return self.segment_size + segment_overhead(self.text_config, self.num_mem_tokens, self.memory_type)


__all__ = ["RMTConfig"]
