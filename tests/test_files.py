"""helpers.files: a folder appears complete or not at all, whatever happens to its writer; verify catches damage;
temp folders of dead writers are cleaned up, those of live writers are not."""
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.core import files

REPO = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()


def owned(kind: str, name: str, pid: int, host: str = HOST) -> str:
    return f".{kind}-{name}@{host}-{pid}"


def fill_with(contents: dict[str, bytes], fail_after: int | None = None):
    """A `fill` writing `contents` (paths may have subfolders); raises after `fail_after` files, like a full disk."""
    def fill(tmp: Path) -> None:
        for n, (name, blob) in enumerate(contents.items()):
            if n == fail_after:
                raise OSError("No space left on device")
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(blob)
    return fill


V1 = {"a.bin": b"first" * 100, "sub/b.txt": b"one", "c.json": b"{}"}
V2 = {"a.bin": b"second" * 100, "sub/b.txt": b"two", "c.json": b"[]"}


def visible(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if not p.name.startswith("."))


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_manifest_lists_every_file_with_sha256_and_size(tmp_path):
    final = files.write_folder(tmp_path / "out", fill_with(V1))
    manifest = json.loads((final / files.MANIFEST).read_text())
    assert manifest == {name: {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}
                        for name, blob in V1.items()}
    assert files.verify(final, ["a.bin"]) == manifest
    assert files.sha256_file(final / "a.bin") == hashlib.sha256(V1["a.bin"]).hexdigest()
    assert visible(tmp_path) == ["out"] and hidden(tmp_path) == []


def test_writer_failing_midway_leaves_the_previous_version(tmp_path):
    with pytest.raises(OSError, match="No space"):
        files.write_folder(tmp_path / "out", fill_with(V1, fail_after=2))
    assert visible(tmp_path) == [] and hidden(tmp_path) == []  # nothing at all, not half a folder

    final = files.write_folder(tmp_path / "out", fill_with(V1))
    with pytest.raises(OSError, match="No space"):
        files.write_folder(final, fill_with(V2, fail_after=2))
    assert visible(tmp_path) == ["out"] and hidden(tmp_path) == []
    files.verify(final)
    assert {name: (final / name).read_bytes() for name in V1} == V1  # the previous version, untouched

    files.write_folder(final, fill_with(V2))  # a complete write replaces it as a whole
    assert {name: (final / name).read_bytes() for name in V2} == V2 and hidden(tmp_path) == []


KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from helpers.core import files

def fill(tmp):
    (tmp / "a.bin").write_bytes(b"new" * 100)
    (tmp / "b.bin").write_bytes(b"new")
    os.kill(os.getpid(), signal.SIGKILL)  # a real kill: no exception handler, no cleanup runs

