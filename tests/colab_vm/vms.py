"""Colab-shaped VMs for tests/test_colab.py. On Colab each notebook runs in its own fresh VM: a fresh clone, a fresh
kernel started in an empty /content, nothing mounted, a host name of its own; Google Drive is the only state that
outlives it. Here a VM is:

- a folder of its own bound over /content in a private mount namespace (`unshare --mount --uts`, as root), so the
  setup cell's `/content/t4-diffusion-lab` clone and `/content/drive` mount are the VM's alone;
- a host name of its own (the run lock and temp folders tell VMs apart by it);
- a kernel of the test's Python (the installed packages are shared, as Colab's preinstalled ones are) whose path has
  the stand-in `google.colab` (tests/colab_vm/site) and nothing of the test's repository;
- one "Drive" folder shared by every VM of a test, which the stand-in `drive.mount` attaches at /content/drive/MyDrive.

The notebook runs cell by cell exactly as committed, with only its form fields set (REPO_URL in 00, like a user).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SITE = HERE / "site"
CLONE = "t4-diffusion-lab"  # the setup cell clones into /content/<this>


def can_make_vms() -> str | None:
    """None when this machine can run the VMs, else why not."""
    if os.geteuid() != 0:
        return "needs root (a private mount namespace binds each VM's folder over /content)"
    if shutil.which("unshare") is None:
        return "needs util-linux's unshare"
    probe = subprocess.run(["unshare", "--mount", "--uts", "true"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"unshare refused: {probe.stderr.strip()}"


def snapshot_repository(dest: Path) -> tuple[Path, str]:
    """The working tree as a user's own copy of the repository: every tracked and untracked, not ignored file
    committed into a fresh git repository at `dest`. Returns (path, commit)."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src, dst = REPO / name, dest / name
        if not os.path.lexists(src):
            continue  # deleted in the working tree, not yet committed
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, dst)
    return dest, commit_all(dest, "the user's copy of the repository")


