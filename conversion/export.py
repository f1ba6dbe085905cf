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
export (recognised by the `.rmt-export.json` marker every export writes, which is never uploaded) and
nothing else. `--upload` creates the repo if needed (`HfApi().create_repo(exist_ok=True)`)
and uploads the folder; `--dry-run` prints what would be uploaded, and where, without any network call.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import json
import re
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
from conversion.from_backbone import long_document_tokenizer, make_like_a_new_folder

# The flat files of `modeling_rmt/` that go to the Hub (the remote code); the one list of them.
HUB_FILES: tuple[str, ...] = (
    "configuration_rmt.py",
    "modeling_rmt.py",
    "pretrained.py",
    "outputs.py",
    "memory.py",
    "segmenting.py",
    "generation.py",
    "diagonal.py",
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
# Written into every export: what `--overwrite` requires before it replaces a folder. Not uploaded.
EXPORT_MARKER = ".rmt-export.json"
# The results JSON a card was generated from, shipped beside it (`model_cards/NAME.json` for `NAME.md`).
CARD_RESULTS = "card_results.json"
# Every name an export may hold: what `--overwrite` accepts to replace, and all an export writes.
EXPORT_PATTERNS = (
    "config.json", "generation_config.json", "README.md", *HUB_FILES, "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*",
    "merges.txt", "*.model", "chat_template.*", "*.png", "*.jpg", "*.jpeg", "*.svg", "*.gif", CARD_RESULTS,
    EXPORT_MARKER,
)  # fmt: skip
IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
PIPELINE_TAGS = {"RMTForSequenceClassification": "text-classification", "RMTForCausalLM": "text-generation"}


class ExportError(ValueError):
    """The checkpoint or the output folder cannot be exported safely; the message says why."""


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


def _check_output(out_dir: Path, checkpoint: Path, overwrite: bool) -> None:
    """Refuse to write over anything but an empty folder or, with `overwrite`, an earlier export."""
    resolved, source = out_dir.resolve(), checkpoint.resolve()
    if resolved == source or source in resolved.parents or resolved in source.parents:
        raise ExportError(f"output folder {out_dir} must lie outside the checkpoint folder {checkpoint}")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"output path {out_dir} exists and is not a folder")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise ExportError(f"output folder {out_dir} is not empty; choose another (or --overwrite an earlier export)")
    foreign = _foreign_files(out_dir)
    if foreign or not (out_dir / EXPORT_MARKER).is_file():
        what = ", ".join(foreign[:5]) if foreign else f"no {EXPORT_MARKER} marker"
        raise ExportError(f"{out_dir} is not an earlier export ({what}); refusing to overwrite it")


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


def _load_tokenizer(source: Path, config) -> PreTrainedTokenizerBase:
    """The tokenizer, checked against the model's special tokens and vocabulary."""
    try:
        tokenizer = long_document_tokenizer(AutoTokenizer.from_pretrained(source))
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


def minimal_card(repo_id: str, architecture: str) -> str:
    """A short README.md for an export without `--card`."""
    tag = PIPELINE_TAGS.get(architecture, "feature-extraction")
    auto_class = {
        "RMTForCausalLM": "AutoModelForCausalLM",
        "RMTForSequenceClassification": "AutoModelForSequenceClassification",
    }.get(architecture, "AutoModel")
    return (
        f"---\nlibrary_name: transformers\npipeline_tag: {tag}\n"
        "tags:\n- rmt\n- recurrent-memory\n- long-context\n---\n\n"
        f"# {repo_id}\n\nA Recurrent Memory Transformer ({architecture}) built with `modeling_rmt`; it reads documents "
        "far longer than its backbone's position limit, segment by segment, with memory carried between segments.\n\n"
        f"```python\nfrom transformers import AutoTokenizer, {auto_class}\n\n"
        f'model = {auto_class}.from_pretrained("{repo_id}", trust_remote_code=True)\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}", trust_remote_code=True)\n```\n'
    )


def _copy_card(card: Path, staging: Path) -> None:
    """README.md from `card`, with the local images it links (same folder) beside it, and the results JSON
    it was generated from (`NAME.json` beside `NAME.md`) as `CARD_RESULTS`."""
    text = card.read_text()
    (staging / "README.md").write_text(text)
    results = card.with_suffix(".json")
    if results.is_file():
        try:
            parsed = json.loads(results.read_text())
        except json.JSONDecodeError as error:
            raise ExportError(f"{results} (the card's results) is not valid JSON: {error}; fix or move it") from None
        if not isinstance(parsed, dict) or not isinstance(parsed.get("training", {}), dict):
            raise ExportError(f"{results} is not a card's results JSON (an object with a training block)")
        shutil.copyfile(results, staging / CARD_RESULTS)
    for link in dict.fromkeys(IMAGE_LINK.findall(text)):
        if "://" in link or link.startswith(("/", "data:")):
            continue
        image = card.parent / link
        if "/" in link or "\\" in link or not image.is_file():
            print(f"warning: the card links {link}, which is not a file beside it; not exported", file=sys.stderr)
            continue
        shutil.copy2(image, staging / link)


