"""Training a decoder RMT (`RMTForCausalLM`) on the memory tasks, e.g. BABILong-style qa1.

A document is `input question answer [SEP]` with the loss on the answer (and the end token) only;
accuracy is the share of documents whose answer tokens are all predicted (teacher-forced argmax).
With no pretrained decoder offline, `build_decoder` makes a small Llama from scratch over the given
tokenizer's vocabulary (`DECODER_PRESETS`).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from tokenizers.processors import TemplateProcessing
from transformers import LlamaConfig, PreTrainedTokenizerFast

from modeling_rmt import RMTConfig, RMTForCausalLM
from rmt_tools.tokens import with_generation_tokens

from .tasks import TaskSample

IGNORE = -100
ANSWER_RESERVE = 6  # tokens kept free at the end of a curriculum document for the answer and end token
DECODER_PRESETS: dict[str, dict] = {
    "llama-tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512),
    "llama-small": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=8, intermediate_size=1024),
}


def build_decoder(
    preset: str, tokenizer, num_mem_tokens: int, segment_size: int, memory_type: str = "rmt"
) -> RMTForCausalLM:
    """A randomly initialised RMT decoder over `tokenizer`'s vocabulary, sized by `preset`."""
    if preset not in DECODER_PRESETS:
        raise ValueError(f"Unknown decoder preset {preset!r}: use one of {sorted(DECODER_PRESETS)}.")
    positions = segment_size + 2 * num_mem_tokens
    text_config = LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=positions, pad_token_id=pad_token_id(tokenizer),
        bos_token_id=tokenizer.cls_token_id, eos_token_id=end_token_id(tokenizer), tie_word_embeddings=True,
        **DECODER_PRESETS[preset],
    )  # fmt: skip
    config = RMTConfig(text_config=text_config, num_mem_tokens=num_mem_tokens, segment_size=segment_size,
                       memory_type=memory_type, pad_token_id=pad_token_id(tokenizer))  # fmt: skip
    return RMTForCausalLM(config)


def prompt_tokenizer(tokenizer) -> PreTrainedTokenizerFast:
    """`tokenizer` adding no special tokens, as the decoder's documents were built: an encoder's
    tokenizer (MiniLM's) would put `[CLS] ... [SEP]` around a prompt, and the decoder would answer
    after `[SEP]`, which ends answers. Saved and loaded again (as `PreTrainedTokenizerFast`) it still
    adds none, so `pipeline("text-generation")` and `tokenizer(prompt)` give the training layout."""
    if tokenizer("a")["input_ids"] == tokenizer("a", add_special_tokens=False)["input_ids"]:
        return tokenizer
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} adds special tokens and is not a fast tokenizer: use a fast "
                         "one (tokenizer.json) for a decoder, so that they can be turned off.")  # fmt: skip
    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    backend.post_processor = TemplateProcessing(single="$A", pair="$A $B", special_tokens=[])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, model_max_length=tokenizer.model_max_length,
        padding_side=tokenizer.padding_side, **tokenizer.special_tokens_map,
    )  # fmt: skip


def end_token_id(tokenizer) -> int:
    """The token that ends an answer: [SEP] for WordPiece vocabularies, else the end-of-sequence token."""
    token = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError(f"{type(tokenizer).__name__} has neither a [SEP] nor an end-of-sequence token to end answers.")
    return token


def pad_token_id(tokenizer) -> int:
    """The padding token, or the end token where the tokenizer has none (GPT-2, Llama)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_token_id(tokenizer)


def end_answers_at_end_token(model: RMTForCausalLM, tokenizer) -> RMTForCausalLM:
    """Make `generate()` (and so `pipeline("text-generation")`) stop where training answers stop and pad
    with the tokenizer's pad token: an encoder backbone's config names no end-of-sequence token. The
    tokenizer (saved with the model) names the same tokens (`with_generation_tokens`)."""
    model.generation_config.eos_token_id = end_token_id(tokenizer)
    model.generation_config.pad_token_id = pad_token_id(tokenizer)
    with_generation_tokens(tokenizer, end_token_id(tokenizer), pad_token_id(tokenizer))  # and the tokenizer says so
    return model


def decoder_item(tokenizer, sample: TaskSample) -> dict[str, list[int]]:
    """`input question answer <end>` with labels on the answer and the end token only."""
    answer = tokenizer(" " + sample.target, add_special_tokens=False)["input_ids"] + [end_token_id(tokenizer)]
    ids = sample.input_ids + answer
    labels = [IGNORE] * len(sample.input_ids) + answer
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


class DecoderCollator:
    """Right-pads input ids (pad token), attention masks (0) and labels (-100), and sets
    `logits_to_keep` to the fewest last logits that score every label: the model then projects only
    the answers onto the vocabulary (the same loss, several times faster for a small decoder)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict[str, list[int]]]) -> dict[str, torch.Tensor | int]:
        width = max(len(item["input_ids"]) for item in items)
        fill = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE}
        batch = {key: torch.tensor([item[key] + [value] * (width - len(item[key])) for item in items])
                 for key, value in fill.items()}  # fmt: skip
        labelled = (batch["labels"] != IGNORE).any(dim=0).nonzero()
        return batch | {"logits_to_keep": width - int(labelled.min()) + 1 if len(labelled) else 0}


def answer_predictions(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`preprocess_logits_for_metrics`: keep the argmax only (the logits are length x vocabulary),
    right-aligned to the labels' width when only the last logits were computed."""
    predicted = logits.argmax(-1)
    if predicted.shape[1] == labels.shape[1]:
        return predicted
    return torch.cat([predicted.new_full((len(labels), labels.shape[1] - predicted.shape[1]), IGNORE), predicted], 1)


def answer_accuracy(prediction) -> dict[str, float]:
    """Share of documents whose every answer token is the argmax at the position before it."""
    predicted, labels = np.asarray(prediction.predictions), np.asarray(prediction.label_ids)
    shifted_predictions, targets = predicted[:, :-1], labels[:, 1:]
    scored = targets != IGNORE
    right = ((shifted_predictions == targets) | ~scored).all(axis=1)[scored.any(axis=1)]
    return {"accuracy": float(right.mean()) if right.size else 0.0}
