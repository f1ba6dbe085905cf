"""Convert the authors' released RMT / ARMT checkpoints into self-describing RMT checkpoint folders.

    python -m conversion.from_authors model_best.pth ./rmt-bert --backbone bert-base-uncased
    python -m conversion.from_authors pytorch_model.bin ./rmt-gpt2 --backbone gpt2 --segment-size 512
    python -m conversion.from_authors pytorch_model.bin ./armt-gpt2 --backbone gpt2 --segment-size 512
    python -m conversion.from_authors model.safetensors.index.json ./rmt-llama --backbone meta-llama/Llama-3.2-1B ...

Files: torch.save's (`model_best.pth`, `pytorch_model.bin`), safetensors, and sharded checkpoints through their
index (`model.safetensors.index.json`, `pytorch_model.bin.index.json`), as `conversion.authors_files` reads them.

Layouts (`--layout auto` tells them apart by their keys):
  encoder  trainer checkpoint {model_state_dict: {model.<bert|roberta|...>.*, model.classifier.*, mem_token_ids,
           cls_token, sep_token, model.embeddings.weight}, ...}; memory = word-embedding rows [vocab, vocab + m)
  decoder  RMT causal LM {memory_cell.memory [m, d], memory_cell.model.*}
  armt     as decoder, plus memory_cell.model.<layers>.{i}.W_mq/W_mk/W_mv/W_mb.* beside the block's .layer.*
The newer releases are brought to these first (`conversion.authors_keys`): LoRA unmerged in a PEFT backbone
(`--lora-alpha`), the layer list saved twice, the Hub ARMT wrapper (`armt.*`) and InnerLoopARMT (`memory`, `model.*`).

Most releases ship no config: `--backbone` names the backbone's (an AutoConfig id or folder, or a model folder).
InnerLoopARMT's config.json holds it, and its settings; a RecurrentWrapper's config.json its segment_size.
Every source key is accounted for (mapped, checked as an alias, a tied weight or a buffer the backbone
recomputes); anything else is an error naming it. Pickles are opened only with `weights_only=True`.
"""

from __future__ import annotations

import argparse
import copy
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedConfig, PreTrainedTokenizerBase

from conversion.authors_files import load_authors_checkpoint
from conversion.authors_keys import (
    fill_tied,
    merged_settings,
    normalize_authors_keys,
    recomputed_buffer,
    source_config,
)
from conversion.from_backbone import count, long_document_tokenizer, refuse_non_empty, run_or_exit, write_new_folder
from modeling_rmt import RMTConfig, RMTForCausalLM, RMTForSequenceClassification, RMTPreTrainedModel
from modeling_rmt.configuration_rmt import backbone_position_limit, segment_overhead

LAYOUTS = {
    "encoder": "encoder RMT trainer checkpoint: mem_token_ids, cls_token, sep_token, model.<backbone>.*, "
    "model.classifier.*",
    "decoder": "decoder RMT: memory_cell.memory, memory_cell.model.*",
    "armt": "ARMT: memory_cell.memory, memory_cell.model.<layers>.{i}.W_mq/W_mk/W_mv/W_mb.*, ...{i}.layer.*",
}
ENCODER_PREFIX, DECODER_PREFIX, BACKBONE_PREFIX = "model.", "memory_cell.model.", "backbone."
DECODER_MEMORY, OUR_MEMORY = "memory_cell.memory", "memory.memory_tokens"
ENCODER_BUFFERS = ("mem_token_ids", "cls_token", "sep_token")
EMBEDDING_ALIAS = "model.embeddings.weight"  # the authors' handle on the (extended) word embeddings
ARMT_KEY = re.compile(r"\.W_m[qkvb]\.(weight|bias)$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")


