"""Stand-in for `google.colab.drive`: `mount` attaches the ONE shared temporary folder the test calls Drive
(FAKE_DRIVE) at `<mountpoint>/MyDrive`, as Colab attaches the user's Drive; `flush_and_unmount` detaches it."""
from __future__ import annotations

import os
from pathlib import Path

_mounted: list[Path] = []


def mount(mountpoint: str, force_remount: bool = False, timeout_ms: int = 120000, readonly: bool = False) -> None:
    target = Path(os.environ["FAKE_DRIVE"])
    link = Path(mountpoint) / "MyDrive"
    if link.is_symlink() and not force_remount:
        print(f"Drive already mounted at {mountpoint}; to attempt to forcibly remount, call "
              f"drive.mount(\"{mountpoint}\", force_remount=True).")
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        link.unlink()
    link.symlink_to(target, target_is_directory=True)
    _mounted.append(link)
    print(f"Mounted at {mountpoint}")


def flush_and_unmount(timeout_ms: int = 24 * 60 * 60 * 1000) -> None:
    for link in _mounted:
        if link.is_symlink():
            link.unlink()
    _mounted.clear()
    print("All changes made in this colab session should now be visible in Google Drive.")
