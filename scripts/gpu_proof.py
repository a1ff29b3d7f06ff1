"""Measure the T4 plan on a CUDA GPU: every t4 preset × phase on full-size random-weight models, beside the plan.

    python scripts/gpu_proof.py                         # CUDA: every t4 preset, then the tiny world end to end
                                                        #   → colab/gpu_proof-<gpu>.json + .md, row by row
    python scripts/gpu_proof.py --only prior_sd15       # fill gaps: measure these presets again, keep the other rows
    python scripts/gpu_proof.py                         # no CUDA: the CPU smoke (widths ÷ 8, T4-dtype mode)
                                                        #   → outputs/gpu_proof/gpu_proof-cpu-smoke.json + .md
    python scripts/gpu_proof.py --pack-wheels wheels/   # the wheels a lent GPU machine lacks (see README)

What each phase runs and what the columns mean: helpers/proof/ (its __init__). A GPU run writes into colab/ (commit it: the
plan's error band, helpers.plan.calibration, is to be calibrated from committed reports); the smoke never does.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata as metadata
import re
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
# What a lent machine lacks (it has torch, transformers, peft and accelerate): the pure-Python wheels and
# bitsandbytes with only the CUDA library its torch loads.
CARRIED = ("diffusers", "open_clip_torch", "ftfy", "wcwidth", "bitsandbytes")  # open_clip also needs torchvision
BUDGET_MIB = 64


# ---------------------------------------------------------------- wheels to carry

def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def pack_wheel(dist_name: str, out: Path, cuda: list[str]) -> Path:
    """A wheel rebuilt from this machine's installed distribution `dist_name` (its RECORD's files, no caches), with
    only the libbitsandbytes_cuda<v>.so of `cuda` (and the CPU one) for bitsandbytes."""
    dist = metadata.distribution(dist_name)
    root = Path(dist.locate_file(""))
    info = next(f for f in dist.files if f.parts[0].endswith(".dist-info"))
    info_dir = info.parts[0]
    tag = re.search(r"^Tag: (.+)$", (root / info_dir / "WHEEL").read_text(), re.M).group(1)
    name = re.sub(r"[-.]+", "_", dist.metadata["Name"]).lower()
    wheel = out / f"{name}-{dist.version}-{tag}.whl"
    keep_lib = {f"libbitsandbytes_cuda{v.replace('.', '')}.so" for v in cuda} | {"libbitsandbytes_cpu.so"}
    records = []
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(dist.files, key=str):
            path = str(f)
            if ("__pycache__" in f.parts or path.endswith(".pyc") or f.parts[0] == ".." or
                    f.name in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")):
                continue
            if f.name.startswith("libbitsandbytes_") and f.name not in keep_lib:
                continue
            full = root / f
            if not full.is_file():
                continue
            data = full.read_bytes()
            z.writestr(path, data)
            records.append(_record_line(path, data))
        records.append(f"{info_dir}/RECORD,,")
        z.writestr(f"{info_dir}/RECORD", "\n".join(records) + "\n")
    return wheel


def pack_wheels(out: Path, cuda: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    wheels = [pack_wheel(name, out, cuda) for name in CARRIED]
    tree = sum((REPO / p).stat().st_size for p in _tracked_files())
    total = sum(w.stat().st_size for w in wheels) + tree
    for w in wheels:
        print(f"{w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
    print(f"wheels + the tracked tree = {total / 2**20:.1f} MiB of the {BUDGET_MIB} MiB a device call carries")
    if total > BUDGET_MIB * 2**20:
        raise SystemExit("too large to carry: pack fewer CUDA libraries (--cuda)")
    print(f"on the device: pip install --no-deps --no-index --target .carried {out}/*.whl && "
          f"PYTHONPATH=.carried python scripts/gpu_proof.py")


def _tracked_files() -> list[str]:
    import subprocess
    done = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    return [p for p in done.stdout.splitlines() if (REPO / p).is_file()]


# ---------------------------------------------------------------- the proof

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", metavar="PRESET", help="measure only this t4 preset (repeatable); "
                    "the report's other rows are kept")
    ap.add_argument("--out", type=Path, help="report folder (default: colab/ on CUDA, outputs/gpu_proof/ for the "
                    "CPU smoke)")
    ap.add_argument("--work", type=Path, help="scratch folder: caches, runs, pictures (default: a temporary one)")
    ap.add_argument("--smoke", action="store_true", help="the CPU smoke even where CUDA is present")
    ap.add_argument("--steps", type=int, help="training steps timed per preset (GPU default 3)")
    tiny = ap.add_mutually_exclusive_group()
    tiny.add_argument("--tiny-world", dest="tiny_world", action="store_true", default=None,
                      help="also run the tiny world end to end (default: on CUDA without --only)")
    tiny.add_argument("--no-tiny-world", dest="tiny_world", action="store_false")
    ap.add_argument("--pack-wheels", type=Path, metavar="DIR", help="write the wheels to carry to a lent GPU and stop")
    ap.add_argument("--cuda", default="", help="CUDA versions of the bitsandbytes libraries to pack, e.g. 12.8,13.0 "
                    "(default: this torch's)")
    args = ap.parse_args()

    import torch
    if args.pack_wheels:
        pack_wheels(args.pack_wheels, [v for v in args.cuda.split(",") if v] or [torch.version.cuda or "12.8"])
        return

    from helpers.proof import run_proof
    smoke = args.smoke or not torch.cuda.is_available()
    out = args.out or (REPO / "outputs" / "gpu_proof" if smoke else REPO / "colab")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_proof-") as tmp:
        work = args.work or Path(tmp)
        import os
        os.environ.setdefault("LAB_STORAGE", str(work / "storage-root"))  # the tiny world's pictures, no Drive
        path = run_proof(out, work, only=args.only, smoke=smoke, tiny_world=args.tiny_world, steps=args.steps)
    print(f"wrote {path} and {path.with_suffix('.md')} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
