"""Can requirements.txt be installed on Colab's runtime without replacing what Colab ships?

pip's resolver, in dry-run mode, installs requirements.txt for Colab (CPython 3.13, manylinux x86_64 wheels up to
glibc 2.35 = Ubuntu 22.04) under colab/constraints.txt, which pins torch, torchvision, numpy and the Jupyter kernel and
widget stack at Colab's versions; metadata-only stub wheels stand in for the pinned packages, as if installed.
The check FAILS when
- colab/constraints.txt disagrees with the Colab freeze it was taken from (colab/pip-freeze.gpu.txt);
- requirements.txt asks a pinned package for more than Colab has (e.g. torch>=2.12 would replace Colab's torch);
- pip finds no resolution (some requirement needs another torch/numpy/ipykernel than Colab's, or has no cp313 wheel);
- pip's report shows a pinned package at another version (belt and braces);
- requirements.txt raises a Colab package above Colab's version without a comment above it naming Colab (the guide:
  "our requirements upgrade what they must and nothing else", and say why).
It then prints what an install on Colab changes, following pip's prefer-installed rule (Colab's version stays unless a
requirement, or a dependency of a package being installed, excludes it): the packages Colab lacks and the Colab
packages upgraded, with the versions from a second resolution in which every Colab package that stays is pinned.

    .venv/bin/python scripts/check_colab_resolve.py        # needs the package index; ~15-50 s

Limits: pip evaluates environment markers with the interpreter running it (3.11 here), not 3.13. This machine's pip
config adds a global constraint (torch<=2.14.1); it agrees with torch==2.11.0, so pip's configuration is left alone
(--isolated would also drop the machine's certificate and index settings).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "requirements.txt"
CONSTRAINTS = ROOT / "colab" / "constraints.txt"
FREEZE = ROOT / "colab" / "pip-freeze.gpu.txt"
COLAB_PYTHON = "3.13"  # colab/stack.md
COLAB_GLIBC_MINOR = 35  # Ubuntu 22.04
# Environment markers as they evaluate on Colab (for reading dependency lists; pip itself uses its own interpreter)
COLAB_MARKERS = {"python_version": COLAB_PYTHON, "python_full_version": "3.13.15", "sys_platform": "linux",
                 "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                 "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


class CheckFailed(Exception):
    pass


# ---------------------------------------------------------------- reading the files

def read_pins(path: Path) -> dict[str, Version]:
    """`name==version` lines (pip freeze or constraints) → {canonical name: version without its local label}.
    Lines installed from a URL or a git commit carry no usable version and are skipped."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" not in line or " @ " in line:
            continue
        name, version = line.split("==", 1)
        pins[canonicalize_name(name)] = Version(Version(version.strip()).public)
    return pins


@dataclass
class Line:
    requirement: Requirement
    comment: str  # the comment lines right above it, and any comment on the line itself


def read_requirements(path: Path) -> list[Line]:
    """Requirements that apply on Colab (markers evaluated for Colab), each with the comment that explains it."""
    lines, comment = [], []
    for raw in path.read_text().splitlines():
        text = raw.strip()
        if not text:
            comment = []
        elif text.startswith("#"):
            comment.append(text.lstrip("# "))
        else:
            spec, _, inline = text.partition(" #")
            req = Requirement(spec.strip())
            if req.marker is None or req.marker.evaluate(COLAB_MARKERS):
                lines.append(Line(req, " ".join(comment + [inline.strip()]).strip()))
            comment = []
    return lines


# ---------------------------------------------------------------- checks that need no network

def constraint_mismatches(constraints: dict[str, Version], freeze: dict[str, Version]) -> list[str]:
    return [f"colab/constraints.txt pins {name}=={v} but the Colab freeze has {freeze.get(name, 'no ' + name)}"
            for name, v in constraints.items() if freeze.get(name) != v]


def direct_upgrades(lines: list[Line], freeze: dict[str, Version]) -> dict[str, Line]:
    """Colab packages whose Colab version requirements.txt itself excludes: an install on Colab upgrades them."""
    return {canonicalize_name(l.requirement.name): l for l in lines
            if canonicalize_name(l.requirement.name) in freeze
            and not l.requirement.specifier.contains(freeze[canonicalize_name(l.requirement.name)], prereleases=True)}


def policy_violations(lines: list[Line], freeze: dict[str, Version], constraints: dict[str, Version]) -> list[str]:
    problems = []
    for name, line in direct_upgrades(lines, freeze).items():
        if name in constraints:
            problems.append(f"requirements.txt asks {line.requirement} but Colab ships {name} {freeze[name]}, which "
                            "must not be reinstalled (colab/constraints.txt)")
        elif "colab" not in line.comment.lower():
            problems.append(f"requirements.txt asks {line.requirement}, an upgrade of Colab's {name} {freeze[name]}: "
                            "lower the minimum to Colab's version, or say in a comment above it why Colab's is not "
                            "enough (mention Colab)")
    return problems


