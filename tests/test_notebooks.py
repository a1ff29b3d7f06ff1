"""The notebooks as files: one setup cell for all, a failed clone explained in one line, outputs stripped."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def code_cells(path: Path) -> list[dict]:
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def test_every_notebook_starts_with_the_same_setup_cell():
    reference = "".join(code_cells(NOTEBOOKS[0])[0]["source"])
    assert "REPO_URL" in reference and "bootstrap.settle(ROOT, REPO_URL)" in reference
    for path in NOTEBOOKS:
        assert "".join(code_cells(path)[0]["source"]) == reference, (
            f"{path.name}: setup cell differs from {NOTEBOOKS[0].name}; run scripts/sync_setup_cell.py")


def test_the_setup_cell_mounts_and_reads_drive_where_helpers_says():
    """The setup cell runs before the clone, so it spells Drive's mount point and the repository record itself."""
    from helpers import bootstrap
    source = "".join(code_cells(NOTEBOOKS[0])[0]["source"])
    assert f'drive.mount("{bootstrap.DRIVE_MOUNT}")' in source
    assert f'Path("{bootstrap.DRIVE_FOLDER / bootstrap.RECORD_FILE}")' in source
    assert source.index("drive.mount(") < source.index('"git", "clone"')  # Drive first: nothing written before it


def test_a_failed_clone_says_what_to_set_in_one_line(tmp_path):
    source = "".join(code_cells(NOTEBOOKS[0])[0]["source"])
    source = source.replace('REPO_URL = ""', f'REPO_URL = "{tmp_path / "no-such-repo.git"}"')
    if Path("/content/t4-diffusion-lab/helpers").is_dir():
        pytest.skip("a clone already exists at /content/t4-diffusion-lab")
    run = subprocess.run([sys.executable, "-c", source], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    message = run.stderr.strip()
    assert message.count("\n") == 0 and message.startswith("could not clone REPO_URL=")
    assert "README" in message


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_are_stripped(path):
    for cell in code_cells(path):
        assert not cell.get("outputs") and not cell.get("execution_count"), "".join(cell["source"])[:60]
