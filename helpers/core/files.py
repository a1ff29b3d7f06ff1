"""Folders that exist complete or not at all: checkpoints, latent/text caches and tiny builds are written this way.

    write_folder(final, fill)     # fill(tmp) writes the files; the folder appears only once all are on disk
    verify(final)                 # raises FolderError unless every file matches manifest.json

`write_folder` writes into a hidden temp folder beside `final`, `.tmp-<name>@<host>-<pid>`, owned by the writing
process on that machine; fsyncs every file; writes `manifest.json` (sha256 and size of every other file) LAST; then
renames the temp folder into place. A kill, a disconnect or a full Drive at any moment leaves the previous version
(or nothing) visible, never a half-written folder, and a folder with a manifest is one whose write finished.

Several Colab VMs share one Drive, so a temp folder is another writer's until proven dead: on this host, by its PID;
from another host (a VM that may still be running), only by age.

`discard` is how the project deletes (pruned checkpoints, replaced folders, stale temp folders): Google Drive keeps
deleted files in its Trash, counted against the free 15 GB for 30 days, so every regular file is first cut to 0
bytes, then unlinked: the trash then holds empty files.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import time
from collections.abc import Callable, Iterable
from pathlib import Path

MANIFEST = "manifest.json"
# `.tmp-<name>@<host>-<pid>`: the folder being written; `.old-…`: the version it replaces, until it is discarded;
# `.discard-…`: something being discarded. A host name never holds "@"; a folder name of ours never does either.
# (Before hosts were recorded: `.tmp-<name>-<pid>`, treated as another host's.)
_OWNED = re.compile(r"^\.(tmp|old|discard)-(?P<name>.+?)(?:@(?P<host>[^@]+))?-(?P<pid>\d+)$")
# Another host's temp folder untouched this long belongs to a VM that is gone (a live writer touches its files far
# more often: every checkpoint or cache file is written in seconds to minutes).
FOREIGN_STALE_AFTER_S = 6 * 3600


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

def owned_name(kind: str, name: str) -> str:
    """The hidden name of a folder this process owns beside `name`: `.<kind>-<name>@<host>-<pid>`."""
    return f".{kind}-{name}@{socket.gethostname()}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists but belongs to another user
        return True
    return True


def _last_touched(path: Path) -> float:
    """The newest modification time of `path` or anything inside it (symlinks not followed)."""
    newest = path.lstat().st_mtime
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            try:
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
            except FileNotFoundError:
                pass
    return newest


def _stale(owned: re.Match, path: Path, name: str) -> bool:
    pid = int(owned["pid"])
    if owned["host"] == socket.gethostname():
        return not _alive(pid) or (pid == os.getpid() and owned["name"] == name)
    return time.time() - _last_touched(path) > FOREIGN_STALE_AFTER_S


def remove_stale(parent: Path, name: str) -> list[Path]:
    """Discard the temp folders in `parent` whose writer is gone: on this host a dead PID (killed mid-write) or this
    process's own leftovers for `name`; from another host (another Colab VM on the same Drive) only one untouched for
    FOREIGN_STALE_AFTER_S. A live writer's temp folder is left alone: it is still being written."""
    removed = []
    for path in Path(parent).iterdir():
        owned = _OWNED.match(path.name)
        if owned and _stale(owned, path, name):
            discard(path)
            removed.append(path)
    return removed


# ---------------------------------------------------------------- delete so that Drive's trash stays empty

