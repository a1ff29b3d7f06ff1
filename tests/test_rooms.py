"""The shape of helpers/: rooms in import order, each importing only rooms before it; no `_private` name crosses a file;
no helpers import hides inside a function (an import under TYPE_CHECKING is for types only). The checker is run on
the tree and on a copy with a planted upward import, so the rule is known to bite."""
from __future__ import annotations

import ast
import shutil
import tomllib
from pathlib import Path

import pytest

from helpers.core import paths

HELPERS = Path(__file__).resolve().parents[1] / "helpers"
# import order: a room may import the rooms before it (and itself), never one after it
ORDER = ["bootstrap", "core", "tiny", "models", "data", "generate", "methods", "train", "evaluation", "prior", "plan",
         "proof", "studio", "scratch"]


def module_name(root: Path, file: Path) -> str:
    parts = file.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def rule_breaks(root: Path) -> list[str]:
    """Every break of the room rules in the package at `root`, one line each."""
    breaks = []
    modules = {module_name(root, f) for f in root.rglob("*.py") if "assets" not in f.parts}
    for file in sorted(root.rglob("*.py")):
        if "assets" in file.parts:
            continue
        here = module_name(root, file)
        tree = ast.parse(file.read_text())
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(block.test) for stmt in block.body for n in ast.walk(stmt)}
        top_level = {id(n) for n in tree.body}
        module_aliases = {}
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or id(node) in typing_only:
                continue
            if node.level:
                base = here.split(".") if file.name == "__init__.py" else here.split(".")[:-1]
                target = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == root.name:
                target = node.module
            else:
                continue
            where = f"{file.relative_to(root.parent)}:{node.lineno}"
            for alias in node.names:
                full = f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target
                if full in modules and full != target:
                    module_aliases[alias.asname or alias.name] = full
                mine, theirs = room_of(here), room_of(full)
                unknown = [r for r in (mine, theirs) if r and r not in ORDER]
                if unknown:
                    breaks.append(f"{where}: {here} imports {full}: {unknown[0]} is not a room (see ORDER)")
                elif mine and theirs and ORDER.index(theirs) > ORDER.index(mine):
                    breaks.append(f"{where}: {here} imports {full}, a later room")
                if alias.name.startswith("_"):
                    breaks.append(f"{where}: {here} imports the private name {alias.name} from {target}")
            if id(node) not in top_level:
                breaks.append(f"{where}: {here} imports {target} inside a function")
        for node in ast.walk(tree):  # module._private across files
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in module_aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                breaks.append(f"{file.relative_to(root.parent)}:{node.lineno}: {here} uses the private name "
                              f"{node.value.id}.{node.attr}")
    return breaks


def test_helpers_keeps_the_room_rules():
    assert rule_breaks(HELPERS) == []


def test_the_rule_check_finds_a_planted_upward_import_private_name_and_lazy_import(tmp_path):
    copy = tmp_path / "helpers"
    shutil.copytree(HELPERS, copy, ignore=shutil.ignore_patterns("assets", "__pycache__"))
    runtime = copy / "core" / "runtime.py"
    runtime.write_text(runtime.read_text() + "\nfrom ..studio.engine import Engine  # planted\n"
                       "from .files import _OWNED  # planted\n\n\ndef planted():\n    from ..data import caches\n")
    found = rule_breaks(copy)
    assert any("helpers.core.runtime imports helpers.studio.engine, a later room" in b for b in found), found
    assert any("private name _OWNED" in b for b in found), found
    assert any("imports helpers.data inside a function" in b for b in found), found


def test_every_room_says_what_it_owns():
    rooms = sorted(p for p in HELPERS.iterdir() if (p / "__init__.py").is_file())
    assert [p.name for p in rooms] == sorted(r for r in ORDER if (HELPERS / r).is_dir())
    for room in rooms:
        doc = ast.get_docstring(ast.parse((room / "__init__.py").read_text()))
        assert doc and len(doc) > 80, f"{room.name}/__init__.py needs a docstring saying what the room owns"
    entries = [p for p in HELPERS.iterdir() if p.suffix == ".py" and p.name != "__init__.py"] + rooms
    assert len(entries) <= 15, sorted(p.name for p in entries)


def test_paths_that_hang_on_a_files_depth_point_at_the_repository():
    assert (paths.REPO_ROOT / "README.md").is_file() and (paths.REPO_ROOT / "helpers").is_dir()
    assert (paths.TINY_ASSETS / "tiny_world").is_dir()


def test_pyproject_finds_every_subpackage():
    setuptools = pytest.importorskip("setuptools")
    config = tomllib.loads((HELPERS.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set(setuptools.find_packages(str(HELPERS.parent), include=config["packages"]["find"]["include"]))
    on_disk = {module_name(HELPERS, f) for f in HELPERS.rglob("__init__.py") if "assets" not in f.parts}
    assert found == on_disk