# ---------------------------------------------------------------- pip

def colab_platforms() -> list[str]:
    """Every manylinux tag a Colab machine accepts (pip 23 does not expand --platform to older glibc tags itself)."""
    tags = [f"manylinux_2_{minor}_x86_64" for minor in range(COLAB_GLIBC_MINOR, 4, -1)]
    return tags + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


STUB_TAG = f"cp{COLAB_PYTHON.replace('.', '')}-cp{COLAB_PYTHON.replace('.', '')}-manylinux_2_{COLAB_GLIBC_MINOR}_x86_64"


def write_stub_wheels(pins: dict[str, Version], folder: Path) -> None:
    """Colab's pinned packages as metadata-only wheels, preferred by pip over the index's (a more specific platform tag
    and a build number). pip then treats them as Colab does its installed packages: present, their own dependencies
    already satisfied. It also spares downloading ~1 GB of torch and CUDA wheels per run (this index serves no
    separate metadata files, so pip reads dependencies from whole wheels)."""
    for name, version in pins.items():
        dist = f"{name.replace('-', '_')}-{version}"
        with zipfile.ZipFile(folder / f"{dist}-1-{STUB_TAG}.whl", "w") as wheel:
            wheel.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
            wheel.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: check_colab_resolve\n"
                                                      f"Root-Is-Purelib: false\nTag: {STUB_TAG}\nBuild: 1\n")
            wheel.writestr(f"{dist}.dist-info/RECORD", "")


def pip_command(requirements: Path, constraints: Path, stubs: Path, target: Path, report: Path) -> list[str]:
    platforms = [arg for tag in colab_platforms() for arg in ("--platform", tag)]
    return [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--target", str(target),
            "--python-version", COLAB_PYTHON, "--implementation", "cp", *platforms, "--only-binary", ":all:",
            "--find-links", str(stubs), "-r", str(requirements), "-c", str(constraints), "--report", str(report),
            "--progress-bar", "off", "--no-color", "--disable-pip-version-check"]


def index_url() -> str:
    """The index pip uses here (PIP_INDEX_URL, pip config, else PyPI)."""
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"]
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.strip() in ("global.index-url", "install.index-url"):
            return value.strip().strip("'\"")
    return "https://pypi.org/simple/"


def index_reachable(timeout: float = 10) -> tuple[bool, str]:
    url = index_url().rstrip("/") + "/pip/"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status < 400, url
    except OSError as e:
        return False, f"{url}: {e}"


