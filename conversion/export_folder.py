"""Replacing an export folder so that nothing a user saved is lost and the folder is never missing or half-written.

What an export wrote is recorded in its marker, `.rmt-export.json`: every file's name, size and SHA-256.
`--overwrite` removes only those files. A file the user added (any name the marker does not list) is kept:
carried into the new export folder by a hard link (a copy where links fail), unless the new export writes a
file of the same name, when the export stops and names it. A file the marker lists whose hash differs (the
user edited it) stops the export too, unless `--replace-edited` says to replace it anyway.

An earlier export whose marker has no hashes (written before they were recorded) is read as before: the files
matching the export's names (`EXPORT_PATTERNS`) are taken as its own and the rest are kept as the user's. As
edits to its files cannot be detected, replacing them needs `--replace-edited` (the error lists them); after
that one replacement the folder has a marker with hashes.

The replacement, all beside OUT_DIR in its parent folder (one filesystem, so every rename is atomic):

1. `staged`: the new export is built in a hidden staging folder, `.NAME.export-XXXX`, its marker last.
2. `linked`: OUT_DIR is checked unchanged since it was inspected, and the user's files are linked into staging.
3. `journaled`: `.NAME.export.journal` records both folders (their inodes) and the listing of the earlier one.
4. `swapped`: Linux `renameat2(RENAME_EXCHANGE)` swaps staging and OUT_DIR in one step: OUT_DIR is always one
   whole export, old or new, for any process that opens it. Where RENAME_EXCHANGE is missing (not Linux, an
   old kernel or C library, a filesystem without it) or `RMT_EXPORT_NO_EXCHANGE=1`, two renames do it:
   OUT_DIR to `.NAME.export-XXXX-old` (step `moved-away`), then staging to OUT_DIR. A kill between the two
   leaves OUT_DIR missing until the next export into it, which completes the swap from the journal.
5. `removed-earlier`: the earlier folder is deleted if it holds only what the journal listed; if anything was
   added or changed in it meanwhile it is kept, visibly, as `NAME.replaced-TIMESTAMP`, with a warning.
6. The journal is removed.

The next export into OUT_DIR first finishes what an interrupted one left (`recover`): with a journal, it
completes the swap or keeps the earlier export, then removes the leftover `.NAME.export-*` folders, saying so.
An export holds `.NAME.export.lock` (flock) while it runs: a second export into the same folder is refused.
`RMT_EXPORT_KILL_AT=STEP` (one of `STEPS`) makes the export kill itself (SIGKILL) at that step, for tests.

Readers: each export records an export id in `config.json` and in every safetensors file's metadata
(`conversion.export_id`); `RMTPreTrainedModel.from_pretrained` compares them after loading, so a process loading
while the folder is swapped gets one export whole or a ValueError saying to load again. The id is a fresh UUID,
except for a re-export of the same config and weights over the earlier export (which keeps its id, so that its
bytes stay the same, e.g. in git): an id never comes back to a folder after another, which is what makes
comparing the config's id with the weights' after loading enough.

`save_pretrained` of transformers 5.x, for comparison, writes into a non-empty folder in place: files it does
not write are kept, its own (`config.json`, `model.safetensors`, ...) are overwritten, weight shards named like
its own (`model-00001-of-00003.safetensors`) that the new save does not write are deleted, and a stale
`model.safetensors` or `model.safetensors.index.json` of an earlier save of the other kind is left behind (a
stale `model.safetensors` is even loaded instead of new shards). The library's own writers never save into a
folder in place: exports as above, `conversion.from_backbone` and a training run's `final/` into a new or
empty folder only.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Written into every export: what `--overwrite` requires before it replaces a folder. Not uploaded.
EXPORT_MARKER = ".rmt-export.json"
MARKER_FORMAT = 2  # 2: the marker lists every file with its size and SHA-256; 1 (no "format"): it does not
KILL_AT = "RMT_EXPORT_KILL_AT"
NO_EXCHANGE = "RMT_EXPORT_NO_EXCHANGE"
STEPS = ("staged", "linked", "journaled", "moved-away", "swapped", "removed-earlier")
RENAME_EXCHANGE, AT_FDCWD = 2, -100


class ExportError(ValueError):
    """The checkpoint or the output folder cannot be exported safely; the message says why."""


def _step(name: str) -> None:
    """Kill this process at step `name` when `RMT_EXPORT_KILL_AT` names it (tests of interrupted exports)."""
    if os.environ.get(KILL_AT) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _beside(out_dir: Path, suffix: str) -> Path:
    return out_dir.parent / f".{out_dir.name}.export{suffix}"


def journal_path(out_dir: Path) -> Path:
    return _beside(out_dir, ".journal")


def new_staging(out_dir: Path) -> Path:
    """A fresh hidden folder beside `out_dir` to build the export in."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.export-", dir=out_dir.parent))


