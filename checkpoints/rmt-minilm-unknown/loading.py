"""Loading checkpoints safely: the backbone of a BERT run as a decoder, the layer layout of either memory type,
and the export id that tells a folder replaced while it was being loaded (`conversion.export --overwrite`)."""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import torch
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoModel, AutoModelForCausalLM, PreTrainedModel
from transformers.utils import cached_file


def safetensors_header(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (tensor entries and `__metadata__`) and the offset its tensor data starts at."""
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(size)), 8 + size


def checkpoint_keys(name: str | os.PathLike, source_kwargs: dict[str, Any]) -> set[str] | None:
    """The weight names of a safetensors checkpoint (a folder or a cached Hub id), read from its header or
    shard index; None where that cannot be told (only a .bin file, or nothing found)."""
    source = {key: source_kwargs[key] for key in ("revision", "cache_dir", "local_files_only", "token", "subfolder")
              if key in source_kwargs}  # fmt: skip
    for filename in ("model.safetensors", "model.safetensors.index.json"):
        try:
            path = cached_file(name, filename, _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False, **source)  # fmt: skip
        except OSError:
            return None
        if path is None:
            continue
        if filename.endswith(".json"):
            with open(path) as handle:
                return set(json.load(handle)["weight_map"])
        return set(safetensors_header(path)[0]) - {"__metadata__"}
    return None


def bert_as_decoder(name: str | os.PathLike, backbone_kwargs: dict[str, Any]) -> PreTrainedModel:
    """A BERT checkpoint as a decoder (`BertLMHeadModel`, `is_decoder=True`). One with a masked-LM head
    (`cls.predictions.*`) loads whole. One without (a sentence-transformers encoder such as all-MiniLM-L6-v2)
    loads as a `BertModel`, under a new LM head built here: its decoder is tied to the word embeddings, its
    bias is zero and its transform is initialised as transformers initialises new weights. Nothing is then
    missing from the checkpoint, so transformers reports nothing."""
    keys = checkpoint_keys(name, backbone_kwargs)
    if keys is None or any(key.startswith("cls.") for key in keys):  # it has its head (or cannot be read)
        return AutoModelForCausalLM.from_pretrained(name, **backbone_kwargs)
    has_pooler = any(key.startswith(("pooler.", "bert.pooler.")) for key in keys)
    encoder = AutoModel.from_pretrained(name, add_pooling_layer=has_pooler, **backbone_kwargs)
    decoder_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(encoder.config)]
    decoder = decoder_class(encoder.config)  # the same config object, as from_pretrained shares it
    encoder.pooler = None  # a decoder's BERT has none
    setattr(decoder, decoder.base_model_prefix, encoder)
    decoder.tie_weights()
    head = decoder.get_output_embeddings()
    if head.weight is not encoder.get_input_embeddings().weight:
        raise RuntimeError(f"{decoder_class.__name__}'s LM head did not tie to the word embeddings.")
    with torch.no_grad():
        head.bias.zero_()
    return decoder.to(device=encoder.device, dtype=encoder.dtype)


def local_export(name: Any, subfolder: str = "") -> tuple[str, str | None]:
    """(folder, the export id its config.json records) for a local folder; ("", None) for anything else."""
    if not isinstance(name, (str, os.PathLike)):
        return "", None
    folder = os.path.join(os.fspath(name), subfolder) if subfolder else os.fspath(name)
    try:
        with open(os.path.join(folder, "config.json")) as handle:
            return folder, json.load(handle).get("export_id")
    except (OSError, ValueError, AttributeError):
        return folder, None


def check_export_id(folder: str, expected: str | None) -> None:
    """ValueError when a local folder's weights carry another export id than the config loaded from it: the
    folder was replaced (`conversion.export --overwrite`) while loading, and the model would mix two exports.
    Weights without an id (saved by `save_pretrained`) are not compared."""
    if expected is None or not os.path.isdir(folder):
        return
    for filename in sorted(os.listdir(folder)):
        if not filename.endswith(".safetensors"):
            continue
        try:
            found = (safetensors_header(os.path.join(folder, filename))[0].get("__metadata__") or {}).get("export_id")
        except (OSError, ValueError, struct.error, AttributeError):  # unreadable: transformers has said so already
            continue
        if found is not None and found != expected:
            raise ValueError(
                f"{folder} was replaced while it was being loaded: its config.json is of export {expected} but "
                f"{filename} of export {found}, so the model would mix two exports. Load it again."
            )


def _unwrapped(key: str) -> str:
    """A weight's key with ARMT's layer wrapper (`<layers>.<i>.layer.`) taken out."""
    parts = key.split(".")
    return ".".join(part for i, part in enumerate(parts) if not (part == "layer" and i > 0 and parts[i - 1].isdigit()))


def check_layer_layout(missing: Any, unexpected: Any, model_class: str) -> None:
    """Raise ValueError when a checkpoint's backbone layers were saved under the other memory type's layout
    (ARMT wraps every layer): loading would leave those layers randomly initialised."""
    moved = {_unwrapped(key) for key in missing} & {_unwrapped(key) for key in unexpected}
    if moved:
        raise ValueError(
            f"{len(moved)} backbone weights (e.g. {min(moved)}) are saved under the other memory type's layer layout: "
            "the checkpoint was saved with another memory_type than this model's, and loading would leave the "
            "backbone's layers randomly initialised. Load it with its own memory_type; to put a new memory on its "
            f"backbone, use `{model_class}.from_backbone(model.backbone, tokenizer=..., memory_type=...)` "
            "(or train with `--init-from CHECKPOINT --new-memory`)."
        )
