"""Build the Hub folder of a trained or converted RMT checkpoint, and optionally upload it.

    python -m conversion.export runs/rmt-minilm/final ./hub/rmt-minilm --card model_cards/rmt-minilm.md \\
        --dtype float16 --repo-id org/rmt-minilm --dry-run

The folder gets exactly what the Hub repo needs: `config.json` (with `auto_map`), the current model
code copied from the installed `modeling_rmt` package (`HUB_FILES`), safetensors weights (cast to
`--dtype` if given), the tokenizer (accepting whole documents), `README.md` (the `--card`, with the
images it links beside it, or a minimal card), `card_results.json` (the results JSON the card was
generated from, `model_cards/NAME.json` beside `--card NAME.md`, where there is one: measured accuracy and the
training recipe, machine-readable; a run started `--init-from` this folder takes its recipe from there) and,
for causal LMs, `generation_config.json`. Optimizer and scheduler states, rng states, training arguments and
logs are left behind.

An existing non-empty OUT_DIR is refused; `--overwrite` replaces it only when it holds an earlier
export (recognised by the `.rmt-export.json` marker every export writes, which is never uploaded), and then
removes only the files that export wrote: files you added are kept (carried into the new folder, and never
uploaded), a file you edited stops the export unless `--replace-edited`, and the folder is swapped in
atomically, so that an interrupted export leaves the old export or the new one, whole (`conversion.export_folder`
explains how, and how the next run cleans up). `--upload` creates the repo if needed
(`HfApi().create_repo(exist_ok=True)`) and uploads the export's own files; `--dry-run` builds the export in a
temporary folder and prints what would be uploaded, and where, without any network call or change to OUT_DIR.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import glob
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from huggingface_hub import HfApi
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

import modeling_rmt
from conversion.export_card import CARD_RESULTS, copy_card, minimal_card
from conversion.export_folder import (
    EXPORT_MARKER,
    Earlier,
    ExportError,
    export_files,
    export_lock,
    journal_path,
    new_staging,
    publish,
    read_earlier,
    recover,
    write_marker,
)
from conversion.export_id import content_digest, new_export_id, record_export_id
from conversion.from_backbone import long_document_tokenizer, make_like_a_new_folder
from rmt_tools.tokens import with_generation_tokens

# The flat files of `modeling_rmt/` that go to the Hub (the remote code); the one list of them.
HUB_FILES: tuple[str, ...] = (
    "configuration_rmt.py",
    "modeling_rmt.py",
    "pretrained.py",
    "outputs.py",
    "memory.py",
    "associative.py",
    "layout.py",
    "segmenting.py",
    "generation.py",
    "generation_cache.py",
    "diagonal.py",
    "grouping.py",
    "loading.py",
)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "*.model")
# Every name an export may write (an earlier export without file hashes: the names `--overwrite` replaces).
EXPORT_PATTERNS = (
    "config.json", "generation_config.json", "README.md", *HUB_FILES, "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*",
    "merges.txt", "*.model", "chat_template.*", "*.png", "*.jpg", "*.jpeg", "*.svg", "*.gif", CARD_RESULTS,
    EXPORT_MARKER,
)  # fmt: skip


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _foreign_files(folder: Path) -> list[str]:
    """Entries of `folder` that an export never writes."""
    return sorted(p.name for p in folder.iterdir() if not p.is_file() or not _matches(p.name, EXPORT_PATTERNS))


def _check_checkpoint(checkpoint: Path, tokenizer_source: Path) -> None:
    """Refuse a folder without config, weights or tokenizer files before loading anything."""
    if not checkpoint.is_dir():
        raise ExportError(f"checkpoint folder {checkpoint} does not exist")
    if not (checkpoint / "config.json").is_file():
        raise ExportError(f"{checkpoint} has no config.json: it is not a saved model folder")
    if not any((checkpoint / name).is_file() for name in WEIGHT_FILES):
        raise ExportError(f"{checkpoint} has no weights (expected one of {', '.join(WEIGHT_FILES)})")
    if not tokenizer_source.is_dir() or not any(
        _matches(p.name, TOKENIZER_MARKERS) for p in tokenizer_source.iterdir() if p.is_file()
    ):
        hint = "" if tokenizer_source != checkpoint else "; pass --tokenizer FOLDER (e.g. the backbone's)"
        raise ExportError(f"{tokenizer_source} has no tokenizer files (tokenizer.json, tokenizer_config.json){hint}")


def _check_path(out_dir: Path, checkpoint: Path) -> None:
    resolved, source = out_dir.resolve(), checkpoint.resolve()
    if resolved == source or source in resolved.parents or resolved in source.parents:
        raise ExportError(f"output folder {out_dir} must lie outside the checkpoint folder {checkpoint}")
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise ExportError(f"output path {out_dir} exists and is not a folder (a link or a file): give a folder's path")


def check_output(out_dir: Path, checkpoint: Path, overwrite: bool, replace_edited: bool = False) -> Earlier | None:
    """Refuse to write over anything but an empty folder or, with `overwrite`, an earlier export whose files
    are as it wrote them (or `replace_edited`); returns that earlier export. Reads only."""
    _check_path(out_dir, checkpoint)
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return None
    if not overwrite:
        raise ExportError(f"output folder {out_dir} is not empty; choose another (or --overwrite an earlier export)")
    return read_earlier(out_dir, EXPORT_PATTERNS, replace_edited)


def _drop_local_loading_options(tokenizer_config: Path) -> None:
    """Loading options of this machine that transformers writes into tokenizer_config.json
    (`local_files_only`, `is_local`); they describe how it was loaded here, not the tokenizer."""
    if tokenizer_config.is_file():
        values = json.loads(tokenizer_config.read_text())
        dropped = [values.pop(key) for key in ("local_files_only", "is_local") if key in values]
        if dropped:
            tokenizer_config.write_text(json.dumps(values, indent=2, ensure_ascii=False) + "\n")


def _load_model(checkpoint: Path):
    """The checkpoint's model through the installed classes, refusing missing or unexpected weights."""
    config = AutoConfig.from_pretrained(checkpoint)
    if config.model_type != "rmt":
        raise ExportError(f"{checkpoint} holds a {config.model_type!r} model, not RMT; convert it first")
    architecture = (config.architectures or ["RMTForSequenceClassification"])[0]
    model_class = getattr(modeling_rmt, architecture, None)
    if model_class is None:
        raise ExportError(f"{checkpoint}: unknown RMT architecture {architecture!r}")
    model, info = model_class.from_pretrained(checkpoint, dtype="auto", output_loading_info=True)
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise ExportError(f"{checkpoint}: weights do not match the config: {problems}")
    return model.eval()


