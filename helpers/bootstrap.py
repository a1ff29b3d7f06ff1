"""A fresh Colab VM: Drive's place, the repository the series runs, and what to install. Standard library only, so
the setup cell can call it right after the clone, before anything is installed.

On Colab every notebook runs in its own fresh VM (fresh clone, fresh kernel, nothing mounted); Google Drive is the
only state that outlives a disconnect or reaches the next notebook. So Drive holds, beside the runs and caches, the
record of the repository: notebook 00 (or any notebook given `REPO_URL`) writes its URL, credentials stripped, and
the commit it cloned to `MyDrive/t4-diffusion-lab/repository.json`; every later VM clones that URL, checks out
that commit, and says when the repository has moved on since.

    settle(root, repo_url)     # after the setup cell's clone: pin or record the commit, install what is missing
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

DRIVE_MOUNT = Path("/content/drive")  # where Colab mounts Google Drive (the setup cell spells it too)
DRIVE_FOLDER = DRIVE_MOUNT / "MyDrive" / "t4-diffusion-lab"  # the series' storage folder on Drive
RECORD_FILE = "repository.json"  # in DRIVE_FOLDER: {url, commit, recorded}


def is_colab() -> bool:
    """Colab, and only Colab: its kernel has google.colab imported and sets COLAB_RELEASE_TAG."""
    return "google.colab" in sys.modules or bool(os.environ.get("COLAB_RELEASE_TAG"))


# ---------------------------------------------------------------- the repository record

def public_url(url: str) -> str:
    """`url` without credentials: `https://user:token@github.com/a/b` → `https://github.com/a/b`. A path or an scp-like
    `git@host:a/b` (an SSH user, no secret) is returned as it is."""
    parts = urlsplit(url)
    if not parts.scheme or "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"git {' '.join(args)} failed in {root}: {done.stderr.strip().splitlines()[-1:]}")
    return done.stdout.strip()


def read_record(folder: Path = DRIVE_FOLDER) -> dict | None:
    path = Path(folder) / RECORD_FILE
    try:
        record = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and {"url", "commit"} <= record.keys() else None


def write_record(url: str, commit: str, folder: Path = DRIVE_FOLDER) -> Path:
    """Record the repository (credentials stripped) and the commit this series runs; atomic (rename)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RECORD_FILE
    tmp = folder / f".{RECORD_FILE}-{os.getpid()}"
    tmp.write_text(json.dumps({"url": public_url(url), "commit": commit,
                               "recorded": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1))
    os.replace(tmp, path)
    return path


def pin_commit(root: Path, repo_url: str = "", folder: Path = DRIVE_FOLDER) -> str:
    """The commit this VM runs. With `repo_url` (given in the setup cell): the clone's tip, recorded on Drive for the
    next VMs. Without: the commit recorded on Drive, checked out, with a line when the repository has moved on.
    Returns the commit."""
    root, folder = Path(root), Path(folder)
    head = _git(root, "rev-parse", "HEAD")
    record = read_record(folder)
    if repo_url:
        if not folder.parent.is_dir():  # MyDrive missing: Drive is not mounted
            print(f"Drive is not mounted: commit {head[:10]} is not recorded, so every notebook needs REPO_URL.")
            return head
        write_record(repo_url, head, folder)
        print(f"recorded on Drive: {public_url(repo_url)} at commit {head[:10]}; the next notebooks clone this commit")
        return head
    if record is None:
        return head
    if head != record["commit"]:
        _git(root, "checkout", "-q", record["commit"])
        ahead = _git(root, "rev-list", "--count", f"{record['commit']}..{head}")
        print(f"the repository has moved on since notebook 00 recorded it: this VM runs commit "
              f"{record['commit'][:10]} (recorded {record.get('recorded', '?')}), the newest is {head[:10]} "
              f"({ahead} commits later). To move the series on, run notebook 00 with REPO_URL again.")
    else:
        print(f"commit {head[:10]}, as recorded on Drive {record.get('recorded', '')}")
    return record["commit"]


# ---------------------------------------------------------------- requirements

def _requirement(line: str):
    """A requirements.txt line as a packaging Requirement, or None for comments, blanks and options."""
    from packaging.requirements import Requirement  # in every Python environment pip runs in (Colab included)
    line = line.split("#", 1)[0].strip()
    if not line or line.startswith("-"):
        return None
    req = Requirement(line)
    return req if req.marker is None or req.marker.evaluate() else None


def missing_requirements(requirements: Path) -> list[str]:
    """The lines of `requirements` this environment does not satisfy (absent, or a version outside the range)."""
    from importlib.metadata import PackageNotFoundError, version
    missing = []
    for line in Path(requirements).read_text().splitlines():
        req = _requirement(line)
        if req is None:
            continue
        try:
            installed = version(req.name)
        except PackageNotFoundError:
            missing.append(str(req))
            continue
        if req.specifier and not req.specifier.contains(installed, prereleases=True):
            missing.append(str(req))
    return missing


def _installed() -> dict[str, str]:
    from importlib.metadata import distributions
    return {re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower(): d.version for d in distributions()
            if d.metadata["Name"]}


def _imported_from(changed: list[str]) -> list[str]:
    """Which of the distributions `changed` have a module already imported in this kernel."""
    from importlib.metadata import packages_distributions
    imported = {name.split(".")[0] for name in sys.modules}
    owners = packages_distributions()
    hit = {re.sub(r"[-_.]+", "-", dist).lower() for module, dists in owners.items() if module in imported
           for dist in dists}
    return sorted(set(changed) & hit)


def install(root: Path) -> list[str]:
    """Install only what requirements.txt asks for and this VM lacks, keeping Colab's own torch and widgets
    (colab/constraints.txt). If pip had to replace a package this kernel already imported, the kernel would go on
    with the old modules: stop with one sentence saying to restart the session. Returns the lines installed."""
    root = Path(root)
    missing = missing_requirements(root / "requirements.txt")
    if not missing:
        print("requirements: all present, nothing to install")
        return []
    print(f"installing {len(missing)} requirements: {', '.join(missing)}")
    before = _installed()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing,
                    "-c", str(root / "colab" / "constraints.txt")], check=True)
    after = _installed()
    changed = [name for name, v in before.items() if after.get(name, v) != v]
    stale = _imported_from(changed)
    if stale:
        raise SystemExit(f"pip replaced {', '.join(stale)}, which this session had already imported: choose "
                         f"Runtime → Restart session, then run this notebook again from the top (nothing is "
                         f"installed a second time).")
    return missing


def settle(root: Path, repo_url: str = "") -> str:
    """What the setup cell does after its clone: pin (or record) the commit, then install what is missing."""
    commit = pin_commit(root, repo_url)
    install(root)
    return commit
