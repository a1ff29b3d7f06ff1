"""Start one test VM's kernel, as Colab starts a notebook's runtime: run by `unshare --mount --uts` (a private mount
table and host name), it binds the VM's own folder over /content, names the host, starts in /content with a home of
its own and only the stand-in `google.colab` added to the path, then becomes the IPython kernel.

    unshare --mount --uts --propagation private python launch_kernel.py VM_DIR HOSTNAME FAKE_DRIVE SITE CONNECTION_FILE
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

vm, hostname, fake_drive, site, connection_file = sys.argv[1:6]
subprocess.run(["mount", "--bind", str(Path(vm) / "content"), "/content"], check=True)
socket.sethostname(hostname)
os.chdir("/content")
env = {k: v for k, v in os.environ.items()
       if not k.startswith(("LAB_", "PYTEST", "JPY_", "PYTHON", "COV_", "MPLBACKEND"))}
env.update(HOME=str(Path(vm) / "home"), PYTHONPATH=site, FAKE_DRIVE=fake_drive,
           COLAB_RELEASE_TAG="release-colab-test", PYTHONDONTWRITEBYTECODE="1",
           HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
os.execve(sys.executable, [sys.executable, "-m", "ipykernel_launcher", "-f", connection_file], env)