def _load_tokenizer(source: Path, model) -> PreTrainedTokenizerBase:
    """The tokenizer, checked against the model's special tokens and vocabulary; a decoder's names the tokens
    its generation config ends and pads with (`with_generation_tokens`)."""
    config = model.config
    try:
        tokenizer = long_document_tokenizer(AutoTokenizer.from_pretrained(source))
        if model.can_generate():
            generation = model.generation_config
            with_generation_tokens(tokenizer, generation.eos_token_id, generation.pad_token_id)
    except (OSError, ValueError, KeyError) as error:
        raise ExportError(f"cannot load the tokenizer of {source}: {error}") from error
    for name in ("cls_token_id", "sep_token_id"):
        expected, found = getattr(config, name, None), getattr(tokenizer, name, None)
        if expected is not None and found is not None and expected != found:
            raise ExportError(f"tokenizer of {source} has {name}={found}, the model expects {expected}")
    vocab_size = getattr(config.text_config, "vocab_size", None)
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ExportError(f"tokenizer of {source} has {len(tokenizer)} tokens, the model embeds {vocab_size}")
    return tokenizer


def _check_code(folder: Path) -> None:
    """`auto_map` names classes of the code files, and the code files import only each other."""
    auto_map = json.loads((folder / "config.json").read_text()).get("auto_map") or {}
    if not auto_map:
        raise ExportError("the saved config.json has no auto_map: the model would not load as remote code")
    for auto_class, reference in auto_map.items():
        module, _, class_name = reference.rpartition(".")
        source = folder / f"{module}.py"
        if f"{module}.py" not in HUB_FILES or f"class {class_name}(" not in source.read_text():
            raise ExportError(f"auto_map {auto_class} -> {reference} does not point to a class of {HUB_FILES}")
    for name in HUB_FILES:
        for node in ast.walk(ast.parse((folder / name).read_text())):
            if isinstance(node, ast.ImportFrom) and node.level and f"{node.module}.py" not in HUB_FILES:
                raise ExportError(f"{name} imports .{node.module}, which is not in HUB_FILES; update the list")