def export_checkpoint(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    *,
    card: str | Path | None = None,
    dtype: str | None = None,
    repo_id: str | None = None,
    overwrite: bool = False,
    tokenizer: str | Path | None = None,
) -> Path:
    """Write the Hub folder of `checkpoint_dir` to `out_dir` (see the module docstring); returns `out_dir`.

    `dtype` ("float16", "bfloat16", "float32") casts every floating weight, memory included; `tokenizer`
    takes the tokenizer from another folder when the checkpoint has none; `repo_id` names the model in the
    minimal card. The folder is built beside `out_dir` and moved in place only once complete.
    """
    checkpoint, out_dir = Path(checkpoint_dir), Path(out_dir)
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    tokenizer_source = Path(tokenizer) if tokenizer is not None else checkpoint
    _check_checkpoint(checkpoint, tokenizer_source)
    _check_output(out_dir, checkpoint, overwrite)
    if card is not None and not Path(card).is_file():
        raise ExportError(f"model card {card} does not exist")
    model = _load_model(checkpoint)
    loaded_tokenizer = _load_tokenizer(tokenizer_source, model.config)
    target = DTYPES[dtype] if dtype is not None else None
    if target is not None:
        model = model.to(target)  # every floating parameter and buffer: backbone, memory, head alike
        for key in model.config.sub_configs:  # save_pretrained records the new dtype at the top level only
            if getattr(model.config, key, None) is not None:
                getattr(model.config, key).dtype = target

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.export-", dir=out_dir.parent))
    try:
        model.save_pretrained(staging)
        package = Path(modeling_rmt.__file__).parent
        for name in HUB_FILES:  # the package's current code, whatever save_pretrained picked up
            shutil.copyfile(package / name, staging / name)
        loaded_tokenizer.save_pretrained(staging)
        _drop_local_loading_options(staging / "tokenizer_config.json")
        if card is not None:
            _copy_card(Path(card), staging)
        else:
            architecture = model.config.architectures[0]
            (staging / "README.md").write_text(minimal_card(repo_id or f"ORG/{out_dir.name}", architecture))
        unexpected = _foreign_files(staging)
        if unexpected or {p.name for p in staging.glob("*.py")} != set(HUB_FILES):
            raise ExportError(f"the export would hold unexpected files: {unexpected or sorted(staging.glob('*.py'))}")
        _check_code(staging)
        _check_weights(staging, target)
        marker = {"written_by": "conversion.export", "note": "marks an export that --overwrite may replace"}
        (staging / EXPORT_MARKER).write_text(json.dumps(marker) + "\n")
        make_like_a_new_folder(staging)
        if out_dir.exists():  # empty, or an earlier export: checked again, as it may have changed meanwhile
            _check_output(out_dir, checkpoint, overwrite)
            replaced = staging.with_name(staging.name + "-replaced")
            out_dir.rename(replaced)  # kept until the new export is in place
            staging.rename(out_dir)
            shutil.rmtree(replaced)
        else:
            staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def folder_files(folder: str | Path) -> list[tuple[str, int]]:
    """(relative name, size in bytes) of every file under `folder`, sorted by name."""
    folder = Path(folder)
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*")
                  if p.is_file() and p.name != EXPORT_MARKER)  # fmt: skip


def print_summary(folder: str | Path, title: str) -> None:
    """Print `title`, then every file of `folder` with its size, and the total."""
    files = folder_files(folder)
    print(title)
    for name, size in files:
        print(f"  {size / 1e6:10.3f} MB  {name}")
    print(f"  {len(files)} files, {sum(size for _, size in files) / 1e6:.3f} MB in total")


def upload_export(folder: str | Path, repo_id: str, *, private: bool = False, dry_run: bool = False) -> str | None:
    """Create `repo_id` if needed and upload `folder`; with `dry_run` only print what would be sent."""
    visibility = "private" if private else "public"
    if dry_run:
        print_summary(folder, f"dry run: would upload to https://huggingface.co/{repo_id} ({visibility} model repo):")
        return None
    api = HfApi()
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    message = "Upload RMT model (conversion.export)"
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message=message,
                      ignore_patterns=[EXPORT_MARKER])  # fmt: skip
    print(f"uploaded {folder} to {url}")
    return str(url)


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
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUT_DIR")
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
    try:
        out = export_checkpoint(
            args.checkpoint_dir, args.out_dir, card=args.card, dtype=args.dtype, repo_id=args.repo_id,
            overwrite=args.overwrite, tokenizer=args.tokenizer,
        )  # fmt: skip
    except ExportError as error:
        sys.exit(f"error: {error}")
    if args.dry_run:  # lists the files too
        upload_export(out, args.repo_id, private=args.private, dry_run=True)
        return
    print_summary(out, f"exported {args.checkpoint_dir} to {out}:")
    if args.upload:
        upload_export(out, args.repo_id, private=args.private)


if __name__ == "__main__":
    main()