def resolve(requirements: Path, constraints: Path, installed: dict[str, Version]) -> dict:
    """pip's dry-run report of installing `requirements` on Colab under `constraints`, with stub wheels standing in
    for the `installed` packages; CheckFailed with pip's reason when it cannot."""
    with tempfile.TemporaryDirectory() as tmp:
        stubs, report = Path(tmp) / "stubs", Path(tmp) / "report.json"
        stubs.mkdir()
        write_stub_wheels(installed, stubs)
        proc = subprocess.run(pip_command(requirements, constraints, stubs, Path(tmp) / "target", report),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0 or not report.is_file():
            # this machine's pip config lists local folders that may not exist: their warnings are noise here
            lines = [l for l in proc.stdout.splitlines() if l.strip() and "is ignored" not in l]
            raise CheckFailed("pip cannot install requirements.txt on Colab's stack:\n  " + "\n  ".join(lines[-25:]))
        return json.loads(report.read_text())


# ---------------------------------------------------------------- what an install on Colab changes

@dataclass
class Changes:
    resolved: dict[str, Version]  # every package pip chose, by canonical name
    new: list[str] = field(default_factory=list)  # installed, not on Colab
    upgraded: dict[str, list[str]] = field(default_factory=dict)  # Colab package → who excludes Colab's version


def _dependencies(item: dict) -> list[Requirement]:
    extras = item.get("requested_extras") or [""]
    reqs = [Requirement(text) for text in item["metadata"].get("requires_dist") or []]
    return [r for r in reqs
            if r.marker is None or any(r.marker.evaluate({**COLAB_MARKERS, "extra": e}) for e in extras)]


def colab_changes(report: dict, lines: list[Line], freeze: dict[str, Version]) -> Changes:
    """pip keeps an installed version unless something being installed excludes it. Start from requirements.txt and
    follow the dependencies of every package that Colab lacks or must upgrade, until nothing more changes. Kept
    packages are not followed: Colab's own environment already satisfies their dependencies."""
    items = {canonicalize_name(i["metadata"]["name"]): i for i in report["install"]}
    changes = Changes({name: Version(i["metadata"]["version"]) for name, i in items.items()})
    asks = [(l.requirement, "requirements.txt") for l in lines]
    followed: set[str] = set()
    while asks:
        installing = []
        for req, who in asks:
            name = canonicalize_name(req.name)
            if name not in items:
                continue
            if name not in freeze:
                installing.append(name)
            elif not req.specifier.contains(freeze[name], prereleases=True):
                reasons = changes.upgraded.setdefault(name, [])
                if f"{who} needs {req}" not in reasons:
                    reasons.append(f"{who} needs {req}")
                installing.append(name)
        asks = [(req, f"{name} {changes.resolved[name]}") for name in dict.fromkeys(installing)
                if name not in followed for req in _dependencies(items[name])]
        followed |= set(installing)
    changes.new = sorted(n for n in followed if n not in freeze)
    return changes


def reachable(report: dict, lines: list[Line], stop: set[str]) -> set[str]:
    """Packages pip installs for requirements.txt, following dependencies but not through the `stop` packages."""
    items = {canonicalize_name(i["metadata"]["name"]): i for i in report["install"]}
    todo, seen = [canonicalize_name(l.requirement.name) for l in lines], set()
    while todo:
        name = todo.pop()
        if name in seen or name not in items:
            continue
        seen.add(name)
        if name not in stop:
            todo += [canonicalize_name(r.name) for r in _dependencies(items[name])]
    return seen


# ---------------------------------------------------------------- the check

@dataclass
class Result:
    lines: list[str]  # the summary to print
    changes: Changes
    exact: bool  # True when the second resolution (Colab's kept packages pinned) succeeded


def check(requirements: Path = REQUIREMENTS, constraints: Path = CONSTRAINTS, freeze: Path = FREEZE) -> Result:
    """Every check; raises CheckFailed with all the problems found.

    Pass 1 resolves under colab/constraints.txt: the hard requirement. Pass 2 resolves again with every Colab package
    that pass 1 leaves alone pinned at Colab's version, so the versions chosen for new and upgraded packages respect
    the dependencies of the packages Colab keeps (e.g. Colab's transformers caps huggingface_hub below 2)."""
    colab, pins, lines = read_pins(freeze), read_pins(constraints), read_requirements(requirements)
    problems = constraint_mismatches(pins, colab) + policy_violations(lines, colab, pins)
    if not {"torch", "torchvision"} <= set(pins):
        problems.append("colab/constraints.txt must pin torch and torchvision")
    if problems:
        raise CheckFailed("\n".join(problems))
    report = resolve(requirements, constraints, pins)
    changes = colab_changes(report, lines, colab)
    replaced = [f"{name} {pins[name]} → {changes.resolved[name]}" for name in pins
                if name in changes.resolved and changes.resolved[name] != pins[name]]
    if replaced:
        raise CheckFailed("resolution would replace Colab packages that must stay: " + ", ".join(replaced))
    torch_pins = ", ".join(f"{name}=={pins[name]}" for name in ("torch", "torchvision"))
    out = [f"requirements.txt resolves on Colab (Python {COLAB_PYTHON}) with {torch_pins}"]

    # Pass 2: everything pass 1 reaches from requirements.txt that Colab has and keeps, pinned at Colab's version
    kept = {n: colab[n] for n in reachable(report, lines, stop=set(pins)) if n in colab and n not in changes.upgraded}
    with tempfile.TemporaryDirectory() as tmp:
        kept_file = Path(tmp) / "kept.txt"
        kept_file.write_text(constraints.read_text() + "".join(f"{n}=={v}\n" for n, v in sorted(kept.items())
                                                               if n not in pins))
        try:
            changes, exact = colab_changes(resolve(requirements, kept_file, pins), lines, colab), True
        except CheckFailed as e:
            exact = False
            out.append("WARNING: with Colab's other packages kept, pip finds no resolution, so an install on Colab "
                       "upgrades more than listed below:\n  " + str(e).replace("\n", "\n  "))
    out.append(f"kept at Colab's version: {len(kept)} packages, pinned ones: {', '.join(sorted(pins))}")
    out.append("new on Colab: " + ", ".join(f"{n} {changes.resolved[n]}" for n in changes.new))
    direct = direct_upgrades(lines, colab)
    for name, why in sorted(changes.upgraded.items()):
        to = str(changes.resolved[name]) if exact else f"{changes.resolved[name]} (estimate)"
        reason = f" ({direct[name].comment})" if name in direct else ""
        out.append(f"upgraded on Colab: {name} {colab[name]} → {to}: {'; '.join(why)}{reason}")
    if not changes.upgraded:
        out.append("upgraded on Colab: nothing")
    return Result(out, changes, exact)


def main() -> int:
    start = time.monotonic()
    ok, where = index_reachable()
    if not ok:
        print(f"cannot reach the package index ({where}); the Colab resolve check needs it", file=sys.stderr)
        return 2
    try:
        result = check()
    except CheckFailed as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    print("\n".join(result.lines))
    print(f"checked in {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