def _check_weights(folder: Path, dtype: torch.dtype | None) -> None:
    """Every floating tensor of the saved weights has `dtype`, and the config says so."""
    if dtype is None:
        return
    expected = SAFETENSORS_DTYPES[dtype]
    for weights in folder.glob("model*.safetensors"):
        with safe_open(weights, framework="pt") as f:
            wrong = [k for k in f.keys() if f.get_slice(k).get_dtype() in ("F16", "BF16", "F32", "F64")]
            wrong = [k for k in wrong if f.get_slice(k).get_dtype() != expected]
        if wrong:
            raise ExportError(f"{weights.name}: {wrong[:3]} are not {dtype} after casting")
    if json.loads((folder / "config.json").read_text()).get("dtype") != str(dtype).removeprefix("torch."):
        raise ExportError(f"the saved config does not record dtype {dtype}")


def export_checkpoint(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    *,
    card: str | Path | None = None,
    dtype: str | None = None,
    repo_id: str | None = None,
    overwrite: bool = False,
    tokenizer: str | Path | None = None,
    replace_edited: bool = False,
) -> Path:
    """Write the Hub folder of `checkpoint_dir` to `out_dir` (see the module docstring); returns `out_dir`.

    `dtype` ("float16", "bfloat16", "float32") casts every floating weight, memory included; `tokenizer`
    takes the tokenizer from another folder when the checkpoint has none; `repo_id` names the model in the
    minimal card; `replace_edited` lets `overwrite` replace files of the earlier export edited since. The folder
    is built beside `out_dir` and swapped in only once complete (`conversion.export_folder`).
    """
    checkpoint, given, out_dir = Path(checkpoint_dir), out_dir, Path(os.path.abspath(out_dir))
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    tokenizer_source = Path(tokenizer) if tokenizer is not None else checkpoint
    _check_checkpoint(checkpoint, tokenizer_source)
    _check_path(out_dir, checkpoint)
    if card is not None and not Path(card).is_file():
        raise ExportError(f"model card {card} does not exist")
    with export_lock(out_dir):
        recover(out_dir)
        earlier = check_output(out_dir, checkpoint, overwrite, replace_edited)
        model = _load_model(checkpoint)
        loaded_tokenizer = _load_tokenizer(tokenizer_source, model)
        target = DTYPES[dtype] if dtype is not None else None
        if target is not None:
            model = model.to(target)  # every floating parameter and buffer: backbone, memory, head alike
            for key in model.config.sub_configs:  # save_pretrained records the new dtype at the top level only
                if getattr(model.config, key, None) is not None:
                    getattr(model.config, key).dtype = target
        if hasattr(model.config, "export_id"):  # the checkpoint is itself an export: the new one gets its own id
            del model.config.export_id
        staging = new_staging(out_dir)
        try:
            model.save_pretrained(staging)
            package = Path(modeling_rmt.__file__).parent
            for name in HUB_FILES:  # the package's current code, whatever save_pretrained picked up
                shutil.copyfile(package / name, staging / name)
            loaded_tokenizer.save_pretrained(staging)
            _drop_local_loading_options(staging / "tokenizer_config.json")
            if card is not None:
                copy_card(Path(card), staging)
            else:
                architecture = model.config.architectures[0]
                (staging / "README.md").write_text(minimal_card(repo_id or f"ORG/{out_dir.name}", architecture))
            unexpected = _foreign_files(staging)
            if unexpected or {p.name for p in staging.glob("*.py")} != set(HUB_FILES):
                found = unexpected or sorted(staging.glob("*.py"))
                raise ExportError(f"the export would hold unexpected files: {found}")
            content = content_digest(staging)
            export_id = new_export_id(out_dir, content)
            record_export_id(staging, export_id)
            _check_code(staging)
            _check_weights(staging, target)
            write_marker(staging, export_id, content)
            make_like_a_new_folder(staging)
            publish(staging, out_dir, earlier)
        except BaseException:
            if not journal_path(out_dir).exists():  # else the swap began: the next run finishes it
                shutil.rmtree(staging, ignore_errors=True)
            raise
    if earlier is not None and earlier.kept:
        print(f"kept your files in {out_dir}: {', '.join(earlier.kept)} (not written by the earlier export)")
    return Path(given)


def folder_files(folder: str | Path) -> list[tuple[str, int]]:
    """(name, size in bytes) of the export's own files in `folder`, sorted by name: those its marker lists
    (for an export whose marker has no list: every file under `folder` but the marker)."""
    folder = Path(folder)
    names = export_files(folder)
    if names is None:
        return sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*")
                      if p.is_file() and p.name != EXPORT_MARKER)  # fmt: skip
    return [(name, (folder / name).stat().st_size) for name in names]


