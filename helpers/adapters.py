"""What trains, and how a batch becomes UNet conditioning. One class per method; the training loop only calls
`setup`, `trainable_parameters`, `conditioning` and `export`, so a new method (the prior of notebook 04) plugs in
with `register_method` and no change to the loop.

- `crossattn`: only the UNet cross-attention layers (`attn2`: to_q/to_k/to_v/to_out) train.
- `lora`: peft LoRA on the UNet attention projections (rank/alpha/dropout from the preset); optional LoRA on the
  text encoder(s). Exported in diffusers format (stock `pipe.load_lora_weights`) and kohya format (A1111/ComfyUI).
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .models import Components, encode_prompts, time_ids
from .presets import Preset

CROSSATTN_FILE = "crossattn_weights.safetensors"
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default weight name
KOHYA_FILE = "lora_kohya.safetensors"


def _cast_trainable_fp32(modules) -> None:
    # Frozen weights stay fp16 on a T4; trainable ones must be fp32 or GradScaler refuses to unscale them
    # ("Attempting to unscale FP16 gradients") and small updates vanish in fp16 rounding.
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                p.data = p.data.float()


class Method:
    """Base: text conditioning shared by SD1.5 and SDXL. Subclasses choose the trainable parameters."""
    name = "base"

    def __init__(self, preset: Preset):
        self.preset = preset

    # ---- what trains
    def setup(self, c: Components) -> None:
        raise NotImplementedError

    def trainable_modules(self, c: Components) -> dict[str, torch.nn.Module]:
        """Prefix → module whose requires_grad parameters train (the UNet, plus text encoders when they train)."""
        return {"unet": c.unet}

    def trainable_parameters(self, c: Components) -> dict[str, torch.nn.Parameter]:
        """Qualified name → trainable parameter; the names key checkpoints."""
        return {f"{prefix}.{name}": p for prefix, module in self.trainable_modules(c).items()
                for name, p in module.named_parameters() if p.requires_grad}

    @property
    def trains_text_encoder(self) -> bool:
        return False

    # ---- how a batch becomes conditioning
    def conditioning(self, c: Components, batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
        """UNet keyword arguments: encoder_hidden_states, and for SDXL added_cond_kwargs (text_embeds, time_ids)."""
        if "prompt_embeds" in batch:
            hidden, pooled = batch["prompt_embeds"], batch.get("pooled_prompt_embeds")
        else:
            with torch.set_grad_enabled(self.trains_text_encoder):
                hidden, pooled = encode_prompts(c.family, c.tokenizers, c.text_encoders, list(batch["caption"]))
        kwargs = {"encoder_hidden_states": hidden.to(device, dtype)}
        if c.family == "sdxl":
            size = (self.preset.resolution, self.preset.resolution)
            ids = torch.stack([time_ids(o.tolist(), ct.tolist(), size)
                               for o, ct in zip(batch["original_size"], batch["crop_top_left"])])
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(device, dtype), "time_ids": ids.to(device, dtype)}
        return kwargs

    # ---- what leaves the run
    def export(self, c: Components, out_dir: Path) -> list[Path]:
        raise NotImplementedError


class CrossAttention(Method):
    """Only `attn2` (cross-attention: queries from the image, keys/values from the text) trains: the layers that
    tie words to image regions. At full SD1.5 size that is ≈ 44M of 860M UNet parameters."""
    name = "crossattn"

    def setup(self, c: Components) -> None:
        # A second Trainer on the same components (re-running a notebook cell after a stop) starts from the base
        # attn2 weights again, not from what the stopped run left in place: resume then loads the checkpoint.
        attn2 = {n: p for n, p in c.unet.named_parameters() if ".attn2." in n}
        base = c.pristine.setdefault(self.name, {n: p.detach().to("cpu", copy=True) for n, p in attn2.items()})
        with torch.no_grad():
            for name, p in attn2.items():
                p.data = base[name].to(p.device, copy=True)  # never share storage with the snapshot
        c.unet.requires_grad_(False)
        for name, module in c.unet.named_modules():
            if name.endswith("attn2"):
                module.requires_grad_(True)
        _cast_trainable_fp32([c.unet])

    def export(self, c: Components, out_dir: Path) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / CROSSATTN_FILE
        weights = {n.removeprefix("unet."): p.detach().to("cpu", torch.float32).contiguous()
                   for n, p in self.trainable_parameters(c).items()}
        save_file(weights, path, metadata={"format": "t4-diffusion-lab crossattn", "base_model": c.model_ref})
        return [path]


def load_crossattn_weights(unet: torch.nn.Module, path: str | Path) -> None:
    """Load a `crossattn_weights.safetensors` into a stock UNet: every attn2 tensor must be present, nothing else."""
    weights = load_file(str(path))
    expected = {n for n, _ in unet.named_parameters() if ".attn2." in n}
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise KeyError(f"{path}: not a cross-attention file for this UNet; missing {missing[:5]}"
                       f"{'…' if len(missing) > 5 else ''} ({len(missing)}), unexpected {unexpected[:5]}"
                       f"{'…' if len(unexpected) > 5 else ''} ({len(unexpected)})")
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor.to(params[name].dtype))


def _remove_adapter(module: torch.nn.Module, name: str = "default") -> None:
    if name in (getattr(module, "peft_config", None) or {}):
        delete = getattr(module, "delete_adapters", None) or module.delete_adapter  # diffusers / transformers
        delete(name)


def _fresh_adapter(module: torch.nn.Module, config) -> None:
    """Add the LoRA adapter, replacing one a stopped run left behind (re-running a cell in the same kernel would
    otherwise fail with "Adapter with name default already exists")."""
    _remove_adapter(module)
    module.add_adapter(config)


class Lora(Method):
    """peft LoRA on the UNet attention projections; text-encoder LoRA when preset.train_text_encoder."""
    name = "lora"

    def _config(self, targets):
        from peft import LoraConfig
        p = self.preset
        # Gaussian init of A and zero B, as diffusers' LoRA scripts: the model starts exactly at the base.
        return LoraConfig(r=p.lora_rank, lora_alpha=p.lora_alpha, lora_dropout=p.lora_dropout,
                          init_lora_weights="gaussian", target_modules=list(targets))

    @property
    def trains_text_encoder(self) -> bool:
        return self.preset.train_text_encoder

    def setup(self, c: Components) -> None:
        c.unet.requires_grad_(False)
        _fresh_adapter(c.unet, self._config(self.preset.lora_targets))
        modules = [c.unet]
        for enc in c.text_encoders:  # an adapter a stopped run left on a text encoder goes either way
            _remove_adapter(enc)
        if self.trains_text_encoder:
            if not c.text_encoders:
                raise ValueError("train_text_encoder needs the text encoders loaded")
            for enc in c.text_encoders:
                enc.requires_grad_(False)
                _fresh_adapter(enc, self._config(("q_proj", "k_proj", "v_proj", "out_proj")))
            modules += c.text_encoders
        _cast_trainable_fp32(modules)

    def trainable_modules(self, c: Components) -> dict[str, torch.nn.Module]:
        mods = {"unet": c.unet}
        if self.trains_text_encoder:
            mods.update({("text_encoder" if i == 0 else f"text_encoder_{i + 1}"): e
                         for i, e in enumerate(c.text_encoders)})
        return mods

    def peft_state_dicts(self, c: Components) -> dict[str, dict[str, torch.Tensor]]:
        """Module prefix → its LoRA weights in diffusers key layout (fp32, on CPU)."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict
        out = {}
        for prefix, module in self.trainable_modules(c).items():
            sd = get_peft_model_state_dict(module)
            out[prefix] = {k: v.detach().to("cpu", torch.float32).contiguous()
                           for k, v in convert_state_dict_to_diffusers(sd).items()}
        return out

    def export(self, c: Components, out_dir: Path) -> list[Path]:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        from diffusers.utils import convert_state_dict_to_kohya
        from peft.utils import get_peft_model_state_dict
        out_dir.mkdir(parents=True, exist_ok=True)
        layers = self.peft_state_dicts(c)
        modules = self.trainable_modules(c)
        kwargs = {f"{prefix}_lora_layers": sd for prefix, sd in layers.items()}
        kwargs.update({f"{prefix}_lora_adapter_metadata": modules[prefix].peft_config["default"].to_dict()
                       for prefix in layers})
        pipeline_cls = StableDiffusionXLPipeline if c.family == "sdxl" else StableDiffusionPipeline
        pipeline_cls.save_lora_weights(out_dir, **kwargs)
        # Kohya layout: lora_unet_<path>.lora_down/up.weight + .alpha. diffusers' converter writes alpha = rank
        # (scale 1); ours may differ (r8 α16 → scale 2), so alpha is set from the preset.
        peft_sd = {f"{prefix}.{k}": v.detach().to("cpu", torch.float32)
                   for prefix, module in modules.items() for k, v in get_peft_model_state_dict(module).items()}
        kohya = convert_state_dict_to_kohya(peft_sd)
        for key in kohya:
            if key.endswith(".alpha"):
                kohya[key] = torch.tensor(float(self.preset.lora_alpha))
        kohya = {k: v.contiguous() for k, v in kohya.items()}
        save_file(kohya, out_dir / KOHYA_FILE, metadata={"ss_network_dim": str(self.preset.lora_rank),
                                                        "ss_network_alpha": str(self.preset.lora_alpha)})
        return [out_dir / LORA_FILE, out_dir / KOHYA_FILE]


METHODS: dict[str, type[Method]] = {"crossattn": CrossAttention, "lora": Lora}


def register_method(name: str, cls: type[Method]) -> None:
    """Add a training method (e.g. the prior-conditioned one) without touching the loop."""
    METHODS[name] = cls


def make_method(preset: Preset) -> Method:
    if preset.method not in METHODS:
        raise KeyError(f"unknown method {preset.method!r}; known: {sorted(METHODS)}")
    return METHODS[preset.method](preset)