@dataclass
class ConversionReport:
    """What a conversion built and how every source key that is not a one-to-one weight was handled."""

    layout: str
    model_class: str
    num_mem_tokens: int
    segment_size: int
    notes: list[str] = field(default_factory=list)
    output_dir: Path | None = None

    def __str__(self) -> str:
        lines = [f"{self.layout} checkpoint -> {self.model_class} (num_mem_tokens={self.num_mem_tokens}, "
                 f"segment_size={self.segment_size})"]  # fmt: skip
        lines += [f"  - {note}" for note in self.notes]
        if self.output_dir is not None:
            lines.append(f"saved to {self.output_dir}")
        return "\n".join(lines)


# ----- reading the source ---------------------------------------------------------------------------


def _detect(state: Mapping[str, torch.Tensor]) -> str | None:
    if "mem_token_ids" in state and any(key.startswith(ENCODER_PREFIX) for key in state):
        return "encoder"
    if DECODER_MEMORY in state:
        return "armt" if any(key.startswith(DECODER_PREFIX) and ARMT_KEY.search(key) for key in state) else "decoder"
    return None


def detect_layout(state: Mapping[str, torch.Tensor]) -> str:
    """'encoder', 'decoder' or 'armt' from the keys; ValueError naming the keys seen otherwise."""
    layout = _detect(state)
    if layout is None:
        keys = list(state)
        seen = ", ".join(keys[:12]) + (f", ... ({len(keys)} keys)" if len(keys) > 12 else "")
        known = "; ".join(f"{name} ({description})" for name, description in LAYOUTS.items())
        raise ValueError(f"Unknown checkpoint layout. Keys seen: {seen or '(none)'}. Known layouts: {known}.")
    return layout


def _token_id(state: Mapping[str, torch.Tensor], key: str) -> int:
    value = state[key]
    if value.numel() != 1 or value.is_floating_point():
        raise ValueError(f"{key} should hold one token id, got a {value.dtype} tensor of shape {tuple(value.shape)}.")
    return int(value.reshape(-1)[0])


def _memory_count(found: int, given: int | None) -> int:
    if given is not None and given != found:
        raise ValueError(f"The checkpoint holds {found} memory tokens but num_mem_tokens={given} was given.")
    return found


# ----- building the target ------------------------------------------------------------------------


