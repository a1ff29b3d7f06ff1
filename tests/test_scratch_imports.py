"""The scratch models are plain PyTorch: no diffusers or transformers model class anywhere in helpers/scratch
except parity.py (the reference side of the proof). The one transformers import allowed is CLIPTokenizer."""
import re
import subprocess
import sys
from pathlib import Path

SCRATCH = Path(__file__).resolve().parents[1] / "helpers" / "scratch"
MODEL_FILES = ("attention", "clip", "convert", "ddpm", "folders", "pipeline", "unet", "vae")
IMPORT = re.compile(r"^\s*(from|import)\s+(diffusers|transformers)\b(.*)$", re.MULTILINE)


def test_no_reference_imports_in_the_scratch_source():
    files = sorted(SCRATCH.glob("*.py"))
    assert {f.stem for f in files} >= set(MODEL_FILES)
    for file in files:
        if file.stem == "parity":
            continue
        source = file.read_text()
        for match in IMPORT.finditer(source):
            statement = match.group(0).split("#")[0].strip()
            assert statement == "from transformers import CLIPTokenizer", f"{file.name}: {statement}"
        assert "parity" not in re.findall(r"^\s*from \.(\w+)", source, re.MULTILINE), f"{file.name} imports parity"


def test_importing_and_running_the_scratch_models_loads_neither_library():
    code = ("import sys, torch\n"
            + "".join(f"import helpers.scratch.{name}\n" for name in MODEL_FILES)
            + "from helpers.scratch.unet import UNet, UNetConfig\n"
            "unet = UNet(UNetConfig(channels=(32, 64), cross_attention=(True, False), layers_per_block=1, "
            "context_dim=32))\n"
            "unet(torch.randn(1, 4, 8, 8), 1, torch.randn(1, 77, 32))\n"
            "print(sorted(m for m in ('diffusers', 'transformers') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=SCRATCH.parents[1], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