def leftovers(out_dir: Path) -> list[Path]:
    """Staging and earlier folders (`new_staging`, its `-old`) of exports into `out_dir` that were interrupted."""
    pattern = re.compile(re.escape(f".{out_dir.name}.export-") + r"[a-z0-9_]{8}(-old)?")
    if not out_dir.parent.is_dir():
        return []
    return sorted(p for p in out_dir.parent.iterdir() if pattern.fullmatch(p.name) and not p.is_symlink())


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_marker(folder: Path, export_id: str, content: str) -> None:
    """The marker of the export in `folder`: every file it holds, with size and SHA-256."""
    files = {p.name: {"sha256": sha256(p), "size": p.stat().st_size}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != EXPORT_MARKER}  # fmt: skip
    marker = {"written_by": "conversion.export", "format": MARKER_FORMAT, "export_id": export_id, "files": files,
              "content_sha256": content, "note": "marks an export that --overwrite may replace: only the files "
              "listed here"}  # fmt: skip
    (folder / EXPORT_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")


def read_marker(folder: Path) -> dict | None:
    """The marker of `folder` (None without one); ExportError when it is unreadable."""
    path = folder / EXPORT_MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
        files = marker.get("files")
        if files is not None and not all(isinstance(v, dict) and {"sha256", "size"} <= set(v) for v in files.values()):
            raise ValueError("a file entry lacks sha256 or size")
    except (ValueError, AttributeError) as error:
        raise ExportError(f"{path} is not a readable export marker ({error}); move the folder away") from None
    return marker


def export_files(folder: Path) -> list[str] | None:
    """The files the export in `folder` wrote, as its marker lists them (None for a marker without the list)."""
    marker = read_marker(folder)
    return None if marker is None or marker.get("files") is None else sorted(marker["files"])


def _listing(folder: Path) -> dict[str, list]:
    """Every entry under `folder`: files by inode, size and mtime, links by target, folders by name."""
    entries: dict[str, list] = {}

    def walk(directory: Path, prefix: str) -> None:
        with os.scandir(directory) as scan:
            for entry in scan:
                name = prefix + entry.name
                if entry.is_symlink():
                    entries[name] = ["link", os.readlink(entry.path)]
                elif entry.is_dir():
                    entries[name] = ["dir"]
                    walk(Path(entry.path), name + "/")
                else:
                    stat = entry.stat()
                    entries[name] = ["file", stat.st_ino, stat.st_size, stat.st_mtime_ns]

    walk(folder, "")
    return entries


def _changes(before: dict[str, list], after: dict[str, list], removals: bool = True) -> list[str]:
    """Entries added, changed (or, with `removals`, removed) between two listings."""
    changed = [name for name, entry in after.items() if before.get(name) != entry]
    return sorted(changed + ([name for name in before if name not in after] if removals else []))


def _names(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


@dataclass
class Earlier:
    """An earlier export in OUT_DIR, as checked: its own files (to replace) and the user's (to keep)."""

    folder: Path
    exported: list[str]
    kept: list[str]
    listing: dict[str, list]


def _edited(path: Path, record: dict) -> bool:
    if path.is_symlink() or not path.is_file() or path.stat().st_size != record["size"]:
        return True
    return sha256(path) != record["sha256"]


def read_earlier(out_dir: Path, legacy_patterns: tuple[str, ...], replace_edited: bool) -> Earlier | None:
    """What replacing the earlier export in `out_dir` would remove and keep (None: missing or empty);
    ExportError for a folder that is no export, or whose exported files were edited (see the docstring)."""
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return None
    names = sorted(p.name for p in out_dir.iterdir())
    marker = read_marker(out_dir)
    if marker is None:
        raise ExportError(f"{out_dir} is not an earlier export (no {EXPORT_MARKER} marker; it holds {_names(names)}); "
                          "refusing to overwrite it: choose another folder")  # fmt: skip
    files = marker.get("files")
    if files is None:  # an older marker: the names an export uses are its, and edits cannot be seen
        exported = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in legacy_patterns)
                    and (out_dir / n).is_file() and not (out_dir / n).is_symlink()]  # fmt: skip
        if not replace_edited:
            raise ExportError(
                f"{out_dir} was written by an older conversion.export whose {EXPORT_MARKER} records no file hashes, "
                f"so your edits to its files cannot be detected: pass --replace-edited to replace "
                f"{_names([n for n in exported if n != EXPORT_MARKER])} "
                "(files of other names are kept), or move the folder away"
            )
    else:
        exported = [n for n in names if n in files or n == EXPORT_MARKER]
        edited = [n for n in exported if n != EXPORT_MARKER and _edited(out_dir / n, files[n])]
        if edited and not replace_edited:
            raise ExportError(
                f"{out_dir}: {_names(edited)} changed since it was exported (its SHA-256 differs from the one in "
                f"{EXPORT_MARKER}); move your version away, or pass --replace-edited to replace it anyway"
            )
    kept = [n for n in names if n not in exported]
    return Earlier(out_dir, exported, kept, _listing(out_dir))


