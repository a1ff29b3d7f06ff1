"""The export stage of build_tiny_world.py: trained parts → Hub-layout folders under helpers/tiny/assets/tiny_world/.

Weight files are fp16 (half the size; each value is rounded once, harmless for models this size) while configs
stay those of the fp32 models, so a plain `from_pretrained` loads fp32 on a CPU and the T4-dtype path loads fp16.
Identical weights (the VAE in three folders, the text tower in several, the fp16 variant files) are written once and
linked (relative symlinks, `link_duplicates`), so the checkout holds each tensor file once; `from_pretrained` and
safetensors follow the links.
The CLIP goes out twice from ONE set of weights: transformers' layout (tiny/clip) and open_clip's (tiny/open_clip,
with the committed tokenizer named in its config, which is the only way open_clip uses a folder's own tokenizer).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from helpers.tiny import world as tiny


def _fp16_weights(model, folder: Path, variant_too: bool = False) -> None:
    """Overwrite the weight files of a fp32 save in `folder` with fp16 ones (configs untouched)."""
    with tempfile.TemporaryDirectory() as tmp:
        model.to(torch.float16).save_pretrained(tmp)
        model.to(torch.float32)
        for weights in Path(tmp).glob("*.safetensors"):
            shutil.copy(weights, folder / weights.name)
            if variant_too:  # SDXL's Hub repo ships `variant="fp16"` files, which fp16 loading prefers
                shutil.copy(weights, folder / weights.name.replace(".safetensors", ".fp16.safetensors"))


def _save(model, folder: Path, variant_too: bool = False) -> None:
    model.save_pretrained(folder)
    _fp16_weights(model, folder, variant_too)


def open_clip_state(clip) -> dict[str, torch.Tensor]:
    """transformers CLIPModel weights → open_clip CLIP weights (same maths: q/k/v fused into in_proj, projections
    transposed, LayerNorm names)."""
    out = {"logit_scale": clip.logit_scale.detach().clone()}
    for tower, prefix, model in (("text", "", clip.text_model), ("vision", "visual.", clip.vision_model)):
        layers = model.encoder.layers
        for i, layer in enumerate(layers):
            p = f"{prefix}transformer.resblocks.{i}."
            att = layer.self_attn
            out[p + "attn.in_proj_weight"] = torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight])
            out[p + "attn.in_proj_bias"] = torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias])
            out[p + "attn.out_proj.weight"], out[p + "attn.out_proj.bias"] = att.out_proj.weight, att.out_proj.bias
            for ours, theirs in (("ln_1", layer.layer_norm1), ("ln_2", layer.layer_norm2),
                                 ("mlp.c_fc", layer.mlp.fc1), ("mlp.c_proj", layer.mlp.fc2)):
                out[p + ours + ".weight"], out[p + ours + ".bias"] = theirs.weight, theirs.bias
    text, vision = clip.text_model, clip.vision_model
    out["token_embedding.weight"] = text.embeddings.token_embedding.weight
    out["positional_embedding"] = text.embeddings.position_embedding.weight
    out["ln_final.weight"], out["ln_final.bias"] = text.final_layer_norm.weight, text.final_layer_norm.bias
    out["text_projection"] = clip.text_projection.weight.T
    out["visual.conv1.weight"] = vision.embeddings.patch_embedding.weight
    out["visual.class_embedding"] = vision.embeddings.class_embedding
    out["visual.positional_embedding"] = vision.embeddings.position_embedding.weight
    out["visual.ln_pre.weight"], out["visual.ln_pre.bias"] = vision.pre_layrnorm.weight, vision.pre_layrnorm.bias
    out["visual.ln_post.weight"], out["visual.ln_post.bias"] = vision.post_layernorm.weight, vision.post_layernorm.bias
    out["visual.proj"] = clip.visual_projection.weight.T
    return {k: v.detach().to(torch.float16).contiguous() for k, v in out.items()}


def open_clip_config() -> dict:
    model_cfg = {"embed_dim": tiny.CLIP_EMBED, "quick_gelu": True,
                 "vision_cfg": {"image_size": tiny.CLIP_IMAGE_SIZE, "layers": tiny.CLIP_LAYERS,
                                "width": tiny.CLIP_WIDTH, "head_width": tiny.CLIP_WIDTH // tiny.CLIP_HEADS,
                                "patch_size": tiny.CLIP_PATCH, "mlp_ratio": 4.0},
                 "text_cfg": {"context_length": 77, "vocab_size": len(tiny.tokenizer()), "width": tiny.CLIP_WIDTH,
                              "heads": tiny.CLIP_HEADS, "layers": tiny.CLIP_LAYERS, "mlp_ratio": 4.0,
                              # any non-empty name: with local-dir, open_clip then loads THIS folder's tokenizer
                              "hf_tokenizer_name": "tiny_clip_tokenizer"}}
    return {"model_cfg": model_cfg, "preprocess_cfg": {"mean": list(tiny.CLIP_MEAN), "std": list(tiny.CLIP_STD)}}


def export_all(work: Path) -> None:
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPModel
    out = tiny.WORLD_DIR
    for name in tiny.MODELS:
        shutil.rmtree(out / name, ignore_errors=True)
    tok = tiny.tokenizer()
    clip = CLIPModel.from_pretrained(work / "clip", dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(work / "vae")

    folder = out / "clip"
    _save(clip, folder)
    tok.save_pretrained(folder)
    size = {"shortest_edge": tiny.CLIP_IMAGE_SIZE}
    CLIPImageProcessor(size=size, crop_size={"height": tiny.CLIP_IMAGE_SIZE, "width": tiny.CLIP_IMAGE_SIZE},
                       image_mean=list(tiny.CLIP_MEAN), image_std=list(tiny.CLIP_STD)).save_pretrained(folder)

    folder = out / "open_clip"
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps(open_clip_config(), indent=2))
    save_file(open_clip_state(clip), folder / "open_clip_model.safetensors")
    tok.save_pretrained(folder)

    sd15_encoders = tiny.text_encoders(work / "clip", "sd15")
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=sd15_encoders[0], tokenizer=tok,
        unet=UNet2DConditionModel.from_pretrained(work / "unet_sd15"),
        scheduler=PNDMScheduler.from_config(tiny.SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(out / "sd15")
    for part in ("vae", "text_encoder", "unet"):
        _fp16_weights(getattr(pipe, part), out / "sd15" / part)

    sdxl_encoders = tiny.text_encoders(work / "clip", "sdxl")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=sdxl_encoders[0], tokenizer=tok, text_encoder_2=sdxl_encoders[1], tokenizer_2=tok,
        unet=UNet2DConditionModel.from_pretrained(work / "unet_sdxl"),
        scheduler=EulerDiscreteScheduler.from_config(tiny.SDXL_SCHEDULER), force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(out / "sdxl")
    for part in ("vae", "text_encoder", "text_encoder_2", "unet"):
        _fp16_weights(getattr(pipe, part), out / "sdxl" / part, variant_too=True)

    # Stand-in for madebyollin/sdxl-vae-fp16-fix: the same VAE weights (fp16 is harmless for them at this size, as
    # for the fixed real one) without force_upcast.
    vae.register_to_config(force_upcast=False)
    _save(vae, out / "sdxl-vae-fp16-fix")
    link_duplicates(out)
    for name in tiny.MODELS:
        (out / name / ".complete").write_text("written by scripts/build_tiny_world.py\n")


def link_duplicates(root: Path) -> int:
    """Replace every weight file whose bytes equal an earlier one's (in sorted path order) by a relative symlink to
    it. Returns the bytes saved."""
    import hashlib
    import os
    first: dict[str, Path] = {}
    saved = 0
    for path in sorted(root.rglob("*.safetensors")):
        if path.is_symlink():
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest not in first:
            first[digest] = path
            continue
        saved += path.stat().st_size
        path.unlink()
        path.symlink_to(os.path.relpath(first[digest], path.parent))
    return saved