def kept_files(folder: str | Path) -> list[str]:
    """Entries of the export folder `folder` that the export did not write: the user's, kept and not uploaded."""
    folder, names = Path(folder), export_files(Path(folder))
    if names is None:
        return []
    return sorted(p.name for p in folder.iterdir() if p.name not in names and p.name != EXPORT_MARKER)


def print_summary(folder: str | Path, title: str) -> None:
    """Print `title`, then every file of the export in `folder` with its size, the total and the user's files."""
    files = folder_files(folder)
    print(title)
    for name, size in files:
        print(f"  {size / 1e6:10.3f} MB  {name}")
    print(f"  {len(files)} files, {sum(size for _, size in files) / 1e6:.3f} MB in total")
    if kept := kept_files(folder):
        print(f"  kept beside them (yours: not uploaded): {', '.join(kept)}")


def upload_export(folder: str | Path, repo_id: str, *, private: bool = False, dry_run: bool = False) -> str | None:
    """Create `repo_id` if needed and upload the export's own files in `folder` (never the user's files kept
    there, nor the marker); with `dry_run` only print what would be sent."""
    visibility = "private" if private else "public"
    if dry_run:
        print_summary(folder, f"dry run: would upload to https://huggingface.co/{repo_id} ({visibility} model repo):")
        return None
    api = HfApi()
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    message = "Upload RMT model (conversion.export)"
    allow = [glob.escape(name) for name, _ in folder_files(folder)]
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message=message,
                      allow_patterns=allow, ignore_patterns=[EXPORT_MARKER])  # fmt: skip
    print(f"uploaded {folder} to {url}")
    return str(url)


def dry_run(args: argparse.Namespace) -> None:
    """Build the export in a temporary folder and print what `--upload` would send; OUT_DIR is only read."""
    out_dir = Path(os.path.abspath(args.out_dir))
    earlier = check_output(out_dir, Path(args.checkpoint_dir), args.overwrite, args.replace_edited)
    with tempfile.TemporaryDirectory() as temporary:
        preview = export_checkpoint(
            args.checkpoint_dir, Path(temporary) / (out_dir.name or "export"), card=args.card, dtype=args.dtype,
            repo_id=args.repo_id, tokenizer=args.tokenizer,
        )  # fmt: skip
        upload_export(preview, args.repo_id, private=args.private, dry_run=True)
    if earlier is not None:
        kept = f"; yours would be kept: {', '.join(earlier.kept)}" if earlier.kept else ""
        print(f"{args.out_dir} was left as it is; the export would replace the earlier export there{kept}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint_dir", help="a saved RMT model folder (Trainer checkpoint, final/ or from_backbone)")
    parser.add_argument("out_dir", help="the Hub folder to create (must not exist or be empty)")
    parser.add_argument("--card", help="model card markdown to ship as README.md (model_cards/NAME.md)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="cast the floating weights (default: as saved)")
    parser.add_argument("--tokenizer", help="take the tokenizer from this folder (default: the checkpoint's)")
    parser.add_argument("--repo-id", help="target Hub repo, org/name (needed by --upload and --dry-run)")
    parser.add_argument("--upload", action="store_true", help="upload the folder to --repo-id")
    parser.add_argument("--dry-run", action="store_true", help="print what --upload would send; no network")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUT_DIR (only the "
                        "files it wrote: yours are kept)")  # fmt: skip
    parser.add_argument(
        "--replace-edited",
        action="store_true",
        help="with --overwrite: replace the earlier "
        "export's files even where they were edited since (or their edits cannot be checked)",
    )
    args = parser.parse_args(argv)
    if (args.upload or args.dry_run) and not args.repo_id:
        parser.error("--upload and --dry-run need --repo-id org/name")
    if args.private and not (args.upload or args.dry_run):
        parser.error("--private only applies with --upload or --dry-run")
    if args.repo_id:
        try:
            validate_repo_id(args.repo_id)
        except HFValidationError as error:
            parser.error(f"--repo-id: {error}")
    if args.replace_edited and not args.overwrite:
        parser.error("--replace-edited goes with --overwrite")
    try:
        if args.dry_run:
            dry_run(args)
            return
        out = export_checkpoint(
            args.checkpoint_dir, args.out_dir, card=args.card, dtype=args.dtype, repo_id=args.repo_id,
            overwrite=args.overwrite, tokenizer=args.tokenizer, replace_edited=args.replace_edited,
        )  # fmt: skip
    except ExportError as error:
        sys.exit(f"error: {error}")
    print_summary(out, f"exported {args.checkpoint_dir} to {out}:")
    if args.upload:
        upload_export(out, args.repo_id, private=args.private)


if __name__ == "__main__":
    main()
