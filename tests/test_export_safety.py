"""Nothing a user saved is lost: `conversion.export --overwrite` removes only what the earlier export wrote
(its marker's hashes), keeps the user's files, stops on edited ones; an export killed at any step leaves the
old export or the new one whole (the next run cleans up and says so); a reader never gets one export's config
with another's weights; `--dry-run` writes nothing; the library's other writers never write over a user's files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_classifier
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification, AutoTokenizer, modeling_utils

import conversion.export as export
import conversion.export_folder as export_folder
from conversion.export import EXPORT_MARKER, ExportError, export_checkpoint
from conversion.export_folder import KILL_AT, NO_EXCHANGE, export_lock, new_staging, publish, read_earlier, recover
from conversion.from_backbone import write_new_folder
from modeling_rmt import RMTConfig, RMTForSequenceClassification
from rmt_tools.backbones import minilm_path

ROOT = Path(__file__).resolve().parents[1]
NAME = "rmt-tiny"
USER = {"notes.txt": "my notes", "eval/scores.json": '{"qa1": 0.9}'}  # what the user added to the export folder
# Replaces OUT_DIR by a copy of each SOURCE export in turn, as `export_checkpoint` does (without building a
# model), for the given number of seconds, or once; with "fresh", each copy gets a new export id, as an export does.
REPLACE = textwrap.dedent(
    """
    import shutil, sys, time, uuid
    from pathlib import Path
    from conversion.export_folder import export_lock, new_staging, publish, read_earlier, recover, write_marker
    from conversion.export_id import record_export_id

    out, seconds, ids, sources = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3], [Path(p) for p in sys.argv[4:]]
    end, turn = time.monotonic() + seconds, 0
    while turn == 0 or time.monotonic() < end:
        with export_lock(out):
            recover(out)
            earlier = read_earlier(out, (), replace_edited=False)
            staging = new_staging(out)
            for path in sources[turn % len(sources)].iterdir():
                shutil.copy2(path, staging / path.name)
            if ids == "fresh":
                record_export_id(staging, str(uuid.uuid4()))
                write_marker(staging, "", "")
            publish(staging, out, earlier)
        turn += 1
    print(turn)
    """
)


def content(path: Path, exact: bool) -> bytes:
    """A file's bytes; unless `exact`, with the export id left out (config.json, weights, marker)."""
    data = path.read_bytes()
    if exact or path.name not in ("config.json", "model.safetensors", EXPORT_MARKER):
        return data
    if path.name == EXPORT_MARKER:
        return json.dumps(sorted(json.loads(data).get("files", "old format"))).encode()
    if path.name == "config.json":
        return json.dumps({k: v for k, v in json.loads(data).items() if k != "export_id"}, sort_keys=True).encode()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"].pop("export_id", None)
    return json.dumps(header, sort_keys=True).encode() + data[8 + length :]


def state(folder: Path, exact: bool = False) -> dict[str, str]:
    """Every entry under `folder`: files by SHA-256 of their `content`, folders as 'dir'."""
    return {p.relative_to(folder).as_posix(): "dir" if p.is_dir() else hashlib.sha256(content(p, exact)).hexdigest()
            for p in folder.rglob("*")}  # fmt: skip


def with_user_files(folder: Path) -> dict[str, str]:
    """`state(folder)` once the user's files are added to it."""
    return {**state(folder), "eval": "dir", **{n: hashlib.sha256(t.encode()).hexdigest() for n, t in USER.items()}}


def add_user_files(folder: Path) -> None:
    for name, text in USER.items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text(text)


