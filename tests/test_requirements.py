"""requirements.txt against Colab's real stack (colab/stack.md): it must resolve with Colab's torch and torchvision
kept, and upgrade a Colab package only with a stated reason. The resolve test asks the package index (~15-60 s)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from packaging.version import Version


SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_colab_resolve.py"
spec = importlib.util.spec_from_file_location("check_colab_resolve", SCRIPT)
check = sys.modules.setdefault("check_colab_resolve", importlib.util.module_from_spec(spec))
spec.loader.exec_module(check)


@pytest.fixture(scope="module")
def colab():
    return check.read_pins(check.FREEZE)


def _requirements(tmp_path, text):
    path = tmp_path / "requirements.txt"
    path.write_text(text)
    return check.read_requirements(path)


def test_constraints_pin_torch_at_the_colab_freeze(colab):
    pins = check.read_pins(check.CONSTRAINTS)
    assert check.constraint_mismatches(pins, colab) == []
    assert pins["torch"] == colab["torch"] == Version("2.11.0")  # the freeze says 2.11.0+cu128: local label dropped
    assert pins["torchvision"] == Version("0.26.0") and pins["ipywidgets"] == Version("7.7.1")
    assert "open-clip-torch" not in colab and "bitsandbytes" not in colab  # what Colab lacks, we install


def test_requirements_upgrade_colab_packages_only_with_a_reason(colab, tmp_path):
    pins = check.read_pins(check.CONSTRAINTS)
    lines = check.read_requirements(check.REQUIREMENTS)
    assert check.policy_violations(lines, colab, pins) == []
    assert {"ipywidgets", "peft", "transformers", "accelerate", "ipykernel"}.isdisjoint(
        check.direct_upgrades(lines, colab))  # Colab's own versions of these are enough
    # and the rule can fail: an unexplained upgrade, or any upgrade of a package Colab must keep
    bare = _requirements(tmp_path, "peft>=0.21\n")
    assert "peft>=0.21" in check.policy_violations(bare, colab, pins)[0]
    explained = _requirements(tmp_path, "# Colab's 0.20 lacks X\npeft>=0.21\n")
    assert check.policy_violations(explained, colab, pins) == []
    torch = _requirements(tmp_path, "# Colab's is too old\ntorch>=2.12\n")
    assert "must not be reinstalled" in check.policy_violations(torch, colab, pins)[0]


def test_colab_changes_follow_only_what_is_installed(tmp_path):
    """x is new and needs b>=2 (Colab has b 1.0: upgraded) and d (new); a is kept, so a's wish for c>=5 is not
    followed: on Colab a is already installed with its dependencies satisfied."""
    freeze = {"a": Version("1.0"), "b": Version("1.0"), "c": Version("1.0")}

    def item(name, version, *requires):
        return {"metadata": {"name": name, "version": version, "requires_dist": list(requires)}}

    report = {"install": [item("x", "3.0", "b>=2", "d", "e; python_version < '3.0'"), item("a", "1.5", "c>=5"),
                          item("b", "2.1"), item("c", "5.0"), item("d", "0.1"), item("e", "1.0")]}
    lines = _requirements(tmp_path, "x>=1\na>=0.5\n")
    changes = check.colab_changes(report, lines, freeze)
    assert changes.new == ["d", "x"]  # not e: its marker is false on Colab's Python 3.13
    assert changes.upgraded == {"b": ["x 3.0 needs b>=2"]}
    assert check.reachable(report, lines, stop={"a"}) == {"x", "a", "b", "d"}


@pytest.fixture(scope="module")
def index():
    ok, where = check.index_reachable()
    if not ok:
        pytest.skip(f"the package index is unreachable ({where}): cannot resolve against Colab's stack")


@pytest.mark.slow  # resolves against the package index
def test_a_newer_torch_than_colabs_does_not_resolve(index, tmp_path):
    # past the static rule: pip itself, with Colab's torch standing in as installed, refuses to replace it
    (tmp_path / "r.txt").write_text("torch>=2.12\n")
    with pytest.raises(check.CheckFailed, match="torch"):
        check.resolve(tmp_path / "r.txt", check.CONSTRAINTS, check.read_pins(check.CONSTRAINTS))


@pytest.mark.slow  # resolves against the package index
def test_requirements_resolve_on_colab_keeping_its_torch(index, colab):
    result = check.check()
    print("\n".join(result.lines))
    resolved = result.changes.resolved
    assert resolved["torch"] == colab["torch"] and resolved["torchvision"] == colab["torchvision"]
    assert resolved["ipywidgets"] == Version("7.7.1") and "ipywidgets" not in result.changes.upgraded
    assert {"open-clip-torch", "bitsandbytes"} <= set(result.changes.new)
    assert "huggingface-hub" not in result.changes.upgraded  # Colab may have imported it: never replaced
    assert json.dumps(result.lines)  # printable summary
