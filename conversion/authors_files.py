"""Reading the authors' checkpoint files safely (used by `conversion.from_authors`): files torch.save wrote, opened
with `torch.load(weights_only=True)`, which never runs code from the file; safetensors files; and checkpoints
sharded over several such files with an index (`model.safetensors.index.json`, `pytorch_model.bin.index.json`),
each shard holding exactly the weights the index names for it."""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

CHECKPOINT_FILES = ("model_best.pth", "pytorch_model.bin", "model.safetensors", "model.safetensors.index.json",
                    "pytorch_model.bin.index.json")  # fmt: skip
# torch.save's legacy (non-zip) files open with this number, pickled (torch.serialization.MAGIC_NUMBER).
TORCH_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint holds Python objects besides tensors and plain containers; it is not unpickled."""


class NotACheckpointError(ValueError):
    """The file is not one torch.save writes (or it is damaged), so it holds no checkpoint to convert."""


def torch_file_kind(path: Path) -> str | None:
    """None for a file torch.save writes (a zip archive holding `<name>/data.pkl`, or the legacy pickle stream
    opening with torch's magic number); otherwise what the file is instead."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
            return (
                None if any(n.count("/") == 1 and n.endswith("/data.pkl") for n in names) else "a zip without data.pkl"
            )
    except zipfile.BadZipFile:
        return "a damaged zip archive"
    with open(path, "rb") as handle:
        head = handle.read(64)
    if head[:1] == b"\x80":  # a pickle
        return None if TORCH_LEGACY_MAGIC in head else "a pickle that torch.save did not write"
    if head[:2] == b"PK":
        return "a truncated or damaged zip archive"
    return "an empty file" if not head else "neither a zip archive nor a pickle (text, or another format)"


def load_authors_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of an authors' checkpoint file (or a folder holding one), opened with
    `torch.load(weights_only=True)`; a trainer checkpoint's `model_state_dict` is taken, its other entries
    (optimizer, scheduler, ...) are ignored."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in CHECKPOINT_FILES if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(f"{path} holds none of {', '.join(CHECKPOINT_FILES)}; pass the checkpoint file.")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass the authors' checkpoint file or its folder.")
    if path.name.endswith(".index.json"):
        return _sharded(path)
    if path.suffix == ".safetensors":
        return _safetensors(path)
    return _torch_file(path)


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The file's weights, with the names `safetensors.torch.save_model` dropped as duplicates of another
    (tied embeddings, a layer list registered twice): it records each in the header as {dropped: kept}."""
    try:
        state = load_file(path, device="cpu")
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as error:  # a damaged or truncated file: say so, with safetensors' words
        raise NotACheckpointError(f"{path} is not a readable safetensors file: safetensors said: {error}") from error
    shared = {dropped: kept for dropped, kept in metadata.items() if dropped not in state and kept in state}
    return {**state, **{dropped: state[kept] for dropped, kept in shared.items()}}


def _sharded(index_path: Path) -> dict[str, torch.Tensor]:
    """The weights of every shard an index names, each shard holding exactly the weights mapped to it."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise NotACheckpointError(f"{index_path} is not a checkpoint index (JSON, a weight_map): {error}") from error
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        named = {key for key, file in weight_map.items() if file == shard}
        shard_path = index_path.parent / shard
        if Path(shard).name != shard or not shard_path.is_file():
            raise FileNotFoundError(f"{index_path} names the shard {shard!r}, which is not a file beside it.")
        weights = _safetensors(shard_path) if shard_path.suffix == ".safetensors" else _torch_file(shard_path)
        if weights.keys() != named:
            missing, extra = sorted(named - weights.keys()), sorted(weights.keys() - named)
            raise ValueError(
                f"The shard {shard} does not hold what {index_path.name} maps to it: missing {missing[:5]}, not in "
                f"the index {extra[:5]}. The checkpoint is incomplete or mixed up; download it again."
            )
        state.update(weights)
    return state


def _torch_file(path: Path) -> dict[str, torch.Tensor]:
    kind = torch_file_kind(path)
    if kind is not None:
        raise NotACheckpointError(
            f"{path} is not a PyTorch checkpoint (a file torch.save wrote): it is {kind}. Pass the authors' "
            f"checkpoint file ({' or '.join(CHECKPOINT_FILES)}) or its folder."
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"{path} holds Python objects other than tensors and plain containers, so it was not loaded: "
            "checkpoints are opened only with torch.load(weights_only=True), which never runs code from the file. "
            "If you trust the file, re-save just its weights (torch.save(state_dict, 'weights.pth')) and convert "
            f"that. torch reported: {error}"
        ) from error
    except (RuntimeError, EOFError, KeyError, ValueError) as error:  # a truncated or damaged torch file
        raise NotACheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated or damaged?): torch reported: {error}"
        ) from error
    if isinstance(loaded, dict) and isinstance(loaded.get("model_state_dict"), Mapping):
        loaded = loaded["model_state_dict"]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        seen = list(loaded)[:12] if isinstance(loaded, Mapping) else type(loaded).__name__
        raise ValueError(f"{path} is neither a state dict nor a trainer checkpoint with 'model_state_dict': {seen}")
    return dict(loaded)