def _meta_causal_lm(text_config: PreTrainedConfig) -> torch.nn.Module:
    """A causal LM of this config on the meta device (its structure, no weights)."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(text_config)


def _input_embedding_key(model: RMTPreTrainedModel) -> str:
    weight = model.get_input_embeddings().weight
    return next(name for name, tensor in model.state_dict(keep_vars=True).items() if tensor is weight)


def _encoder(state: dict, text_config: PreTrainedConfig, options: dict, report_notes: list[str]) -> tuple:
    """(model, mapped weights, target -> source names, unmapped source keys) for an encoder trainer checkpoint."""
    for name in ENCODER_BUFFERS:
        if name not in state:
            raise ValueError(f"The encoder checkpoint has no {name!r} buffer (it has {', '.join(list(state)[:8])}...).")
    mem_ids = state["mem_token_ids"].reshape(-1)
    m = _memory_count(mem_ids.numel(), options["num_mem_tokens"])
    head = next((state[k] for k in ("model.classifier.out_proj.weight", "model.classifier.weight") if k in state), None)
    if head is None:
        raise ValueError("The encoder checkpoint has no model.classifier.weight or model.classifier.out_proj.weight.")
    if text_config.num_labels != head.shape[0]:
        text_config.num_labels = head.shape[0]
        report_notes.append(f"num_labels = {head.shape[0]}, from the classifier's shape")
    cls_id, sep_id = _token_id(state, "cls_token"), _token_id(state, "sep_token")
    tokenizer = options["tokenizer"]
    for name, value in (("cls_token_id", cls_id), ("sep_token_id", sep_id)):
        if tokenizer is not None and getattr(tokenizer, name, None) not in (None, value):
            raise ValueError(f"The checkpoint's {name} is {value}, the tokenizer's {getattr(tokenizer, name)}.")
    pad = tokenizer.pad_token_id if tokenizer is not None else text_config.pad_token_id
    segment_size = options["segment_size"]
    if segment_size is None:  # the most that fits the backbone's positions
        segment_size = backbone_position_limit(text_config) - segment_overhead(text_config, m)
    config = RMTConfig(text_config=text_config, num_mem_tokens=m, segment_size=segment_size, cls_token_id=cls_id,
                       sep_token_id=sep_id, pad_token_id=pad, **options["config_kwargs"])  # fmt: skip
    model = RMTForSequenceClassification(config)
    words_key = _input_embedding_key(model)
    source_words = ENCODER_PREFIX + words_key.removeprefix(BACKBONE_PREFIX)
    if source_words not in state:
        prefixes = sorted({k.split(".")[1] for k in state if k.startswith(ENCODER_PREFIX) and k.count(".") > 1})
        raise ValueError(
            f"The checkpoint has no {source_words}: its backbone sits under model.{{{', '.join(prefixes)}}} but the "
            f"--backbone config is a {text_config.model_type} ({model.backbone.base_model_prefix}); pass the config "
            "of the backbone the checkpoint was trained from."
        )
    words, vocab = state[source_words], text_config.vocab_size
    if words.shape[0] != vocab + m:
        raise ValueError(
            f"{source_words} has {words.shape[0]} rows, but the --backbone config's vocab_size {vocab} plus {m} memory "
            f"tokens makes {vocab + m}; pass the config of the original (unextended) backbone."
        )
    if not torch.equal(mem_ids.cpu(), torch.arange(vocab, vocab + m)):
        raise ValueError(f"mem_token_ids should be rows {vocab}..{vocab + m - 1}, got {mem_ids.tolist()}.")
    mapped = {words_key: words[:vocab], OUR_MEMORY: words[vocab:]}
    source_of = {words_key: f"{source_words}[:{vocab}]", OUR_MEMORY: f"{source_words}[{vocab}:]"}
    if EMBEDDING_ALIAS in state:
        if not torch.equal(state[EMBEDDING_ALIAS], words):
            raise ValueError(f"{EMBEDDING_ALIAS} should alias {source_words} but holds other values.")
        report_notes.append(f"{EMBEDDING_ALIAS}: alias of {source_words}, checked equal")
    report_notes.append(f"{', '.join(ENCODER_BUFFERS)}: memory rows and special tokens, read into the config")
    unmapped = []
    for key, value in state.items():
        if key in (source_words, EMBEDDING_ALIAS, *ENCODER_BUFFERS):
            continue
        if key.startswith(ENCODER_PREFIX):
            target = BACKBONE_PREFIX + key.removeprefix(ENCODER_PREFIX)
            mapped[target], source_of[target] = value, key
        else:
            unmapped.append(key)
    return model, mapped, source_of, unmapped, lambda key: ENCODER_PREFIX + key.removeprefix(BACKBONE_PREFIX)


def _decoder(state: dict, text_config: PreTrainedConfig, options: dict, layout: str, report_notes: list[str]) -> tuple:
    """(model, mapped weights, target -> source names, unmapped source keys) for an RMT or ARMT causal LM."""
    memory = state[DECODER_MEMORY]
    if memory.dim() != 2:
        raise ValueError(f"{DECODER_MEMORY} should be [num_mem_tokens, hidden], got shape {tuple(memory.shape)}.")
    m = _memory_count(memory.shape[0], options["num_mem_tokens"])
    if options["segment_size"] is None:
        raise ValueError("Decoder checkpoints do not record their segment size: pass segment_size / --segment-size "
                         "(the authors' GPT-2 BABILong checkpoints use 512).")  # fmt: skip
    extra: dict[str, Any] = {"memory_type": "rmt"}
    if layout == "armt":
        W_mq = next((v for k, v in state.items() if k.startswith(DECODER_PREFIX) and k.endswith(".W_mq.weight")), None)
        if W_mq is None:
            raise ValueError("The ARMT checkpoint has no memory_cell.model.<layers>.{i}.W_mq.weight.")
        W_mb = next((v for k, v in state.items() if k.startswith(DECODER_PREFIX) and k.endswith(".W_mb.weight")), None)
        heads, outputs = options["armt_num_heads"], W_mb.shape[0] if W_mb is not None else None
        if outputs is not None and outputs == text_config.hidden_size:
            raise ValueError(f"W_mb has {outputs} = hidden_size outputs: the gated ARMT variant, not supported.")
        if outputs is not None and heads not in (None, outputs):
            raise ValueError(f"W_mb has {outputs} outputs (one per memory head) but armt_num_heads={heads}.")
        heads = heads if heads is not None else outputs if outputs is not None else 1
        if options["config_kwargs"].get("armt_normalize_features") is None:
            raise ValueError(
                "An ARMT checkpoint does not record whether its code L2-normalised the key features phi(q), phi(k): "
                "the authors' code does from 2024-08-28 on (e.g. their Llama-3.2 runs); the ARMT paper's GPT-2 "
                "BABILong checkpoints predate it. Pass armt_normalize_features=True or False "
                "(--armt-normalize-features / --no-armt-normalize-features)."
            )
        extra = {"memory_type": "armt", "armt_d_mem": W_mq.shape[0], "armt_num_heads": heads}
        report_notes.append(f"armt_d_mem = {W_mq.shape[0]} from W_mq, armt_num_heads = {heads}; assumes the paper's "
                            "DPFP (nu = 3) and normaliser z, which state dicts do not record")  # fmt: skip
    pad = getattr(options["tokenizer"], "pad_token_id", None)
    pad = text_config.pad_token_id if pad is None else pad
    config = RMTConfig(text_config=text_config, num_mem_tokens=m, segment_size=options["segment_size"],
                       pad_token_id=pad, **{**extra, **options["config_kwargs"]})  # fmt: skip
    model = RMTForCausalLM(config)
    mapped, source_of, unmapped = {OUR_MEMORY: memory}, {OUR_MEMORY: DECODER_MEMORY}, []
    for key, value in state.items():
        if key.startswith(DECODER_PREFIX):
            target = BACKBONE_PREFIX + key.removeprefix(DECODER_PREFIX)
            mapped[target], source_of[target] = value, key
        elif key != DECODER_MEMORY:
            unmapped.append(key)

    def source_name(key: str) -> str:
        return DECODER_MEMORY if key == OUR_MEMORY else DECODER_PREFIX + key.removeprefix(BACKBONE_PREFIX)

    return model, mapped, source_of, unmapped, source_name


def convert_state_dict(
    state: Mapping[str, torch.Tensor],
    text_config: PreTrainedConfig,
    *,
    layout: str = "auto",
    num_mem_tokens: int | None = None,
    segment_size: int | None = None,
    armt_num_heads: int | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    lora_alpha: float | None = None,
    **config_kwargs: Any,
) -> tuple[RMTPreTrainedModel, ConversionReport]:
    """Build our model for an authors' state dict and load every weight with strict checking. The newer
    layouts (`conversion.authors_keys`) are read too; unmerged LoRA weights need `lora_alpha`.

    Raises ValueError naming any source key that maps to nothing and any weight the checkpoint lacks.
    """
    state, text_config, notes = dict(state), copy.deepcopy(text_config), []
    state = normalize_authors_keys(state, functools.cache(lambda: _meta_causal_lm(text_config)), lora_alpha, notes)
    detected = _detect(state)
    layout = detect_layout(state) if layout == "auto" else layout
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown layout {layout!r}; choose one of auto, {', '.join(LAYOUTS)}.")
    if tokenizer is not None and len(tokenizer) > text_config.vocab_size:  # padded embeddings are fine
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the {text_config.model_type} backbone's embeddings have "
            f"{text_config.vocab_size} rows (vocab_size of the --backbone config); pass the backbone's own tokenizer."
        )
    options = dict(num_mem_tokens=num_mem_tokens, segment_size=segment_size, armt_num_heads=armt_num_heads,
                   tokenizer=tokenizer, config_kwargs=config_kwargs)  # fmt: skip
    required = ("mem_token_ids",) if layout == "encoder" else (DECODER_MEMORY,)
    if any(key not in state for key in required) or (layout == "armt" and detected != "armt"):
        raise ValueError(f"The checkpoint is not in the {layout} layout ({LAYOUTS[layout]}); it looks like "
                         f"{detected or 'no known layout'}. Keys seen: {', '.join(list(state)[:12])}.")  # fmt: skip
    if layout == "encoder":
        model, mapped, source_of, unmapped, source_name = _encoder(state, text_config, options, notes)
    else:
        model, mapped, source_of, unmapped, source_name = _decoder(state, text_config, options, layout, notes)
    target = model.state_dict()
    for key in [key for key in mapped if key not in target]:
        value = mapped.pop(key)
        if not recomputed_buffer(model, key, value, source_of[key], notes):
            unmapped.append(source_of[key])
    if unmapped:
        hint = f" (the keys look like the {detected} layout)" if detected not in (None, layout) else ""
        raise ValueError(
            f"{len(unmapped)} checkpoint key(s) map to nothing in {type(model).__name__} ({layout} layout){hint}: "
            f"{', '.join(unmapped)}."
        )
    fill_tied(target, mapped, notes)
    missing = [key for key in target if key not in mapped]
    if missing:
        named = ", ".join(f"{source_name(key)} (for {key})" for key in missing)
        raise ValueError(f"The checkpoint lacks {len(missing)} weight(s) the model needs: {named}.")
    dtypes = {value.dtype for value in mapped.values() if value.is_floating_point()}
    if len(dtypes) == 1:  # keep the checkpoint's precision
        model.to(dtypes.pop())
    try:
        model.load_state_dict(mapped, strict=True)
    except RuntimeError as error:
        raise ValueError(f"The checkpoint's weights do not fit the --backbone config: {error}") from error
    config = model.config
    return model.eval(), ConversionReport(
        layout, type(model).__name__, config.num_mem_tokens, config.segment_size, notes
    )


def convert_authors_checkpoint(
    source: str | Path,
    output_dir: str | Path,
    *,
    backbone: str | Path | PreTrainedConfig | None = None,
    layout: str = "auto",
    tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
    **kwargs: Any,
) -> tuple[RMTPreTrainedModel, ConversionReport]:
    """Convert `source` and save config (with auto_map), code, safetensors and the tokenizer to `output_dir`.

    A config.json beside the weights (InnerLoopARMT's, or the RecurrentWrapper's arguments) supplies the settings
    it records, and InnerLoopARMT's the backbone; `backbone` is needed otherwise. The tokenizer is `tokenizer` if
    given, else the backbone folder's own if it has one, else none.
    """
    output_dir = Path(output_dir)
    refuse_non_empty(output_dir)
    state = load_authors_checkpoint(source)
    found, found_backbone, note = source_config(source, backbone_given=backbone is not None)
    kwargs = merged_settings(kwargs, found)
    if backbone is None and found_backbone is None:
        raise ValueError("The checkpoint does not record its backbone: pass backbone / --backbone (an AutoConfig id "
                         "or folder, or a model folder).")  # fmt: skip
    if backbone is None:
        text_config = found_backbone
    else:
        text_config = backbone if isinstance(backbone, PreTrainedConfig) else AutoConfig.from_pretrained(str(backbone))
    if tokenizer is None and isinstance(backbone, (str, Path)) and Path(backbone).is_dir():
        if any((Path(backbone) / name).is_file() for name in TOKENIZER_FILES):
            tokenizer = backbone
    if isinstance(tokenizer, (str, Path)):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    model, report = convert_state_dict(state, text_config, layout=layout, tokenizer=tokenizer, **kwargs)
    if note:
        report.notes.insert(0, note)

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        if tokenizer is not None:
            long_document_tokenizer(tokenizer).save_pretrained(folder)

    report.output_dir = write_new_folder(output_dir, write)
    if tokenizer is not None:
        report.notes.append(f"tokenizer saved ({len(tokenizer)} tokens)")
    return model, report


# ----- the other direction ------------------------------------------------------------------------


def to_authors_layout(model: RMTPreTrainedModel) -> dict[str, torch.Tensor]:
    """Our model's weights in the authors' key layout (tensors share storage with the model): encoder RMT
    classifiers as a trainer checkpoint's `model_state_dict`, RMT / ARMT causal LMs as `memory_cell.*`."""
    state = dict(model.state_dict())
    memory = state.pop(OUR_MEMORY)
    if isinstance(model, RMTForCausalLM):
        exported = {DECODER_PREFIX + k.removeprefix(BACKBONE_PREFIX): v for k, v in state.items()}
        return {DECODER_MEMORY: memory, **exported}
    if not isinstance(model, RMTForSequenceClassification) or model.config.memory_type != "rmt":
        raise ValueError(
            f"The authors released no {model.config.memory_type} {type(model).__name__} layout to export to."
        )
    words_key = _input_embedding_key(model)
    words = state.pop(words_key)
    words = torch.cat([words, memory.to(words.dtype)])
    vocab, m = model.config.text_config.vocab_size, model.config.num_mem_tokens
    exported = {ENCODER_PREFIX + k.removeprefix(BACKBONE_PREFIX): v for k, v in state.items()}
    exported[ENCODER_PREFIX + words_key.removeprefix(BACKBONE_PREFIX)] = words
    exported[EMBEDDING_ALIAS] = words
    exported["mem_token_ids"] = torch.arange(vocab, vocab + m)
    exported["cls_token"] = torch.tensor([model.config.cls_token_id])
    exported["sep_token"] = torch.tensor([model.config.sep_token_id])
    return exported


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="the authors' checkpoint file (model_best.pth, pytorch_model.bin, "
                        "model.safetensors, or a sharded checkpoint's *.index.json) or its folder")  # fmt: skip
    parser.add_argument("output_dir")
    parser.add_argument("--layout", choices=["auto", *LAYOUTS], default="auto")
    parser.add_argument("--backbone", default=None, help="the backbone's AutoConfig id or folder, or a model "
                        "folder (not needed where the checkpoint's config.json holds it: InnerLoopARMT's)")  # fmt: skip
    parser.add_argument("--tokenizer", default=None, help="tokenizer id or folder (default: the backbone folder's)")
    parser.add_argument("--num-mem-tokens", type=count(1), default=None, help="checked against the checkpoint")
    parser.add_argument(
        "--segment-size", type=count(1), default=None, help="required for decoders (authors' GPT-2: 512)"
    )
    parser.add_argument("--armt-num-heads", type=count(1), default=None, help="default: W_mb's outputs")
    parser.add_argument("--armt-correction", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--armt-normalize-features", action=argparse.BooleanOptionalAction, default=None,
                        help="ARMT: whether the checkpoint's code L2-normalised phi(q), phi(k) (the authors' code "
                        "from 2024-08-28 on: yes; the paper's GPT-2 checkpoints: no); required for ARMT")  # fmt: skip
    parser.add_argument("--max-n-segments", type=count(1), default=None)
    parser.add_argument("--lora-alpha", type=float, default=None, help="LoRA's alpha, for a checkpoint holding "
                        "unmerged LoRA weights (merged: W + alpha / r * B A; the authors' runs: 32)")  # fmt: skip
    args = parser.parse_args(argv)
    kwargs: dict[str, Any] = dict(num_mem_tokens=args.num_mem_tokens, segment_size=args.segment_size,
                                  armt_num_heads=args.armt_num_heads, max_n_segments=args.max_n_segments,
                                  lora_alpha=args.lora_alpha)  # fmt: skip
    kwargs.update({} if args.armt_correction else {"armt_correction": False})
    if args.armt_normalize_features is not None:
        kwargs["armt_normalize_features"] = args.armt_normalize_features
    _, report = run_or_exit(
        parser, convert_authors_checkpoint, args.source, args.output_dir, backbone=args.backbone, layout=args.layout,
        tokenizer=args.tokenizer, **kwargs,
    )  # fmt: skip
    print(report)


if __name__ == "__main__":
    main()