files.write_folder(Path(sys.argv[1]), fill)
"""


def test_killed_writer_leaves_previous_version_and_its_temp_folder_is_cleaned_next_time(tmp_path):
    final = files.write_folder(tmp_path / "out", fill_with(V1))
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(final)], cwd=REPO, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err.decode()
    assert visible(tmp_path) == ["out"] and hidden(tmp_path) == [owned("tmp", "out", proc.pid)]
    files.verify(final)
    assert (final / "a.bin").read_bytes() == V1["a.bin"]
    files.write_folder(tmp_path / "other", fill_with(V2))  # any later write in the folder removes the dead leftover
    assert hidden(tmp_path) == []


def test_verify_detects_truncation_corruption_and_missing_files(tmp_path):
    def fresh(name):
        return files.write_folder(tmp_path / name, fill_with(V1))

    truncated = fresh("truncated")
    (truncated / "a.bin").write_bytes(V1["a.bin"][:50])
    with pytest.raises(files.FolderError, match="truncated: a.bin does not match its checksum"):
        files.verify(truncated)
    flipped = fresh("flipped")  # same size, one bit different: only the sha256 can tell
    (flipped / "sub" / "b.txt").write_bytes(b"onf")
    with pytest.raises(files.FolderError, match="sub/b.txt does not match its checksum"):
        files.verify(flipped)
    no_manifest = fresh("no_manifest")
    (no_manifest / files.MANIFEST).unlink()
    with pytest.raises(files.FolderError, match="no manifest.json"):
        files.verify(no_manifest)
    broken = fresh("broken")
    (broken / files.MANIFEST).write_text('{"a.bin": ')
    with pytest.raises(files.FolderError, match="corrupt"):
        files.verify(broken)
    missing = fresh("missing")
    (missing / "c.json").unlink()
    with pytest.raises(files.FolderError, match="c.json is missing"):
        files.verify(missing)
    with pytest.raises(files.FolderError, match="d.bin is missing"):  # expected but never written
        files.verify(fresh("expected"), ["a.bin", "d.bin"])


def test_temp_folders_of_live_writers_are_kept_and_of_dead_ones_removed(tmp_path):
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()  # reaped: its PID is dead
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = [owned("tmp", "out", done.pid), owned("old", "other", done.pid), owned("tmp", "out", live.pid),
                 owned("tmp", "out", os.getpid()),  # this process's own leftover of the same folder
                 ".tmp-unrelated", ".cache"]  # not ours: no PID in the name
        for name in names:
            (tmp_path / name).mkdir()
            (tmp_path / name / "partial.bin").write_bytes(b"x")
        files.write_folder(tmp_path / "out", fill_with(V1))
        assert hidden(tmp_path) == sorted([owned("tmp", "out", live.pid), ".tmp-unrelated", ".cache"])
        assert visible(tmp_path) == ["out"]
    finally:
        live.kill()
        live.wait()
    files.write_folder(tmp_path / "out", fill_with(V2))  # its writer is gone now
    assert hidden(tmp_path) == sorted([".tmp-unrelated", ".cache"])


def test_another_hosts_temp_folder_is_stale_only_by_age(tmp_path):
    """Colab VMs share one Drive: a PID of another VM says nothing here (it may be running, or be any process of
    ours), so another host's temp folder is left alone until it has not been touched for hours."""
    dead_here = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_here.wait()
    young, old = owned("tmp", "latents-1", dead_here.pid, "other-vm"), owned("tmp", "latents-2", 1, "other-vm")
    for name in (young, old):
        (tmp_path / name / "sub").mkdir(parents=True)
        (tmp_path / name / "sub" / "part.bin").write_bytes(b"x")
    hours_ago = time.time() - files.FOREIGN_STALE_AFTER_S - 60
    for path in [tmp_path / old, *(tmp_path / old).rglob("*")]:
        os.utime(path, (hours_ago, hours_ago))
    files.write_folder(tmp_path / "out", fill_with(V1))
    assert hidden(tmp_path) == [young]  # a dead PID on THIS host would have been removed: not another host's


def test_discard_empties_every_file_before_unlinking_it(tmp_path):
    """On Drive a deleted file sits in the trash, counted against the quota, for 30 days: what the project deletes
    is cut to 0 bytes first. A descriptor still open on a discarded file sees it empty; a symlink's target is
    never touched."""
    folder = files.write_folder(tmp_path / "ckpt", fill_with(V1))
    outside = tmp_path / "keep.bin"
    outside.write_bytes(b"precious")
    (folder / "link.bin").symlink_to(outside)
    (folder / "linked-dir").symlink_to(tmp_path, target_is_directory=True)
    fd = os.open(folder / "a.bin", os.O_RDONLY)
    try:
        files.discard(folder)
        assert os.fstat(fd).st_size == 0
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.bin"] and outside.read_bytes() == b"precious"
    single = tmp_path / "single.bin"
    single.write_bytes(b"x" * 1000)
    fd = os.open(single, os.O_RDONLY)
    files.discard(single)
    assert os.fstat(fd).st_size == 0 and not single.exists()
    os.close(fd)


def test_a_replaced_folder_is_emptied_too(tmp_path):
    final = files.write_folder(tmp_path / "final", fill_with(V1))
    fd = os.open(final / "a.bin", os.O_RDONLY)
    files.write_folder(final, fill_with(V2))
    assert os.fstat(fd).st_size == 0 and hidden(tmp_path) == []
    os.close(fd)


def test_a_file_this_process_maps_is_unlinked_but_not_truncated(tmp_path):
    import mmap
    path = tmp_path / "mapped.bin"
    path.write_bytes(b"m" * 4096)
    with open(path, "rb") as f:
        view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    files.discard(path)  # truncating it would kill this process with SIGBUS at the next read below
    assert not path.exists() and view[:4] == b"mmmm"
    view.close()


def test_no_space_message_names_the_trash_and_stops_making_room_when_it_frees_nothing(tmp_path):
    calls = []

    def make_room() -> bool:  # deleting on a file system where deleting frees nothing (Drive's trash)
        calls.append(1)
        return True

    with pytest.raises(files.NoSpaceError, match="Trash") as err:
        files.ensure_space(tmp_path, 2**62, "step-000010", make_room)
    assert len(calls) == 1 and str(tmp_path) in str(err.value)
