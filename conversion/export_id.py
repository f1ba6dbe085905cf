"""The export id: recorded in an export's config.json and in its weight files' metadata, it lets
`RMTPreTrainedModel.from_pretrained` refuse a folder replaced while it was being loaded (config of one export,
weights of another). See `conversion.export_folder` for how exports replace each other."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import uuid
from pathlib import Path

from conversion.export_folder import read_marker, sha256
from modeling_rmt.loading import safetensors_header


def stamp_safetensors(path: Path, metadata: dict[str, str]) -> None:
    """Add `metadata` to a safetensors file's header (`__metadata__`), rewriting the file beside itself."""
    header, data_start = safetensors_header(path)
    with open(path, "rb") as source:
        source.seek(data_start)
        header["__metadata__"] = {**(header.get("__metadata__") or {}), **metadata}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the tensor data 8-byte aligned, as safetensors writes it
        stamped = path.with_name(path.name + ".stamping")
        with open(stamped, "wb") as target:
            target.write(struct.pack("<Q", len(raw)) + raw)
            shutil.copyfileobj(source, target, 1 << 24)
    os.replace(stamped, path)


def content_digest(folder: Path) -> str:
    """SHA-256 of what a loader combines, config.json and the weights, before `record_export_id`."""
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for path in sorted(folder.glob("model*.safetensors")):
        digest.update(path.name.encode() + sha256(path).encode())
    return digest.hexdigest()


def new_export_id(out_dir: Path, content: str) -> str:
    """The id of an export of `content` into `out_dir`: the earlier export's where that has the same content (a
    re-export then changes no byte), else a fresh UUID. Never an id an export of other content had in `out_dir`,
    so that a loader can tell config and weights of different exports apart (`check_export_id`)."""
    earlier = read_marker(out_dir) if out_dir.is_dir() else None
    if earlier and earlier.get("content_sha256") == content and isinstance(earlier.get("export_id"), str):
        return earlier["export_id"]
    return str(uuid.uuid4())


def record_export_id(folder: Path, export_id: str) -> None:
    """Write `export_id` into config.json (formatted as transformers writes it) and every weight file's metadata."""
    values = json.loads((folder / "config.json").read_text())
    values["export_id"] = export_id
    (folder / "config.json").write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    for path in sorted(folder.glob("model*.safetensors")):
        stamp_safetensors(path, {"export_id": export_id})
