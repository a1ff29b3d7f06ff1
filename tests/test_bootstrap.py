"""helpers.bootstrap, what the setup cell runs on a fresh Colab VM: the repository recorded on Drive (never a token),
the commit every later VM pins, and installing only what is missing."""
from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from helpers import bootstrap


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True, text=True).stdout.strip()


def commit(repo: Path, name: str) -> str:
    (repo / name).write_text(name)
    git(repo, "add", name)
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", name)
    return git(repo, "rev-parse", "HEAD")


@pytest.mark.parametrize("url, public", [
    ("https://user:ghp_secret@github.com/me/t4-diffusion-lab.git", "https://github.com/me/t4-diffusion-lab.git"),
    ("https://ghp_secret@github.com/me/lab", "https://github.com/me/lab"),
    ("https://github.com/me/lab", "https://github.com/me/lab"),
    ("git@github.com:me/lab.git", "git@github.com:me/lab.git"),
    ("/content/my-copy", "/content/my-copy"),
])
def test_public_url_strips_credentials(url, public):
    assert bootstrap.public_url(url) == public


def test_the_first_vm_records_the_commit_and_later_vms_pin_it(tmp_path, capsys):
    upstream = tmp_path / "upstream"
    upstream.mkdir()
    git(upstream, "init", "-q")
    first = commit(upstream, "a.txt")
    drive = tmp_path / "MyDrive" / "t4-diffusion-lab"
    (tmp_path / "MyDrive").mkdir()

    vm1 = tmp_path / "vm1"
    git(tmp_path, "clone", "-q", str(upstream), str(vm1))
    token_url = f"https://user:ghp_secret@example.com{upstream}"
    assert bootstrap.pin_commit(vm1, token_url, drive) == first
    record = (drive / bootstrap.RECORD_FILE).read_text()
    assert "ghp_secret" not in record and json.loads(record)["commit"] == first
    assert "recorded on Drive" in capsys.readouterr().out

    later = commit(upstream, "b.txt")  # the repository moves on
    vm2 = tmp_path / "vm2"
    git(tmp_path, "clone", "-q", str(upstream), str(vm2))
    assert bootstrap.pin_commit(vm2, "", drive) == first
    assert git(vm2, "rev-parse", "HEAD") == first  # the series stays on the commit 00 recorded
    out = capsys.readouterr().out
    assert "moved on" in out and later[:10] in out and "1 commits later" in out

    (tmp_path / "MyDrive").rename(tmp_path / "unmounted")  # Drive not mounted: nothing recorded, one sentence
    assert bootstrap.pin_commit(vm2, str(upstream), drive) == first
    assert "Drive is not mounted" in capsys.readouterr().out


def test_missing_requirements_are_what_this_environment_lacks(tmp_path):
    torch_version = version("torch").split("+")[0]
    req = tmp_path / "requirements.txt"
    req.write_text(f"# a comment\n-c other.txt\ntorch>={torch_version}  # satisfied\nno-such-package-xyz>=1.0\n"
                   f"torch<1.0\nonly-on-windows>=1; platform_system == 'Windows'\n")
    assert bootstrap.missing_requirements(req) == ["no-such-package-xyz>=1.0", "torch<1.0"]
    repo = Path(__file__).resolve().parents[1]
    assert bootstrap.missing_requirements(repo / "requirements.txt") == []  # this environment has everything


def test_bootstrap_imports_only_the_standard_library():
    """The setup cell imports it right after the clone, before anything is installed."""
    code = ("import sys; import helpers.bootstrap; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'diffusers')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], check=True,
                         capture_output=True, text=True).stdout
    assert out.strip() == "[]"
