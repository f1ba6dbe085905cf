"""`conversion.export` builds exactly the Hub folder of a checkpoint (code, config, weights, tokenizer, card),
casts it to float16 faithfully, refuses unsafe input and output folders, uploads through HfApi (or only
lists with --dry-run), and the result loads offline as remote code in a fresh process."""

from __future__ import annotations

import json
import shutil
import socket
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_classifier
from safetensors.torch import load_file
from test_remote_code import NO_LOCAL_PACKAGE, hub_cache_layout, run_offline
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import conversion.export as export
from conversion.export import EXPORT_MARKER, HUB_FILES, ExportError, export_checkpoint
from conversion.from_backbone import LONG_DOCUMENT_TOKENS
from modeling_rmt import RMTForSequenceClassification
from rmt_tools.backbones import minilm_path

EXPORTED = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md", *HUB_FILES,
            EXPORT_MARKER}  # fmt: skip
TRAINING_LEFTOVERS = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "trainer_state.json",
                      "curriculum.json", "log_history.json", "training_args.json")  # fmt: skip
TEXT = "Mary travelled to the office. " + "The quick brown fox jumps over the lazy dog. " * 12 + "Where is Mary?"
REPO = "org/rmt-tiny"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A Trainer-like checkpoint: tiny random BERT RMT (MiniLM vocabulary), tokenizer and training leftovers."""
    folder = tmp_path_factory.mktemp("checkpoint-100")
    model = tiny_classifier(backbone_overrides={"vocab_size": 30522}, cls_token_id=101, sep_token_id=102, num_labels=3)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)
    for name in TRAINING_LEFTOVERS:
        (folder / name).write_bytes(b"not for the Hub")
    (folder / "runs").mkdir()
    (folder / "runs" / "events.out.tfevents").write_bytes(b"log")
    return folder


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> Path:
    return export_checkpoint(checkpoint, tmp_path_factory.mktemp("hub") / "rmt-tiny", repo_id=REPO)


def logits(folder: Path, **kwargs) -> torch.Tensor:
    model = AutoModelForSequenceClassification.from_pretrained(folder, **kwargs).eval()
    with torch.no_grad():
        return model(**AutoTokenizer.from_pretrained(folder)(TEXT, return_tensors="pt")).logits.float()


def test_export_holds_exactly_the_hub_files(checkpoint, exported):
    assert {p.name for p in exported.iterdir()} == EXPORTED
    package = Path(export.modeling_rmt.__file__).parent
    for name in HUB_FILES:  # the package's current code
        assert (exported / name).read_bytes() == (package / name).read_bytes()
    config = json.loads((exported / "config.json").read_text())
    assert config["auto_map"]["AutoModelForSequenceClassification"] == "modeling_rmt.RMTForSequenceClassification"
    assert config["dtype"] == "float32"
    assert AutoTokenizer.from_pretrained(exported).model_max_length == LONG_DOCUMENT_TOKENS
    card = (exported / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and f'from_pretrained("{REPO}"' in card
    assert all((checkpoint / name).is_file() for name in TRAINING_LEFTOVERS)  # the checkpoint is left as it was
    assert torch.equal(logits(exported), logits(checkpoint))


def test_float16_export_halves_the_weights_and_keeps_the_logits(checkpoint, exported, tmp_path):
    half = export_checkpoint(checkpoint, tmp_path / "fp16", dtype="float16")
    ratio = (half / "model.safetensors").stat().st_size / (exported / "model.safetensors").stat().st_size
    assert 0.45 < ratio < 0.55
    weights = load_file(half / "model.safetensors")
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float16}
    assert "memory.memory_tokens" in weights
    saved = json.loads((half / "config.json").read_text())
    assert saved["dtype"] == saved["text_config"]["dtype"] == "float16"  # the backbone's config says so too
    model = AutoModelForSequenceClassification.from_pretrained(half)
    assert type(model) is RMTForSequenceClassification and model.dtype == torch.float16
    reference = logits(exported)
    torch.testing.assert_close(logits(half, dtype=torch.float32), reference, rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(logits(half), reference, rtol=2e-2, atol=1e-4)  # computed in float16


def test_refuses_a_non_empty_output_folder_and_overwrites_only_an_earlier_export(checkpoint, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    with pytest.raises(ExportError, match="not empty"):
        export_checkpoint(checkpoint, mine)
    with pytest.raises(ExportError, match="is not an earlier export.*notes.txt"):
        export_checkpoint(checkpoint, mine, overwrite=True)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "my notes"
    # A saved model that is not an export (only the names an export uses) is not replaced either.
    model_folder = tmp_path / "a-model"
    shutil.copytree(checkpoint, model_folder, ignore=shutil.ignore_patterns(*TRAINING_LEFTOVERS, "runs"))
    before = {path.name: path.read_bytes() for path in model_folder.iterdir()}
    with pytest.raises(ExportError, match=f"is not an earlier export .no {EXPORT_MARKER} marker"):
        export_checkpoint(checkpoint, model_folder, overwrite=True)
    assert {path.name: path.read_bytes() for path in model_folder.iterdir()} == before
    shutil.rmtree(model_folder)

    (tmp_path / "empty").mkdir()
    assert {p.name for p in export_checkpoint(checkpoint, tmp_path / "empty").iterdir()} == EXPORTED
    earlier = export_checkpoint(checkpoint, tmp_path / "earlier")
    with pytest.raises(ExportError, match="not empty"):
        export_checkpoint(checkpoint, earlier, dtype="bfloat16")
    export_checkpoint(checkpoint, earlier, dtype="bfloat16", overwrite=True)
    assert json.loads((earlier / "config.json").read_text())["dtype"] == "bfloat16"
    assert {p.name for p in earlier.iterdir()} == EXPORTED
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "empty", "mine"]  # no staging folder left behind


@pytest.mark.parametrize(
    ("removed", "message"),
    [("model.safetensors", "no weights"), ("config.json", "no config.json"), ("tokenizer*", "no tokenizer files")],
)
def test_refuses_a_checkpoint_without_config_weights_or_tokenizer(checkpoint, tmp_path, removed, message):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    for path in broken.glob(removed):
        path.unlink()
    with pytest.raises(ExportError, match=message):
        export_checkpoint(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_takes_the_tokenizer_from_another_folder(checkpoint, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(checkpoint, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    out = export_checkpoint(bare, tmp_path / "out", tokenizer=minilm_path())
    assert {p.name for p in out.iterdir()} == EXPORTED


class FakeHfApi:
    """Records the calls `upload_export` makes."""

    calls: list[tuple[str, tuple, dict]] = []

    def create_repo(self, *args, **kwargs):
        self.calls.append(("create_repo", args, kwargs))
        return f"https://huggingface.co/{args[0]}"

    def upload_folder(self, *args, **kwargs):
        self.calls.append(("upload_folder", args, kwargs))
        assert {p.name for p in Path(kwargs["folder_path"]).iterdir()} == EXPORTED | {"accuracy.png"}


class NoHfApi:
    def __init__(self, *args, **kwargs):
        raise AssertionError("--dry-run must not touch the Hub")


def test_dry_run_lists_the_files_and_makes_no_network_call(checkpoint, exported, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export, "HfApi", NoHfApi)

    def no_connection(*args, **kwargs):
        raise AssertionError("no network call expected")

    monkeypatch.setattr(socket.socket, "connect", no_connection)
    export.main([str(checkpoint), str(tmp_path / "out"), "--repo-id", REPO, "--dry-run", "--private"])
    printed = capsys.readouterr().out
    assert f"https://huggingface.co/{REPO} (private model repo)" in printed
    for name in EXPORTED - {EXPORT_MARKER}:  # the marker stays local
        assert name in printed
    assert EXPORT_MARKER not in printed
    size = (exported / "model.safetensors").stat().st_size / 1e6  # the same model: the same bytes
    assert f"{size:10.3f} MB  model.safetensors" in printed and f"{len(EXPORTED) - 1} files" in printed
    assert list(tmp_path.iterdir()) == []  # built in a temporary folder: OUT_DIR was never written


def test_upload_creates_the_repo_and_uploads_the_folder_with_the_card(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export, "HfApi", FakeHfApi)
    FakeHfApi.calls = []
    card = tmp_path / "cards" / "rmt-tiny.md"
    card.parent.mkdir()
    card.write_text("---\nlicense: apache-2.0\n---\n# rmt-tiny\n\n![Accuracy](accuracy.png)\n")
    (card.parent / "accuracy.png").write_bytes(b"\x89PNG fake")
    out = tmp_path / "out"
    export.main([str(checkpoint), str(out), "--card", str(card), "--repo-id", REPO, "--upload", "--dtype", "float16"])
    assert FakeHfApi.calls == [
        ("create_repo", (REPO,), {"repo_type": "model", "private": False, "exist_ok": True}),
        ("upload_folder", (), {"repo_id": REPO, "folder_path": str(out), "repo_type": "model",
                               "commit_message": "Upload RMT model (conversion.export)",
                               "allow_patterns": sorted(EXPORTED - {EXPORT_MARKER} | {"accuracy.png"}),
                               "ignore_patterns": [EXPORT_MARKER]}),
    ]  # fmt: skip
    assert (out / "README.md").read_text() == card.read_text()
    assert (out / "accuracy.png").read_bytes() == b"\x89PNG fake"
    assert "uploaded" in capsys.readouterr().out


def test_the_cards_results_json_travels_beside_it_and_a_broken_one_is_refused(checkpoint, tmp_path):
    card = tmp_path / "cards" / "rmt-tiny.md"
    card.parent.mkdir()
    card.write_text("# rmt-tiny\n")
    results = {"name": "rmt-tiny", "training": {"tasks": ["qa1"], "steps": 3}, "evaluation": []}
    card.with_suffix(".json").write_text(json.dumps(results))
    out = export_checkpoint(checkpoint, tmp_path / "out", card=card)
    assert {p.name for p in out.iterdir()} == EXPORTED | {"card_results.json"}
    assert json.loads((out / "card_results.json").read_text()) == results
    card.with_suffix(".json").write_text('{"name": "rmt-tiny", "training": ')
    with pytest.raises(ExportError, match=r"rmt-tiny.json \(the card's results\) is not valid JSON"):
        export_checkpoint(checkpoint, tmp_path / "out", card=card, overwrite=True)
    assert json.loads((out / "card_results.json").read_text()) == results  # the earlier export is kept


def test_command_line_errors_are_clear(checkpoint, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(SystemExit, match="error: output folder .* is not empty"):
        export.main([str(checkpoint), str(tmp_path / "out")])
    with pytest.raises(SystemExit) as usage:
        export.main([str(checkpoint), str(tmp_path / "other"), "--upload"])
    assert usage.value.code == 2 and "need --repo-id" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export.main([str(checkpoint), str(tmp_path / "other"), "--dry-run", "--repo-id", "not a repo id"])
    assert not (tmp_path / "other").exists()


FRESH_EXPORT = NO_LOCAL_PACKAGE + textwrap.dedent(
    """    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    repo, text = sys.argv[1:3]
    model = AutoModelForSequenceClassification.from_pretrained(repo, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)
    with torch.no_grad():
        logits = model(**tokenizer(text, return_tensors="pt")).logits
    print(json.dumps({"logits": logits.tolist(), "module": type(model).__module__}))
    """
)


def test_exported_folder_loads_offline_as_remote_code_in_a_fresh_process(exported, tmp_path):
    cache = tmp_path / "hub"
    hub_cache_layout(exported, cache, REPO)
    result = run_offline(FRESH_EXPORT, [REPO, TEXT], cache, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    assert remote["module"].startswith("transformers_modules")
    torch.testing.assert_close(torch.tensor(remote["logits"]), logits(exported), rtol=1e-5, atol=1e-6)
