"""Tiny models: the real component classes, the Hub layout, loadable by the stock pipelines, committed; generated
data deterministic."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.core import files
from helpers.evaluation import prompts
from helpers.tiny import world as tiny


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


def test_models_are_committed_read_only_folders_in_the_repo():
    for name in tiny.MODELS:
        path = Path(tiny.resolve(f"tiny/{name}"))
        assert path.parent == tiny.WORLD_DIR and (path / ".complete").is_file(), name
    # the SDXL-like model ships fp16 variant files as the real repository does (fp16 loading prefers them)
    assert (Path(tiny.resolve("tiny/sdxl")) / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()


def test_committed_weights_fit_the_budget():
    """≤ 25 MB of distinct file contents (git stores identical files, e.g. the shared VAE, once)."""
    import hashlib
    unique = {hashlib.sha1(p.read_bytes()).hexdigest(): p.stat().st_size
              for p in tiny.WORLD_DIR.rglob("*") if p.is_file()}
    total = sum(unique.values()) / 1e6
    print(f"tiny world: {total:.1f} MB in {len(unique)} distinct files")
    assert total <= 25


def test_dataset_folders_are_deterministic_and_reused(tmp_path, monkeypatch):
    shared = Path(tiny.resolve("tiny/cifar10"))
    monkeypatch.setenv("LAB_TINY_DIR", str(tmp_path))
    fresh = Path(tiny.resolve("tiny/cifar10"))
    assert fresh.parent == tmp_path
    names = sorted(p.name for p in (shared / "train").iterdir())
    assert names == sorted(p.name for p in (fresh / "train").iterdir()) and len(names) == 241
    assert all((shared / "train" / n).read_bytes() == (fresh / "train" / n).read_bytes() for n in names)
    mtime = (fresh / "train" / "metadata.jsonl").stat().st_mtime
    tiny.resolve("tiny/cifar10")
    assert (fresh / "train" / "metadata.jsonl").stat().st_mtime == mtime  # built once, then reused
    manifest = files.verify(fresh)  # written atomically, with a manifest of every file in every subfolder
    assert "train/metadata.jsonl" in manifest and ".tiny_build" in manifest
    assert [p.name for p in tmp_path.iterdir()] == ["cifar10"]  # no temp folder left behind


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
    assert clip.config.projection_dim == tiny.CLIP_EMBED
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + tiny.resolve("tiny/open_clip"))
    assert tuple(np.atleast_1d(model.visual.image_size))[0] == tiny.CLIP_IMAGE_SIZE


def test_generated_sets_are_distinct_and_the_general_set_shows_no_fine_tuning_subject():
    """The base models pretrain on the general set only, so fine-tuning has something to add: its captions never
    name a CIFAR class or the anime style, and by the tiny CLIP its pictures show neither. Judged on fresh pictures
    of each set: how well a picture matches its best CIFAR class prompt, and its best Naruto-like caption (60
    held-out ones); AUC = the chance that a picture of the subject's own set scores above a general one."""
    import random

    from helpers.core.presets import CIFAR10_CLASSES
    from helpers.evaluation import clip_score as evaluate
    from helpers.tiny import pictures as tiny_data
    rng = random.Random(tiny_data.HELD_OUT_SEED + 9)
    general = [tiny_data.draw_general(rng, 64) for _ in range(60)]
    words = set(CIFAR10_CLASSES) | {"ninja", "anime", "cartoon", "hair", "character"}
    assert not any(w in caption.split() for _, caption in general for w in words)
    cifar = [tiny_data.draw_cifar(CIFAR10_CLASSES[k % 10], rng) for k in range(60)]
    naruto = [tiny_data.draw_naruto(rng)[0] for _ in range(60)]
    captions, caption_rng = set(), random.Random(tiny_data.HELD_OUT_SEED + 11)
    while len(captions) < 60:
        captions.add(tiny_data.draw_naruto(caption_rng, 16)[1])
    scorer = evaluate.ClipScorer.from_profile("tiny", device="cpu")
    normalize = torch.nn.functional.normalize

    def best_match(images, texts):
        features, text = normalize(scorer.image_features(images), dim=-1), normalize(scorer.text_features(texts), dim=-1)
        return (100 * features @ text.T).max(dim=1).values

    def auc(subject, others):
        return (subject[:, None] > others[None, :]).float().mean().item()

    class_prompts = list(prompts.cifar_prompts("train", n_templates=1).prompts)  # "a photo of a(n) <class>"
    pictures = [im for im, _ in general]
    cifar_auc = auc(best_match(cifar, class_prompts), best_match(pictures, class_prompts))
    naruto_auc = auc(best_match(naruto, sorted(captions)), best_match(pictures, sorted(captions)))
    print(f"tiny CLIP: CIFAR-like over general pictures on class prompts AUC {cifar_auc:.3f}, Naruto-like over "
          f"general on Naruto-like captions AUC {naruto_auc:.3f}")
    assert cifar_auc >= 0.95 and naruto_auc >= 0.9


def test_two_processes_drawing_the_same_dataset_at_once_both_get_it(tmp_path, monkeypatch):
    # a clean clone under two test workers (or two notebooks on one Drive): both draw tiny/cifar10, and the other
    # one's rename lands between our check and ours ("Directory not empty"); its folder is the same data: used
    monkeypatch.setenv("LAB_TINY_DIR", str(tmp_path))
    final, real_replace = tmp_path / "race", files.os.replace

    def other_process_first(src, dst):
        if Path(dst) == final and not final.exists():
            final.mkdir()
            (final / "a.txt").write_text("theirs")
            (final / ".tiny_build").write_text(tiny.DATA_VERSION)
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", other_process_first)
    assert tiny._build_once("race", lambda tmp: (tmp / "a.txt").write_text("ours")) == final
    assert (final / "a.txt").read_text() == "theirs" and [p.name for p in tmp_path.iterdir()] == ["race"]