def beside(out: Path) -> list[str]:
    """What lies beside `out` in its parent folder (staging folders, journal, lock)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


def export_id(folder: Path) -> str:
    return json.loads((folder / "config.json").read_text())["export_id"]


def saved_classifier(folder: Path, seed: int) -> Path:
    """A saved tiny random RMT classifier (MiniLM vocabulary) with its tokenizer."""
    model = tiny_classifier(seed=seed, backbone_overrides={"vocab_size": 30522}, cls_token_id=101, sep_token_id=102)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return saved_classifier(tmp_path_factory.mktemp("checkpoint"), seed=0)


@pytest.fixture(scope="module")
def retrained(tmp_path_factory) -> Path:
    """Another model of the same shape (other weights): what a later export is made of."""
    return saved_classifier(tmp_path_factory.mktemp("retrained"), seed=1)


@pytest.fixture(scope="module")
def exports(checkpoint, retrained, tmp_path_factory) -> dict[str, Path]:
    """The earlier export ('old', float32) and a later one of other weights ('new', bfloat16)."""
    folder = tmp_path_factory.mktemp("exports")
    return {"old": export_checkpoint(checkpoint, folder / "old" / NAME),
            "new": export_checkpoint(retrained, folder / "new" / NAME, dtype="bfloat16")}  # fmt: skip


def test_the_export_id_names_config_and_weights_and_is_the_same_for_the_same_export(checkpoint, exports, tmp_path):
    old, new = exports["old"], exports["new"]
    ids = {export_id(old), export_id(new)}
    assert len(ids) == 2
    for folder in (old, new):
        with safe_open(folder / "model.safetensors", framework="pt") as weights:
            assert weights.metadata() == {"format": "pt", "export_id": export_id(folder)}
        assert json.loads((folder / EXPORT_MARKER).read_text())["export_id"] == export_id(folder)
        assert RMTConfig.from_pretrained(folder).export_id == export_id(folder)  # the config round-trips it
    again = tmp_path / NAME
    shutil.copytree(old, again)
    export_checkpoint(checkpoint, again, overwrite=True)  # the same model again: the same bytes (e.g. for git)
    assert state(again, exact=True) == state(old, exact=True)
    export_checkpoint(checkpoint, tmp_path / "elsewhere")
    assert export_id(tmp_path / "elsewhere") not in ids  # a new folder: a fresh id
    export_checkpoint(checkpoint, again, overwrite=True, dtype="bfloat16")
    export_checkpoint(checkpoint, again, overwrite=True)  # back to the first content: never the first's id again
    assert export_id(again) not in ids and state(again) == state(old)
    # A model re-saved from an export keeps the id in its config, but its weights carry none: it loads.
    model = RMTForSequenceClassification.from_pretrained(old)
    model.save_pretrained(tmp_path / "resaved")
    assert RMTForSequenceClassification.from_pretrained(tmp_path / "resaved").config.export_id == export_id(old)


def test_overwrite_keeps_the_users_files_and_uploads_only_the_export(retrained, exports, tmp_path, monkeypatch, capsys):
    out = tmp_path / NAME
    shutil.copytree(exports["old"], out)
    add_user_files(out)
    inode = (out / "notes.txt").stat().st_ino
    export_checkpoint(retrained, out, overwrite=True, dtype="bfloat16")
    assert state(out) == with_user_files(exports["new"])
    assert (out / "notes.txt").stat().st_ino == inode  # carried over by a hard link, not rewritten
    assert "kept your files" in capsys.readouterr().out and beside(out) == []
    calls = {}

    class FakeHfApi:
        def create_repo(self, repo_id, **kwargs):
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kwargs):
            calls.update(kwargs)

    monkeypatch.setattr(export, "HfApi", FakeHfApi)
    export.upload_export(out, "org/rmt-tiny")
    assert sorted(calls["allow_patterns"]) == sorted(set(state(exports["new"])) - {EXPORT_MARKER})
    export.print_summary(out, "summary")
    assert "kept beside them (yours: not uploaded): eval, notes.txt" in capsys.readouterr().out


def test_an_edited_export_file_stops_the_overwrite_unless_replace_edited(retrained, exports, tmp_path):
    out = tmp_path / NAME
    shutil.copytree(exports["old"], out)
    add_user_files(out)
    (out / "README.md").write_text("# my own card\n")
    before = state(out)
    with pytest.raises(ExportError, match="README.md changed since it was exported.*--replace-edited"):
        export_checkpoint(retrained, out, overwrite=True, dtype="bfloat16")
    assert state(out) == before and beside(out) == []
    export_checkpoint(retrained, out, overwrite=True, dtype="bfloat16", replace_edited=True)
    assert state(out) == with_user_files(exports["new"])


def test_a_users_file_that_the_new_export_writes_too_stops_it(checkpoint, exports, tmp_path):
    out, card = tmp_path / "hub" / NAME, tmp_path / "cards" / "rmt-tiny.md"
    shutil.copytree(exports["old"], out)
    (out / "card_results.json").write_text('{"mine": true}')  # not in the marker: the user's
    card.parent.mkdir()
    card.write_text("# rmt-tiny\n")
    card.with_suffix(".json").write_text(json.dumps({"training": {}}))
    before = state(out)
    with pytest.raises(ExportError, match="holds card_results.json, which you added .* writes too"):
        export_checkpoint(checkpoint, out, overwrite=True, card=card)
    assert state(out) == before and beside(out) == []


def test_an_earlier_export_without_hashes_needs_replace_edited(retrained, exports, tmp_path):
    out = tmp_path / NAME
    shutil.copytree(exports["old"], out)
    add_user_files(out)
    legacy = {"written_by": "conversion.export", "note": "marks an export that --overwrite may replace"}
    (out / EXPORT_MARKER).write_text(json.dumps(legacy) + "\n")
    before = state(out)
    with pytest.raises(ExportError, match="records no file hashes.*--replace-edited to replace .*README.md"):
        export_checkpoint(retrained, out, overwrite=True, dtype="bfloat16")
    assert state(out) == before
    export_checkpoint(retrained, out, overwrite=True, dtype="bfloat16", replace_edited=True)
    assert state(out) == with_user_files(exports["new"])  # the other names were the user's: kept


def test_dry_run_writes_nothing_beside_or_in_the_output_folder(checkpoint, exports, tmp_path, capsys):
    out = tmp_path / "hub" / NAME
    shutil.copytree(exports["old"], out)
    add_user_files(out)
    before = {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.rglob("*")}
    arguments = [str(checkpoint), str(out), "--repo-id", "org/rmt-tiny", "--dry-run", "--dtype", "bfloat16"]
    with pytest.raises(SystemExit, match="is not empty"):
        export.main(arguments)
    export.main([*arguments, "--overwrite"])
    printed = capsys.readouterr().out
    assert "dry run: would upload to https://huggingface.co/org/rmt-tiny" in printed
    assert "model.safetensors" in printed and "yours would be kept: eval, notes.txt" in printed
    assert {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.rglob("*")} == before
    assert export_id(out) == export_id(exports["old"]) and beside(out) == []


STEPS = [("exchange", step, "old") for step in ("staged", "linked", "journaled")] + [
    ("exchange", "swapped", "new"),
    ("exchange", "removed-earlier", "new"),
    ("renames", "journaled", "old"),
    ("renames", "moved-away", None),  # between the two renames: missing until the next run
    ("renames", "swapped", "new"),
]


@pytest.mark.parametrize(("mode", "step", "found"), STEPS, ids=[f"{m}-{s}" for m, s, _ in STEPS])
def test_an_export_killed_at_any_step_leaves_one_whole_export(exports, tmp_path, capsys, mode, step, found):
    out = tmp_path / NAME
    shutil.copytree(exports["old"], out)
    add_user_files(out)
    env = {**os.environ, KILL_AT: step, NO_EXCHANGE: "1" if mode == "renames" else "0"}
    command = [sys.executable, "-c", REPLACE, str(out), "0", "same", str(exports["new"])]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    left = beside(out)
    if found is None:
        assert not out.exists()
    else:
        assert state(out) == with_user_files(exports[found])
        model = AutoModelForSequenceClassification.from_pretrained(out)
        assert model.config.export_id == export_id(exports[found])

    with export_lock(out):  # what the next export run does first
        recover(out)
    printed = capsys.readouterr().out
    if any(name.startswith(f".{NAME}.export-") for name in left):
        assert "interrupted export" in printed
    assert beside(out) == []  # staging, earlier folder, journal and lock all gone
    whole = exports[found or "new"]  # the fallback killed between its renames: the next run completes it
    assert state(out) == with_user_files(whole)
    assert AutoModelForSequenceClassification.from_pretrained(out).config.export_id == export_id(whole)


def test_the_next_export_run_finishes_one_killed_after_the_swap(retrained, exports, tmp_path, capsys):
    out = tmp_path / NAME
    shutil.copytree(exports["old"], out)
    add_user_files(out)
    command = [sys.executable, "-m", "conversion.export", str(retrained), str(out), "--overwrite"]
    command += ["--dtype", "bfloat16"]
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, KILL_AT: "swapped"}, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert state(out) == with_user_files(exports["new"])
    assert any(name.startswith(f".{NAME}.export-") for name in beside(out))  # the earlier export, not yet removed
    export_checkpoint(retrained, out, overwrite=True, dtype="bfloat16")
    assert "removed the earlier export that an interrupted export had replaced" in capsys.readouterr().out
    assert state(out) == with_user_files(exports["new"]) and beside(out) == []


def test_files_that_appear_during_the_replacement_are_never_deleted(exports, tmp_path, monkeypatch, capsys):
    out = tmp_path / NAME
    shutil.copytree(exports["old"], out)
    add_user_files(out)

    def staged() -> Path:
        staging = new_staging(out)
        for path in exports["new"].iterdir():
            shutil.copy2(path, staging / path.name)
        return staging

    earlier = read_earlier(out, (), replace_edited=False)
    (out / "early.txt").write_text("saved while the export was built")
    staging = staged()
    with pytest.raises(ExportError, match="changed while exporting .early.txt.; nothing was replaced"):
        publish(staging, out, earlier)
    assert state(out) == {**with_user_files(exports["old"]), "early.txt": state(out)["early.txt"]}
    shutil.rmtree(staging)

    earlier = read_earlier(out, (), replace_edited=False)
    step = export_folder._step
    monkeypatch.setattr(export_folder, "_step", lambda name: (out / "late.txt").write_text("x") if name == "journaled"
                        else step(name))  # fmt: skip
    publish(staged(), out, earlier)
    assert "late.txt appeared or changed" in capsys.readouterr().err
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith(f"{NAME}.replaced-")]
    assert (aside / "late.txt").read_text() == "x"  # kept, in the earlier folder set aside
    assert (out / "early.txt").is_file() and state(out)["notes.txt"] == with_user_files(exports["old"])["notes.txt"]


def test_a_second_export_into_the_same_folder_is_refused_while_one_runs(checkpoint, tmp_path):
    out = tmp_path / NAME
    with export_lock(out):
        with pytest.raises(ExportError, match="another export into .* is running"):
            export_checkpoint(checkpoint, out)
    assert beside(out) == [] and not out.exists()


def swap(first: Path, second: Path) -> None:
    if not export_folder.exchange(first, second):
        first.rename(first.with_name("swapping"))
        second.rename(first)
        first.with_name("swapping").rename(second)


def test_a_folder_replaced_between_config_and_weights_is_refused_when_loaded(exports, tmp_path, monkeypatch):
    out, other = tmp_path / NAME, tmp_path / "other"
    shutil.copytree(exports["old"], out)
    shutil.copytree(exports["new"], other)
    resolve = modeling_utils._get_resolved_checkpoint_files

    def replaced_then_resolved(*args, **kwargs):  # after the config is read, before the weights are
        swap(other, out)
        return resolve(*args, **kwargs)

    monkeypatch.setattr(modeling_utils, "_get_resolved_checkpoint_files", replaced_then_resolved)
    with pytest.raises(ValueError, match=f"{out} was replaced while it was being loaded.*mix two exports.*again"):
        AutoModelForSequenceClassification.from_pretrained(out)
    monkeypatch.setattr("modeling_rmt.pretrained.check_export_id", lambda *args: None)
    mixed = AutoModelForSequenceClassification.from_pretrained(out)  # what the check prevents: new config, old weights
    old, new = (RMTForSequenceClassification.from_pretrained(exports[key]) for key in ("old", "new"))
    assert mixed.config.export_id == export_id(exports["new"])
    assert torch.equal(mixed.memory.memory_tokens, old.memory.memory_tokens.to(mixed.dtype))
    assert not torch.equal(mixed.memory.memory_tokens, new.memory.memory_tokens.to(mixed.dtype))
    monkeypatch.undo()
    model = AutoModelForSequenceClassification.from_pretrained(out)  # loaded again: whole
    assert model.config.export_id == export_id(exports["old"]) and model.dtype == torch.float32


def test_a_reader_loading_while_the_folder_is_replaced_gets_one_export_whole(exports, tmp_path):
    out = tmp_path / NAME
    shutil.copytree(exports["old"], out)
    expected = {}  # by the dtype that the config gives the model (float32: old, bfloat16: new)
    for folder in exports.values():
        model = RMTForSequenceClassification.from_pretrained(folder)
        expected[model.dtype] = model.memory.memory_tokens.detach().clone()
    replacer = subprocess.Popen([sys.executable, "-c", REPLACE, str(out), "3", "fresh", str(exports["new"]),
                                 str(exports["old"])], cwd=ROOT, stdout=subprocess.PIPE, text=True)  # fmt: skip
    loaded, refused = 0, 0
    try:
        while replacer.poll() is None:
            try:
                model = RMTForSequenceClassification.from_pretrained(out)
            except ValueError as error:
                assert "was replaced while it was being loaded" in str(error)
                refused += 1
                continue
            assert torch.equal(model.memory.memory_tokens, expected[model.dtype])  # weights of that config's export
            loaded += 1
    finally:
        replacements = int(replacer.communicate(timeout=60)[0] or 0)
    assert replacer.returncode == 0 and replacements > 5 and loaded > 3, (replacements, loaded, refused)


def test_write_new_folder_never_writes_over_files_that_appear_meanwhile(tmp_path):
    target = tmp_path / "converted"
    target.mkdir()

    def write(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        (target / "mine.txt").write_text("saved meanwhile")

    with pytest.raises(ValueError, match="changed while writing.*left as it was"):
        write_new_folder(target, write)
    assert state(tmp_path) == {"converted": "dir", "converted/mine.txt": state(target)["mine.txt"]}
    target.joinpath("mine.txt").unlink()
    write_new_folder(target, lambda folder: (folder / "config.json").write_text("{}"))  # an empty folder: replaced
    assert state(tmp_path) == {"converted": "dir", "converted/config.json": state(target)["config.json"]}


def test_a_snapshot_is_not_replaced_while_its_folder_holds_the_users_files(tmp_path):
    from safetensors.torch import save_file

    from rmt_training.snapshot import save_snapshot

    checkpoint = tmp_path / "run" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    save_file({"weight": torch.ones(2)}, checkpoint / "model.safetensors")
    for name in ("trainer_state.json", "curriculum.json"):
        (checkpoint / name).write_text("{}")
    snapshot = save_snapshot(tmp_path / "run", tmp_path / "snapshot")
    save_snapshot(tmp_path / "run", snapshot)  # an earlier snapshot alone is replaced
    (snapshot / "notes.txt").write_text("my notes")
    with pytest.raises(SystemExit, match="holds notes.txt, which a snapshot does not write"):
        save_snapshot(tmp_path / "run", snapshot)
    assert (snapshot / "notes.txt").read_text() == "my notes" and (snapshot / "snapshot.json").is_file()
