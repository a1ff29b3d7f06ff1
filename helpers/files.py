"""Folders that exist complete or not at all: checkpoints, latent/text caches and tiny builds are written this way.

    write_folder(final, fill)     # fill(tmp) writes the files; the folder appears only once all are on disk
    verify(final)                 # raises FolderError unless every file matches manifest.json

`write_folder` writes into a hidden temp folder beside `final`, `.tmp-<name>-<pid>`, owned by the writing process;
fsyncs every file; writes `manifest.json` (sha256 and size of every other file) LAST; then renames the temp folder
into place. A kill, a disconnect or a full Drive at any moment leaves the previous version (or nothing) visible,
never a half-written folder, and a folder with a manifest is one whose write finished.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

MANIFEST = "manifest.json"
# `.tmp-<name>-<pid>`: the folder being written; `.old-<name>-<pid>`: the version it replaces, until it is deleted.
_OWNED = re.compile(r"^\.(tmp|old)-(?P<name>.+)-(?P<pid>\d+)$")


class FolderError(RuntimeError):
    """A folder is incomplete or does not match its manifest."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync(path: Path) -> None:
    """Force a file's data, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some FUSE mounts (Drive) refuse fsync on directories; the rename still orders writes
        pass
    finally:
        os.close(fd)


def write_file(path: Path, write: Callable[[Path], None]) -> None:
    """Write one file with `write(path)` and force it to disk."""
    write(path)
    fsync(path)


# ---------------------------------------------------------------- temp folders and their owners

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists but belongs to another user
        return True
    return True


def remove_stale(parent: Path, name: str) -> list[Path]:
    """Delete the temp folders in `parent` whose writer is dead (killed mid-write), and this process's own
    leftovers for `name`. A live writer's temp folder is left alone: it is still being written."""
    removed = []
    for path in Path(parent).iterdir():
        owned = _OWNED.match(path.name)
        if not owned:
            continue
        pid = int(owned["pid"])
        if not _alive(pid) or (pid == os.getpid() and owned["name"] == name):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


# ---------------------------------------------------------------- write and verify

class NoSpaceError(OSError):
    """Not enough free space for a write; the message names the folder, the space needed and the space free."""


def free_bytes(folder: Path) -> int:
    """Free bytes on the file system that holds `folder` (or its nearest existing parent)."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MB"


def ensure_space(folder: Path, needed: int, what: str, make_room: Callable[[], bool] | None = None) -> None:
    """Raise NoSpaceError unless `needed` bytes (+5 % and 64 KB for the file system's bookkeeping) are free
    where `folder` lives. `make_room()` may delete something it can spare and return True to check again."""
    want = int(needed * 1.05) + 2**16
    while free_bytes(folder) < want:
        if make_room is None or not make_room():
            raise NoSpaceError(f"not enough space for {what} in {folder}: needs ≈ {_mb(want)}, "
                               f"{_mb(free_bytes(folder))} free. Free some space there (on Colab: your Google "
                               f"Drive), then run again; nothing written so far is lost.")


def write_folder(final: Path, fill: Callable[[Path], None], expected_bytes: int | None = None,
                 make_room: Callable[[], bool] | None = None) -> Path:
    """Write the folder `final` atomically: `fill(tmp)` writes its files (subfolders allowed) into an empty temp
    folder; then every file is fsync'ed, the manifest written last and the folder renamed into place, replacing an
    earlier version. If `fill` raises, the temp folder is removed and the earlier version stays as it was.

    With `expected_bytes`, free space is checked first (see `ensure_space`); a write that still runs out of space
    (torch reports it as "unexpected pos", not as a full disk) is re-raised as NoSpaceError naming the folder."""
    final = Path(final)
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale(parent, final.name)
    if expected_bytes is not None:
        ensure_space(parent, expected_bytes, final.name, make_room)
    tmp = parent / f".tmp-{final.name}-{os.getpid()}"
    old = parent / f".old-{final.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        fill(tmp)
        written = sorted(tmp.rglob("*"), reverse=True)  # children before their folders
        for path in written:
            fsync(path)  # fill may have written with plain writes (save_pretrained, save_file)
        manifest = {str(p.relative_to(tmp)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                    for p in sorted(written) if p.is_file()}
        write_file(tmp / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=2)))
        fsync(tmp)
        if final.exists():  # to a hidden name in one step: never a half-deleted visible folder
            os.replace(final, old)
        os.replace(tmp, final)
        fsync(parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            os.replace(old, final)
        full = isinstance(e, OSError) and e.errno == errno.ENOSPC or "unexpected pos" in str(e)
        if full and not isinstance(e, NoSpaceError):
            raise NoSpaceError(f"the disk holding {parent} filled up while writing {final.name} "
                               f"({_mb(free_bytes(parent))} free now); the previous version is kept. Free some "
                               f"space there (on Colab: your Google Drive), then run again.") from e
        raise
    shutil.rmtree(old, ignore_errors=True)
    return final


def verify(folder: Path, expected: Iterable[str] = ()) -> dict:
    """Raise FolderError unless `folder` has a manifest and every file it lists (and every name in `expected`)
    is present with the recorded size and sha256. Returns the manifest."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise FolderError(f"{folder.name}: no {MANIFEST} (the write did not finish)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FolderError(f"{folder.name}: {MANIFEST} is corrupt ({e})") from e
    if not isinstance(manifest, dict) or not all(isinstance(v, dict) and {"sha256", "bytes"} <= v.keys()
                                                  for v in manifest.values()):
        raise FolderError(f"{folder.name}: {MANIFEST} does not list files with sha256 and bytes (another format)")
    for name in dict.fromkeys([*expected, *manifest]):
        file = folder / name
        if name not in manifest or not file.is_file():
            raise FolderError(f"{folder.name}: {name} is missing")
        if file.stat().st_size != manifest[name]["bytes"] or sha256_file(file) != manifest[name]["sha256"]:
            raise FolderError(f"{folder.name}: {name} does not match its checksum (truncated or corrupt)")
    return manifest