def commit_all(repo: Path, message: str) -> str:
    git = ["git", "-C", str(repo), "-c", "user.name=user", "-c", "user.email=user@example.com"]
    if not (repo / ".git").exists():
        subprocess.run(git + ["init", "-q", "-b", "main"], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", message], check=True)
    return subprocess.run(git + ["rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()


def text_of(cell) -> str:
    """What a reader sees of a code cell's output as text (streams, plain-text results, error lines)."""
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif out["output_type"] in ("execute_result", "display_data"):
            parts.append(out.get("data", {}).get("text/plain", ""))
        elif out["output_type"] == "error":
            parts.append(f"{out['ename']}: {out['evalue']}")
    return "".join(parts)


def set_fields(nb, fields: dict[str, str]) -> None:
    """Set Colab form fields (`NAME = value  #@param …`) as a user would, in whichever cell defines them."""
    for name, value in fields.items():
        pattern = re.compile(rf"^{name} = .*?(  #@param.*)$", re.M)
        hits = [c for c in nb.cells if c.cell_type == "code" and pattern.search(c.source)]
        assert len(hits) == 1, f"form field {name} not found once"
        hits[0].source = pattern.sub(lambda m: f"{name} = {value}{m.group(1)}", hits[0].source)


@dataclass
class VMRun:
    """One notebook on one VM: the executed notebook, what it printed, and what the VM saw."""
    name: str
    notebook: str
    folder: Path
    nb: object
    seconds: float
    killed: bool = False
    probe: dict = field(default_factory=dict)

    @property
    def clone(self) -> Path:
        return self.folder / "content" / CLONE

    def output(self, needle: str | None = None) -> str:
        """All text the notebook printed, or only that of the code cells whose source contains `needle`."""
        return "\n".join(text_of(c) for c in self.nb.cells
                         if c.cell_type == "code" and (needle is None or needle in c.source))

    def written_in_clone(self) -> list[str]:
        """Everything the VM wrote inside its clone: untracked or ignored files, and any file in outputs/."""
        status = subprocess.run(["git", "-C", str(self.clone), "status", "--porcelain", "--ignored",
                                 "--untracked-files=all"], capture_output=True, text=True, check=True).stdout
        changed = [line[3:] for line in status.splitlines()]
        outputs = [str(p.relative_to(self.clone)) for p in (self.clone / "outputs").rglob("*")
                   if p.name != ".gitkeep"]
        return sorted(set(changed + outputs))


class Colab:
    """Start VMs that share one fake Drive. `run` executes a notebook on a fresh VM and returns a VMRun."""

    def __init__(self, workdir: Path, log=print):
        self.workdir, self.log = Path(workdir), log
        self.drive = self.workdir / "drive"  # MyDrive's contents, shared by every VM
        self.drive.mkdir(parents=True)
        self.kernels = self.workdir / "kernels"
        self.count = 0
        self.created_content = not Path("/content").exists()
        Path("/content").mkdir(exist_ok=True)  # the mount point; each VM binds its own folder over it

    @property
    def storage(self) -> Path:
        return self.drive / "t4-diffusion-lab"

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
        if self.created_content:
            try:
                Path("/content").rmdir()
            except OSError:
                pass

    def _kernel_manager(self, folder: Path, hostname: str):
        from jupyter_client.kernelspec import KernelSpecManager
        from jupyter_client.manager import AsyncKernelManager  # nbclient's own: it notices a killed kernel
        spec = self.kernels / hostname / "colab-vm"
        spec.mkdir(parents=True)
        argv = ["unshare", "--mount", "--uts", "--propagation", "private", sys.executable,
                str(HERE / "launch_kernel.py"), str(folder), hostname, str(self.drive), str(SITE),
                "{connection_file}"]
        (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": f"VM {hostname}",
                                                      "language": "python"}))
        return AsyncKernelManager(kernel_name="colab-vm",
                             kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec.parent)]))

    def run(self, notebook: str, fields: dict[str, str] | None = None, kill_when=None,
            cell_timeout: int = 900) -> VMRun:
        """Execute notebooks/<notebook>*.ipynb on a fresh VM, cell by cell. `kill_when()` (polled while it runs)
        returning True kills the VM at once with SIGKILL, as a disconnect does."""
        from nbclient import NotebookClient
        self.count += 1
        path = next((REPO / "notebooks").glob(f"{notebook}*.ipynb"))
        hostname = f"vm{self.count:02d}-{notebook}"
        folder = self.workdir / hostname
        (folder / "content").mkdir(parents=True)
        (folder / "home").mkdir()
        nb = nbformat.read(path, as_version=4)
        set_fields(nb, fields or {})
        km = self._kernel_manager(folder, hostname)
        client = NotebookClient(nb, km=km, timeout=cell_timeout, kernel_name="colab-vm",
                                resources={"metadata": {"path": str(folder / "content")}})
        run = VMRun(hostname, path.name, folder, nb, 0.0)
        errors: list[BaseException] = []
        start = time.perf_counter()
        def execute() -> None:  # the kernel, its client and every cell on one thread (one event loop)
            try:
                with open(folder / "kernel.log", "wb") as log, client.setup_kernel(cleanup_kc=True, stdout=log,
                                                                                    stderr=log):
                    for index, cell in enumerate(nb.cells):
                        if cell.cell_type == "code":
                            t0 = time.perf_counter()
                            client.execute_cell(cell, index)
                            self.log(f"  {hostname} cell {index} {time.perf_counter() - t0:5.1f} s")
                    probe = nbformat.v4.new_code_cell(
                        "import json as _j, os as _o, socket as _s, helpers as _h\n"
                        "print('PROBE' + _j.dumps({'helpers': _h.__file__, 'host': _s.gethostname(), "
                        "'cwd': _o.getcwd()}))")
                    nb.cells.append(probe)  # after the notebook's own cells, then taken out again
                    client.execute_cell(probe, len(nb.cells) - 1)
                    nb.cells.pop()
                    run.probe = json.loads(text_of(probe).split("PROBE", 1)[1])
            except BaseException as e:  # noqa: BLE001 - handed to the test's thread
                errors.append(e)

        worker = threading.Thread(target=execute, name=hostname)
        worker.start()
        while worker.is_alive():
            worker.join(0.05)
            if kill_when is not None and worker.is_alive() and km.has_kernel and kill_when():
                os.killpg(km.provisioner.process.pid, signal.SIGKILL)  # the VM is gone: nothing runs in it
                run.killed = True
                self.log(f"  {hostname} killed (SIGKILL) after {time.perf_counter() - start:.0f} s")
                kill_when = None
        worker.join()
        run.seconds = time.perf_counter() - start
        out = REPO / "outputs" / "colab"
        out.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, out / f"{hostname}.ipynb")
        if errors and not run.killed:
            raise AssertionError(f"{path.name} failed on VM {hostname} (executed copy: "
                                 f"{out / (hostname + '.ipynb')}):\n{str(errors[0])[-4000:]}") from errors[0]
        self.log(f"{path.name} on {hostname}: {run.seconds:.0f} s" + (" (killed)" if run.killed else ""))
        return run
