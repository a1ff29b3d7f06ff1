"""One trainer per run folder. Two trainers on one folder would interleave their checkpoints and log every step
twice, so the Trainer holds `<run>/run.lock` (host, PID, start time, heartbeat) while it runs.

A lock is stale, and taken over with a note, when its process is gone: on this host a PID that no longer runs (or
this very process: a notebook cell stopped before it could release), on another host (a Colab VM that
disconnected: Drive outlives it) a heartbeat older than STALE_AFTER_S. A live trainer refreshes its heartbeat from
a background thread, so long samples or slow steps never make its lock look stale.

Another host's lock with a fresh heartbeat is waited out, with a countdown: after a disconnect the user reopens the
notebook on a new VM within a minute or two, while the dead VM's last heartbeat is still young. If the heartbeat
moves on while we wait, that trainer is alive, and we stop with its name.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from tqdm.auto import tqdm

LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0  # how often a live trainer refreshes its lock
STALE_AFTER_S = 120.0  # another host's lock without a heartbeat for this long belongs to a dead session


class RunLocked(RuntimeError):
    """Another live trainer holds this run folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _write(path: Path, info: dict) -> None:
    tmp = path.with_name(f".{path.name}-{socket.gethostname()}-{os.getpid()}")  # VMs share Drive
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.note: str | None = None  # set when a stale lock was taken over

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _stale_reason(self, info: dict) -> str | None:
        """Why the lock `info` can be taken over, or None when its trainer may still be running."""
        here = socket.gethostname()
        if info.get("host") == here:
            if info.get("pid") == os.getpid():
                return "left by an earlier run in this process (a stopped cell)"
            if not _alive(int(info.get("pid", -1))):
                return f"its process {info.get('pid')} is gone"
            return None
        age = time.time() - float(info.get("heartbeat", 0))
        return f"no heartbeat from host {info.get('host')} for {age:.0f} s" if age > STALE_AFTER_S else None

    def _locked_message(self, info: dict) -> str:
        return (f"{self.path.parent} is in use by another trainer (host {info.get('host')}, PID {info.get('pid')}, "
                f"since {info.get('started')}): two trainers on one run folder would interleave their checkpoints. "
                f"Stop the other one, or train into another run folder.")

    def _wait_out(self, info: dict) -> dict | None:
        """Another host's lock with a fresh heartbeat: wait until STALE_AFTER_S after that heartbeat, with a
        countdown. Returns the lock as it is then (None when released); raises RunLocked if its heartbeat moves."""
        seen = float(info.get("heartbeat", 0))
        wait = max(0.0, seen + STALE_AFTER_S - time.time()) + 1.0
        bar = tqdm(total=round(wait), unit="s", desc=f"waiting for host {info.get('host')}'s lock on "
                   f"{self.path.parent.name} to expire (its VM may be gone)", leave=False)
        try:
            deadline = time.time() + wait
            while time.time() < deadline:
                time.sleep(min(1.0, max(0.0, deadline - time.time())))
                bar.n = min(bar.total, round(wait - (deadline - time.time())))
                bar.refresh()
                now = self.holder()
                if now is None:
                    return None
                if float(now.get("heartbeat", 0)) != seen or now.get("host") != info.get("host"):
                    raise RunLocked(self._locked_message(now))
        finally:
            bar.close()
        return self.holder()

    def acquire(self) -> str | None:
        """Take the lock or raise RunLocked naming the holder; returns a note when a stale lock was taken over.
        Another host's fresh lock is first waited out (see the module docstring)."""
        info = self.holder()
        if info is not None and info.get("host") != socket.gethostname() and self._stale_reason(info) is None:
            info = self._wait_out(info)
        if info is not None:
            reason = self._stale_reason(info)
            if reason is None:
                raise RunLocked(self._locked_message(info))
            self.note = f"took over a stale lock on {self.path.parent.name}: {reason}"
            print("note:", self.note)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._info = {"host": socket.gethostname(), "pid": os.getpid(),
                      "started": time.strftime("%Y-%m-%d %H:%M:%S"), "heartbeat": time.time()}
        _write(self.path, self._info)
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()
        return self.note

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            info = self.holder()
            if info is None or info.get("pid") != os.getpid() or info.get("host") != self._info["host"]:
                return  # taken over: never write over someone else's lock
            _write(self.path, {**self._info, "heartbeat": time.time()})

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        info = self.holder()
        if info is not None and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
