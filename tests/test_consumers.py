"""Our LoRA files as ComfyUI, AUTOMATIC1111 and sd-scripts read them. Which names each program accepts was recorded
from its own key-map code by scripts/check_consumers.py (tests/data/consumer_keys, with the commit read); here every
key of our exports, SD1.5 and SDXL, with and without text encoders, built from the real-size architectures on the meta
device, must be among them, each module on a layer of its own."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers.core import configs, presets
from helpers.methods import lora
from helpers.models import Components

DATA = Path(__file__).with_name("data") / "consumer_keys"
CONSUMERS = ("comfyui", "a1111", "sd_scripts")
PRESETS = {"sd15": dict(name="sd15_xattn_cifar10", method="lora"), "sdxl": dict(name="sdxl_lora_naruto_1024")}


def consumer(name: str, family: str) -> dict:
    return json.loads((DATA / f"{name}-{family}.json").read_text())


def real_size_components(family: str) -> Components:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    with torch.device("meta"):
        unet = UNet2DConditionModel(**configs.UNETS[family])
        encoders = [CLIPTextModel(CLIPTextConfig(**configs.CLIP_L14_TEXT))]
        if family == "sdxl":
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**configs.OPENCLIP_BIGG_TEXT)))
    return Components(family=family, unet=unet, vae=None, text_encoders=encoders)


def real_size_preset(family: str, text_encoder: bool):
    p = dict(PRESETS[family])
    return presets.get_preset(p.pop("name"), "t4", train_text_encoder=text_encoder, **p)


_cache: dict = {}


def exported(family: str, text_encoder: bool) -> tuple[dict, dict]:
    """(kohya keys → shape, diffusers-file keys) of the t4 preset's LoRA on the real-size model."""
    if (family, text_encoder) not in _cache:
        method = lora.Lora(real_size_preset(family, text_encoder))
        c = real_size_components(family)
        method.setup(c)
        layers = method.export_layers(c)
        kohya = method.kohya_state_dict(layers, family)
        diffusers = {f"{prefix}.{k}" for prefix, sd in layers.items() for k in sd}
        _cache[family, text_encoder] = ({k: tuple(v.shape) for k, v in kohya.items()}, diffusers)
    return _cache[family, text_encoder]


def modules_and_suffixes(keys) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for k in keys:
        module, _, rest = k.partition(".")
        out.setdefault(module, set()).add("." + rest)
    return out


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("text_encoder", [False, True], ids=["unet", "unet+te"])
@pytest.mark.parametrize("name", CONSUMERS)
def test_every_kohya_key_is_accepted(name, family, text_encoder):
    kohya, _ = exported(family, text_encoder)
    data = consumer(name, family)
    modules = modules_and_suffixes(kohya)
    lost = sorted(m for m in modules if m not in data["modules"])
    assert not lost, f"{name} ({data['commit'][:10]}) drops {len(lost)} of {len(modules)} modules, e.g. {lost[:3]}"
    for m, suffixes in modules.items():
        assert suffixes == {".lora_down.weight", ".lora_up.weight", ".alpha"} <= set(data["suffixes"]) | suffixes
        assert suffixes <= set(data["suffixes"]), (name, m, suffixes)
    targets = [data["modules"][m] for m in modules]
    assert len(set(targets)) == len(targets), f"{name}: two of our modules land on one layer"
    te = [m for m in modules if m.startswith("lora_te")]
    assert bool(te) == text_encoder
    if text_encoder:  # every CLIP layer adapted: 12 × 4 (CLIP-L), + 32 × 4 (bigG)
        assert len(te) == (48 if family == "sd15" else 48 + 128)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_text_encoder_prefixes_per_family(family):
    kohya, diffusers = exported(family, True)
    te = {k.split("_text_model_")[0] for k in kohya if k.startswith("lora_te")}
    assert te == set(lora.KOHYA_TE_PREFIX[family])
    assert all("_text_model_encoder_layers_" in k for k in kohya if k.startswith("lora_te"))
    prefixes = {"sd15": {"text_encoder"}, "sdxl": {"text_encoder", "text_encoder_2"}}[family]
    te_keys = [k for k in diffusers if not k.startswith("unet.")]
    assert {k.split(".")[0] for k in te_keys} == prefixes
    assert all(k.split(".", 1)[1].startswith("text_model.encoder.layers.") for k in te_keys)
    # ComfyUI also takes the diffusers file's text-encoder keys (peft lora_A / lora_B)
    comfy = consumer("comfyui", family)
    assert all(k.rsplit(".", 2)[0] in comfy["modules"] for k in te_keys)


@pytest.mark.parametrize("family, version", [("sdxl", "SDXL"), ("sd15", "SD1")])
def test_webui_files_the_lora_under_its_version(family, version):
    """The webui's NetworkOnDisk.detect_version, as recorded: its Lora tab hides a LoRA of another version than the
    loaded checkpoint (before, every file of ours was SD1: our SDXL LoRA was hidden with an SDXL checkpoint)."""
    meta = lora.kohya_metadata(real_size_preset(family, False), family, 16, 16, "run", None)
    probes = consumer("a1111", family)["version_detection"]
    found = [p["version"] for p in probes
             if p["metadata"].get("ss_base_model_version") == meta["ss_base_model_version"]]
    assert found == [version]
    legacy = [p["version"] for p in probes if set(p["metadata"]) == {"ss_network_dim", "ss_network_alpha"}]
    assert legacy == ["SD1"]  # what the old metadata said


def test_data_files_record_their_commits():
    for name in CONSUMERS:
        for family in ("sd15", "sdxl"):
            data = consumer(name, family)
            assert len(data["commit"]) == 40 and data["family"] == family and data["modules"]


def test_kohya_file_name_is_the_run_name():
    assert lora.kohya_file_name("sdxl_lora_naruto_1024-t4") == "sdxl_lora_naruto_1024-t4.safetensors"
    assert lora.kohya_file_name("my run/2") == "my_run_2.safetensors"


def test_where_files_go_names_each_program(tmp_path):
    from safetensors.torch import save_file
    final = tmp_path / "final"
    final.mkdir()
    save_file({"x": torch.zeros(1)}, final / lora.LORA_FILE)
    save_file({"x": torch.zeros(1)}, final / "my-run.safetensors",
              metadata=lora.kohya_metadata(real_size_preset("sdxl", False), "sdxl", 16, 16, "my-run", None))
    text = lora.where_files_go(final)
    assert "models/loras/" in text and "models/Lora/" in text and "<lora:my-run:1>" in text and "SDXL" in text
    assert lora.LORA_FILE in text
    (final / "my-run.safetensors").unlink()
    assert "cross-attention" in lora.where_files_go(final) and "method='lora'" in lora.where_files_go(final)
