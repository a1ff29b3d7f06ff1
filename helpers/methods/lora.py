"""The `lora` method: peft LoRA on the UNet attention projections (rank, alpha, dropout and targets from the
preset), optionally on the text encoder(s). Exported in diffusers' layout (`pytorch_lora_weights.safetensors`, for
stock `pipe.load_lora_weights`) and kohya's (`lora_kohya.safetensors`, for A1111 and ComfyUI)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ..models import Components, pipeline_class
from .method import Method, cast_trainable_fp32

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default weight name
KOHYA_FILE = "lora_kohya.safetensors"


def remove_adapter(module: torch.nn.Module, name: str = "default") -> None:
    if name in (getattr(module, "peft_config", None) or {}):
        delete = getattr(module, "delete_adapters", None) or module.delete_adapter  # diffusers / transformers
        delete(name)


def fresh_adapter(module: torch.nn.Module, config) -> None:
    """Add the LoRA adapter, replacing one a stopped run left behind (re-running a cell in the same kernel would
    otherwise fail with "Adapter with name default already exists")."""
    remove_adapter(module)
    module.add_adapter(config)


class Lora(Method):
    """peft LoRA on the UNet attention projections; text-encoder LoRA when preset.train_text_encoder."""
    name = "lora"
    uses_lora = True

    def _config(self, targets):
        from peft import LoraConfig
        p = self.preset
        # Gaussian init of A and zero B, as diffusers' LoRA scripts: the model starts exactly at the base.
        return LoraConfig(r=p.lora_rank, lora_alpha=p.lora_alpha, lora_dropout=p.lora_dropout,
                          init_lora_weights="gaussian", target_modules=list(targets))

    @property
    def trains_text_encoder(self) -> bool:
        return self.preset.train_text_encoder

    def setup(self, components: Components) -> None:
        components.unet.requires_grad_(False)
        fresh_adapter(components.unet, self._config(self.preset.lora_targets))
        modules = [components.unet]
        for enc in components.text_encoders:  # an adapter a stopped run left on a text encoder goes either way
            remove_adapter(enc)
        if self.trains_text_encoder:
            if not components.text_encoders:
                raise ValueError("train_text_encoder needs the text encoders loaded")
            for enc in components.text_encoders:
                enc.requires_grad_(False)
                fresh_adapter(enc, self._config(("q_proj", "k_proj", "v_proj", "out_proj")))
            modules += components.text_encoders
        cast_trainable_fp32(modules)

    def modules(self, components: Components) -> dict[str, torch.nn.Module]:
        mods = {"unet": components.unet}
        if self.trains_text_encoder:
            mods.update({("text_encoder" if i == 0 else f"text_encoder_{i + 1}"): e
                         for i, e in enumerate(components.text_encoders)})
        return mods

    def peft_state_dicts(self, components: Components) -> dict[str, dict[str, torch.Tensor]]:
        """Module prefix → its LoRA weights in peft's key layout (lora_A / lora_B; fp32, on CPU), which
        `load_lora_weights` reads as it is. Not through diffusers' convert_state_dict_to_diffusers: that renames only
        the attention projections (to_q.lora_A → to_q.lora.down), and a file mixing both layouts (a LoRA that also
        adapts conv or feed-forward layers) loads WITHOUT its attention layers, silently."""
        from peft.utils import get_peft_model_state_dict
        return {prefix: {k: v.detach().to("cpu", torch.float32).contiguous()
                         for k, v in get_peft_model_state_dict(module).items()}
                for prefix, module in self.modules(components).items()}

    def export(self, components: Components, out_dir: Path) -> list[Path]:
        from diffusers.utils import convert_state_dict_to_kohya
        from peft.utils import get_peft_model_state_dict
        out_dir.mkdir(parents=True, exist_ok=True)
        layers = self.peft_state_dicts(components)
        modules = self.modules(components)
        kwargs = {f"{prefix}_lora_layers": sd for prefix, sd in layers.items()}
        # Dropout is saved as 0: diffusers injects loaded LoRA layers in train mode and never calls eval(), so a
        # stock pipeline would drop LoRA inputs at inference (r8 α16 dropout 0.1: outputs differ call to call)
        kwargs.update({f"{prefix}_lora_adapter_metadata": {**modules[prefix].peft_config["default"].to_dict(),
                                                           "lora_dropout": 0.0} for prefix in layers})
        pipeline_class(components.family).save_lora_weights(out_dir, **kwargs)
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
