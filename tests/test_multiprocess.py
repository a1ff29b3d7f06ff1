"""More than one GPU: the same training under `accelerate launch` with two processes (two gloo ranks on a CPU)
gives disjoint batches per rank, checkpoints and resumes, and ends with the weights of a one-process run with the
same global batch (per-sample draws are keyed by sample, not by process)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers.train import checkpoint
from helpers.train.hooks import read_log

pytestmark = pytest.mark.slow

DRIVER = Path(__file__).with_name("multiprocess_driver.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(run_dir: Path, storage: Path, processes: int, batch_size: int, max_steps: int) -> None:
    args = [str(DRIVER), str(run_dir), str(storage), "--batch-size", str(batch_size), "--max-steps", str(max_steps)]
    # ACCELERATE_USE_CPU=1 with --multi_gpu gives real gloo ranks on a CPU; `--cpu --num_processes 2` starts one
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    if processes == 1:
        cmd = [sys.executable, *args]
    else:
        accelerate = str(Path(sys.executable).with_name("accelerate"))
        cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def seen(run_dir: Path, rank: int) -> list[tuple[int, int]]:
    return [tuple(x) for x in json.loads((run_dir / f"seen-rank{rank}.json").read_text())]


def test_two_processes_see_disjoint_batches_resume_and_match_one_process(tmp_path):
    storage, two, one = tmp_path / "storage", tmp_path / "two", tmp_path / "one"
    launch(two, storage, processes=2, batch_size=2, max_steps=2)
    first = [seen(two, 0), seen(two, 1)]
    assert set(first[0]).isdisjoint(first[1]) and len(first[0]) == len(first[1]) > 0
    assert [p.name for p in checkpoint.checkpoint_dirs(two)] == ["step-000002"]  # written once, by the main rank
    launch(two, storage, processes=2, batch_size=2, max_steps=4)  # resumes from step 2 in both ranks
    second = [seen(two, 0), seen(two, 1)]
    assert set(second[0]).isdisjoint(second[1])
    assert [r["step"] for r in read_log(two) if "loss" in r] == [1, 2, 3, 4]  # logged once per step

    launch(one, storage, processes=1, batch_size=4, max_steps=4)  # the same global batch of 4 × 2 accumulation
    assert set(seen(one, 0)) == set(first[0] + first[1] + second[0] + second[1])

    a = load_file(str(checkpoint.checkpoint_dirs(two)[-1] / "trainable.safetensors"))
    b = load_file(str(checkpoint.checkpoint_dirs(one)[-1] / "trainable.safetensors"))
    assert a.keys() == b.keys() and any("lora_B" in k and v.abs().sum() > 0 for k, v in a.items())
    # Equal up to float summation order (a mean of 4 vs the average of two means of 2, DDP's all-reduce), which
    # Adam's normalisation turns into weight differences proportional to the learning rate (the driver's is 2e-5).
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"two processes vs one: max |Δweight| = {worst:.2e}")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