def _mapped_here() -> set[str]:
    """Files this process maps into memory (truncating one would kill it with SIGBUS on its next read)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return set()
    return {line.split(None, 5)[5] for line in lines if len(line.split(None, 5)) == 6}


def _empty_and_unlink(path: str, mapped: set[str]) -> None:
    """Unlink one directory entry; a regular file that nothing maps is cut to 0 bytes first (never through a
    symlink: O_NOFOLLOW, and the file type is checked on the open descriptor)."""
    if os.path.realpath(path) not in mapped:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
        except OSError:  # a symlink (ELOOP), a socket, no permission: unlink only
            fd = None
        if fd is not None:
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    os.ftruncate(fd, 0)
            finally:
                os.close(fd)
    os.unlink(path)


def discard(path: Path) -> None:
    """Delete a file or folder so that it costs no Drive quota in the trash: renamed aside first (one step, so a
    kill leaves a hidden `.discard-…` folder that `remove_stale` finishes, never a half-deleted visible one), then
    every regular file inside is truncated to 0 bytes and unlinked, symlinks unlinked without touching their target,
    folders removed. Files this process maps are unlinked without truncating."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    owned = _OWNED.match(path.name)
    if path.is_symlink() or not path.is_dir():
        _empty_and_unlink(str(path), _mapped_here())
        return
    aside = path if owned and owned.group(1) == "discard" else path.with_name(owned_name("discard", path.name))
    if aside != path:
        os.replace(path, aside)
    mapped = _mapped_here()
    for dirpath, dirnames, filenames in os.walk(aside, topdown=False):
        for name in filenames:
            _empty_and_unlink(os.path.join(dirpath, name), mapped)
        for name in dirnames:
            sub = os.path.join(dirpath, name)
            if os.path.islink(sub):  # os.walk lists a symlinked folder among dirnames but never enters it
                os.unlink(sub)
            else:
                os.rmdir(sub)
    os.rmdir(aside)


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
    where `folder` lives. `make_room()` may discard something it can spare and return True to check again; it is
    called again only while each call really frees space (on some file systems deleting frees nothing)."""
    want = int(needed * 1.05) + 2**16
    free = free_bytes(folder)
    while free < want:
        if make_room is None or not make_room():
            break
        before, free = free, free_bytes(folder)
        if free <= before:
            break
    if free < want:
        raise NoSpaceError(f"not enough space for {what} in {folder}: needs ≈ {_mb(want)}, {_mb(free)} free. "
                           f"Free some space there, then run again; nothing written so far is lost. {_TRASH_HINT}")


_TRASH_HINT = ("On Colab this is your Google Drive: files deleted there stay in its Trash and count against its "
               "quota for 30 days, so empty the Trash (drive.google.com → Trash → Empty trash) too.")


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
    tmp, old = parent / owned_name("tmp", final.name), parent / owned_name("old", final.name)
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
        _discard_quietly(tmp)
        if old.exists() and not final.exists():
            os.replace(old, final)
        full = isinstance(e, OSError) and e.errno == errno.ENOSPC or "unexpected pos" in str(e)
        if full and not isinstance(e, NoSpaceError):
            raise NoSpaceError(f"the disk holding {parent} filled up while writing {final.name} "
                               f"({_mb(free_bytes(parent))} free now); the previous version is kept. Free some "
                               f"space there, then run again. {_TRASH_HINT}") from e
        raise
    _discard_quietly(old)
    return final


def placed_by_another(error: BaseException, final: Path) -> bool:
    """Whether `write_folder(final, …)` failed only because another writer (a second process or VM on the same
    Drive) renamed the same folder into place between our check and our rename ("Directory not empty"). For folders
    whose name says what they hold (a cache key, a tiny dataset's name), that folder is as good as ours: reuse it."""
    return isinstance(error, OSError) and error.errno in (errno.ENOTEMPTY, errno.EEXIST) and Path(final).exists()


def _discard_quietly(path: Path) -> None:
    """`discard` for cleanup on the way out: a leftover is finished later by `remove_stale`, never an error now."""
    try:
        discard(path)
    except OSError:
        pass


def verify(folder: Path, expected: Iterable[str] = (), read_later: Iterable[str] = ()) -> dict:
    """Raise FolderError unless `folder` has a manifest and every file it lists (and every name in `expected`)
    is present with the recorded size and sha256. Returns the manifest. Files in `read_later` are only checked for
    presence and size here: the caller reads them with `read_verified`, which hashes the very bytes it returns."""
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
        if file.stat().st_size != manifest[name]["bytes"] or (
                name not in read_later and sha256_file(file) != manifest[name]["sha256"]):
            raise FolderError(f"{folder.name}: {name} does not match its checksum (truncated or corrupt)")
    return manifest


def read_verified(folder: Path, name: str, manifest: dict) -> bytes:
    """The bytes of `folder/name`, checked against `manifest` (from `verify`) as read: what was verified is what is
    used, in memory, never a memory map a later change to the file could alter (or truncate: SIGBUS)."""
    data = (Path(folder) / name).read_bytes()
    entry = manifest.get(name, {})
    if len(data) != entry.get("bytes") or hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise FolderError(f"{Path(folder).name}: {name} does not match its checksum (truncated or corrupt)")
    return data