def _link_or_copy(source: str | Path, target: str | Path) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, target, follow_symlinks=False)


def _carry(source: Path, target: Path) -> None:
    """Put the user's entry `source` at `target`: files hard-linked (copied where links fail), links as links."""
    if source.is_symlink():
        os.symlink(os.readlink(source), target)
    elif source.is_dir():
        shutil.copytree(source, target, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(source, target)


def exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE); False where that is unavailable."""
    if sys.platform != "linux" or os.environ.get(NO_EXCHANGE) == "1":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:  # glibc before 2.28
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(AT_FDCWD, os.fsencode(first), AT_FDCWD, os.fsencode(second), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def _write_journal(path: Path, record: dict) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as file:
        file.write(json.dumps(record) + "\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)


def _remove_earlier(earlier: Path, listing: dict[str, list], out_dir: Path) -> None:
    """Delete the replaced folder if it holds only what was listed before the swap; else keep it aside."""
    changed = _changes(listing, _listing(earlier), removals=False)
    if not changed:
        shutil.rmtree(earlier)
        return
    aside = out_dir.with_name(f"{out_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    while aside.exists():
        aside = aside.with_name(aside.name + "-1")
    os.rename(earlier, aside)
    print(f"warning: {_names(changed)} appeared or changed in {out_dir} while it was being replaced; the earlier "
          f"folder is kept as {aside}: move what you need from it, then delete it", file=sys.stderr)  # fmt: skip


def publish(staging: Path, out_dir: Path, earlier: Earlier | None) -> None:
    """Put the complete export in `staging` at `out_dir`, replacing `earlier` (see the module docstring)."""
    _step("staged")
    kept = earlier.kept if earlier is not None else []
    clash = [name for name in kept if os.path.lexists(staging / name)]
    if clash:
        raise ExportError(f"{out_dir} holds {_names(clash)}, which you added (the earlier export did not write it) "
                          "and which the new export writes too: rename or move it, then run again; nothing was "
                          "changed")  # fmt: skip
    if earlier is None:  # missing or empty: rename replaces an empty folder atomically, and fails on a non-empty one
        try:
            os.rename(staging, out_dir)
        except OSError as error:
            raise ExportError(f"{out_dir} changed while exporting ({error.strerror}); nothing was replaced: "
                              "run again") from None  # fmt: skip
        return
    changed = _changes(earlier.listing, _listing(out_dir)) if out_dir.is_dir() else ["the folder itself"]
    if changed:
        raise ExportError(f"{out_dir} changed while exporting ({_names(changed)}); nothing was replaced: run again")
    for name in kept:
        _carry(out_dir / name, staging / name)
    _step("linked")
    journal, old = journal_path(out_dir), staging.with_name(staging.name + "-old")
    record = {"out_dir": out_dir.name, "staging": staging.name, "old": old.name, "listing": earlier.listing,
              "new_inode": staging.stat().st_ino, "old_inode": out_dir.stat().st_ino}  # fmt: skip
    _write_journal(journal, record)
    _step("journaled")
    try:
        swapped = exchange(staging, out_dir)
        if swapped:
            old = staging
        else:
            os.rename(out_dir, old)
    except BaseException:
        journal.unlink()  # nothing moved
        raise
    if not swapped:
        _step("moved-away")
        os.rename(staging, out_dir)
    _step("swapped")
    _remove_earlier(old, earlier.listing, out_dir)
    _step("removed-earlier")
    journal.unlink()


def _missing_files(out_dir: Path) -> list[str]:
    """Files the marker of `out_dir` lists that are absent or of another size."""
    marker = read_marker(out_dir) if out_dir.is_dir() else None
    files = (marker or {}).get("files") or {}
    sizes = {n: (out_dir / n).stat().st_size if (out_dir / n).is_file() else None for n in files}
    return [n for n, record in sorted(files.items()) if sizes[n] != record["size"]]


def _finish_swap(out_dir: Path, journal: Path) -> None:
    """Complete, or leave undone, the swap that the journal of an interrupted export describes."""
    record = json.loads(journal.read_text())
    staging, old = out_dir.parent / record["staging"], out_dir.parent / record["old"]
    if not out_dir.exists() and staging.is_dir() and staging.stat().st_ino == record["new_inode"]:
        os.rename(staging, out_dir)  # the fallback stopped between its two renames: finish it
        print(f"{out_dir}: put the new export in place, as an interrupted export was doing")
    inode = out_dir.stat().st_ino if out_dir.is_dir() else None
    if inode == record["new_inode"]:  # swapped: the earlier folder waits to be removed
        for earlier in (staging, old):
            if earlier.is_dir() and not earlier.is_symlink() and earlier.stat().st_ino == record["old_inode"]:
                _remove_earlier(earlier, record["listing"], out_dir)
                print(f"{out_dir}: removed the earlier export that an interrupted export had replaced")
    elif inode != record["old_inode"]:
        raise ExportError(f"{out_dir} is neither the earlier nor the new export that the interrupted export recorded "
                          f"in {journal}: check the folders {staging.name} and {old.name} beside it (if present), "
                          f"then delete {journal.name}")  # fmt: skip


def recover(out_dir: Path) -> None:
    """Finish what an interrupted export into `out_dir` left (call while holding `export_lock`)."""
    journal = journal_path(out_dir)
    journal.with_name(journal.name + ".partial").unlink(missing_ok=True)
    if journal.is_file():
        _finish_swap(out_dir, journal)
        journal.unlink()
    found = leftovers(out_dir)
    if not found:
        return
    missing = _missing_files(out_dir)
    if missing:
        raise ExportError(f"{out_dir} lacks files its {EXPORT_MARKER} lists ({_names(missing)}), and an interrupted "
                          f"export left {_names([p.name for p in found])} beside it: check them by hand")  # fmt: skip
    for folder in found:
        shutil.rmtree(folder)
        print(f"removed {folder}, left unfinished by an interrupted export into {out_dir}")


@contextlib.contextmanager
def export_lock(out_dir: Path) -> Iterator[None]:
    """Hold `.NAME.export.lock` beside `out_dir` (flock): one export at a time into a folder."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    path = _beside(out_dir, ".lock")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ExportError(f"another export into {out_dir} is running (it holds {path}); wait for it") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:  # its holder removed it as we opened it
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
