"""Tiny models: the real component classes, the Hub layout, loadable by the stock pipelines, deterministic."""
import json
from pathlib import Path

import pytest
import torch

from helpers import files, tiny


def test_sd15_layout_and_generation():
    from diffusers import StableDiffusionPipeline
    path = Path(tiny.resolve("tiny/sd15"))
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (path / sub).is_dir(), sub
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    pipe = StableDiffusionPipeline.from_pretrained(path)
    out = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3) and out.std() > 0
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size


def test_sdxl_keeps_sdxl_structure():
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection
    path = Path(tiny.resolve("tiny/sdxl"))
    for sub in ("text_encoder_2", "tokenizer_2"):
        assert (path / sub).is_dir()
    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    cfg = pipe.unet.config
    assert cfg.addition_embed_type == "text_time"
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert cfg.down_block_types[0] == "DownBlock2D" and cfg.up_block_types[-1] == "UpBlock2D"
    assert list(cfg.transformer_layers_per_block) == sorted(cfg.transformer_layers_per_block)  # deeper lower down
    assert cfg.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert cfg.projection_class_embeddings_input_dim == (pipe.text_encoder_2.config.projection_dim
                                                         + 6 * cfg.addition_time_embed_dim)
    out = pipe("a cartoon", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert out.shape == (1, 64, 64, 3)


def test_builds_are_deterministic_and_reused(tmp_path, monkeypatch):
    from safetensors.torch import load_file
    shared = Path(tiny.resolve("tiny/sd15"))
    monkeypatch.setenv("LAB_TINY_DIR", str(tmp_path))
    fresh = Path(tiny.resolve("tiny/sd15"))
    assert fresh.parent == tmp_path
    a = load_file(str(shared / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(fresh / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    mtime = (fresh / "model_index.json").stat().st_mtime
    tiny.resolve("tiny/sd15")
    assert (fresh / "model_index.json").stat().st_mtime == mtime  # built once, then reused
    manifest = files.verify(fresh)  # written atomically, with a manifest of every file in every subfolder
    assert "unet/diffusion_pytorch_model.safetensors" in manifest and ".tiny_build" in manifest
    assert [p.name for p in tmp_path.iterdir()] == ["sd15"]  # no temp folder left behind


def test_tokenizer_is_committed_and_clip_like():
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(tiny.TOKENIZER_DIR)
    ids = tok("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == tok.bos_token_id and tok.eos_token_id in ids
    assert tok.model_max_length == 77


def test_hub_ids_pass_through_and_unknown_tiny_names_fail():
    assert tiny.resolve("stabilityai/stable-diffusion-xl-base-1.0") == "stabilityai/stable-diffusion-xl-base-1.0"
    with pytest.raises(KeyError, match="known"):
        tiny.resolve("tiny/nope")


def test_clip_pair_and_open_clip_load():
    import open_clip
    from transformers import CLIPModel
    clip = CLIPModel.from_pretrained(tiny.resolve("tiny/clip"))
    assert clip.config.projection_dim == 32
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + tiny.resolve("tiny/open_clip"))
    assert model.visual.image_size == (32, 32) or model.visual.image_size == 32
