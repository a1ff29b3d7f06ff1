"""The series the way Colab runs it: every notebook on its own fresh VM (fresh clone, fresh kernel in an empty
/content, a host name of its own), REPO_URL given to notebook 00 only, and nothing shared between VMs but one fake
Google Drive and the installed packages (tests/colab_vm/vms.py). This is where every notebook executes in the test
suite (once each; notebook 03 twice, as a disconnect makes a user run it).

Asserted in the tiny profile:
- 00 → 07 each run on their own VM; none writes anything in its clone (outputs/ stays empty); helpers is imported
  from that VM's clone; 00 records the repository on Drive and later VMs pin its commit (and say when the repository
  moved on); 02 reuses 01's caches; 05 and 07 list the runs of 02–04;
- a disconnect: notebook 03's 1024 px run is killed with SIGKILL after its first checkpoint is on Drive and before its
  final/ exists; run again on a fresh VM it resumes from that checkpoint and ends with the same LoRA weights as an
  uninterrupted run kept outside the fake Drive;
- the cells marked NBVAL_CHECK_OUTPUT print what tests/data/checked_outputs.json holds;
- nothing of the fake Drive or of /content/drive is left when the test ends.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).with_name("colab_vm")))
import vms  # noqa: E402

from helpers.core import presets  # noqa: E402

import reader  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("series")]
CHECKED = Path(__file__).with_name("data") / "checked_outputs.json"
RUNS_02_TO_04 = ("sd15_xattn_cifar10-crossattn-tiny", "sdxl_lora_naruto_256-lora-tiny",
                 "sdxl_lora_naruto_1024-lora-tiny", "prior_sd15-ip_adapter-tiny")
RUN_1024 = "sdxl_lora_naruto_1024-lora-tiny"


@pytest.fixture
def colab():
    why = vms.can_make_vms()
    if why:
        pytest.skip(f"the Colab-shaped VMs {why}")
    workdir = Path(tempfile.mkdtemp(prefix="colab-vms-"))
    machine = vms.Colab(workdir / "vms", log=lambda line: print(line, file=sys.__stderr__, flush=True))
    machine.upstream, machine.first_commit = vms.snapshot_repository(workdir / "upstream")
    try:
        yield machine
    finally:
        machine.close()
        shutil.rmtree(workdir, ignore_errors=True)
        assert not workdir.exists() and not Path("/content/drive").exists()


def check_vm(run: vms.VMRun) -> None:
    """What every VM must show: helpers from its own clone, its own host name, nothing written in the clone, and
    nothing in its /content but the clone and the Drive mount point."""
    if run.killed:
        return
    assert run.probe["helpers"] == f"/content/{vms.CLONE}/helpers/__init__.py", run.probe
    assert run.probe["host"] == run.name and run.probe["cwd"] == "/content"
    assert run.written_in_clone() == [], f"{run.notebook} wrote into its clone: {run.written_in_clone()[:10]}"
    assert sorted(p.name for p in (run.folder / "content").iterdir()) == ["drive", vms.CLONE]


def check_marked_outputs(run: vms.VMRun, expected: dict) -> None:
    for cell in run.nb.cells:
        if cell.cell_type == "code" and "# NBVAL_CHECK_OUTPUT" in cell.source:
            key = f"{run.notebook}: {cell.source.splitlines()[1]}"
            assert key in expected, f"no expected output for {key!r} in {CHECKED}"
            assert vms.text_of(cell) == expected[key], f"{key}: printed\n{vms.text_of(cell)}"


def test_the_series_on_fresh_colab_vms_sharing_only_drive(colab, session_runs):
    expected = json.loads(CHECKED.read_text())
    done = {}

    def run(notebook, **kw):
        result = colab.run(notebook, **kw)
        check_vm(result)
        check_marked_outputs(result, expected)
        if not result.killed:  # what a reader sees (tests/reader.py): no expected notices, few bars, real tables
            seen = reader.problems(result.nb, result.notebook)
            assert not seen, "\n".join(seen)
        done[result.name] = result
        return result

    # 00: the only notebook given REPO_URL; it records the repository and commit on Drive
    setup = run("00", fields={"REPO_URL": repr(str(colab.upstream))})
    record = json.loads((colab.storage / "repository.json").read_text())
    assert record["commit"] == colab.first_commit and "recorded on Drive" in setup.output()
    assert "Mounted at /content/drive" in setup.output()
    # the repository moves on: later VMs still run the commit 00 recorded, and say so
    (colab.upstream / "NEWS.md").write_text("a later change\n")
    later = vms.commit_all(colab.upstream, "a later change")

    dataset = run("01")
    assert "moved on" in dataset.output() and later[:10] in dataset.output()
    assert vms.subprocess.run(["git", "-C", str(dataset.clone), "rev-parse", "HEAD"], capture_output=True,
                              text=True).stdout.strip() == colab.first_commit
    assert "building cache" in dataset.output()

    crossattn = run("02")
    session_runs.adopt(colab.storage / "runs" / RUNS_02_TO_04[0])  # the learning checks reuse it (tests/conftest.py)
    prepared = crossattn.output("data.prepare_dataset(preset, components)")
    assert "reusing cache" in prepared and "building cache" not in prepared, prepared  # 01's caches, from Drive

    # a disconnect in the middle of notebook 03's 1024 px run
    run_1024 = colab.storage / "runs" / RUN_1024

    def first_checkpoint_on_drive() -> bool:
        return (run_1024 / "checkpoints" / "step-000006" / "manifest.json").is_file()

    cut = run("03", kill_when=first_checkpoint_on_drive)
    assert cut.killed, "notebook 03 ended before its first 1024 px checkpoint was seen"
    assert not (run_1024 / "final").exists(), "the kill came too late: final/ was already written"

    run("04")  # the user does something else; the dead VM's lock on the 1024 px run grows stale meanwhile
    session_runs.adopt(colab.storage / "runs" / RUNS_02_TO_04[3])
    for folder in sorted((colab.storage / "priors").iterdir()):
        session_runs.adopt(folder, under="priors")

    resumed = run("03")
    trained = resumed.output("trainer = train.Trainer(")
    assert f"resuming from step-000006" in trained and "took over a stale lock" in trained, trained
    session_runs.adopt(colab.storage / "runs" / RUNS_02_TO_04[1])
    weights = load_file(run_1024 / "final" / "pytorch_lora_weights.safetensors")
    uninterrupted = session_runs.trained(presets.get_preset("sdxl_lora_naruto_1024", "tiny"))  # not on the fake Drive
    reference = load_file(uninterrupted / "final" / "pytorch_lora_weights.safetensors")
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[k], reference[k]) for k in weights), "resumed LoRA differs from an uninterrupted run"

    for notebook in ("05", "06", "07"):
        result = run(notebook)
        if notebook != "06":  # the evaluation and the app find every run of 02-04 on Drive
            listed = result.output("studio.Catalog.scan(profile)")
            missing = [name for name in RUNS_02_TO_04 if name not in listed]
            assert not missing, f"notebook {notebook} does not list {missing}:\n{listed}"
    print("\n".join(f"{r.notebook} on {name}: {r.seconds:.0f} s" + (" (killed)" if r.killed else "")
                    for name, r in done.items()))
