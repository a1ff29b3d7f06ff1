"""The `crossattn` method: only the UNet's cross-attention layers (`attn2`: to_q/to_k/to_v/to_out) train, the layers
that tie words to image regions; exported as `crossattn_weights.safetensors` (attn2 tensors by their stock names),
and the functions that read such a file back into a stock UNet and restore the UNet's own attn2 weights."""
from __future__ import annotations

import weakref
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..models import Components
from .method import Method, cast_trainable_fp32

CROSSATTN_FILE = "crossattn_weights.safetensors"


class CrossAttention(Method):
    """Only `attn2` (cross-attention: queries from the image, keys/values from the text) trains: the layers that
    tie words to image regions. At full SD1.5 size that is ≈ 44M of 860M UNet parameters."""
    name = "crossattn"

    def setup(self, components: Components) -> None:
        # A second Trainer on the same components (re-running a notebook cell after a stop) starts from the base
        # attn2 weights again, not from what the stopped run left in place: resume then loads the checkpoint.
        attn2 = {n: p for n, p in components.unet.named_parameters() if ".attn2." in n and not p.is_meta}
        base = components.pristine.setdefault(self.name, {n: p.detach().to("cpu", copy=True) for n, p in attn2.items()})
        with torch.no_grad():
            for name, p in attn2.items():
                p.data = base[name].to(p.device, copy=True)  # never share storage with the snapshot
        components.unet.requires_grad_(False)
        for name, module in components.unet.named_modules():
            if name.endswith("attn2"):
                module.requires_grad_(True)
        cast_trainable_fp32([components.unet])

    def export(self, components: Components, out_dir: Path, run=None) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / CROSSATTN_FILE
        weights = {n.removeprefix("unet."): p.detach().to("cpu", torch.float32).contiguous()
                   for n, p in self.trainable_parameters(components).items()}
        save_file(weights, path, metadata={"format": "t4-diffusion-lab crossattn", "base_model": components.model_ref})
        return [path]


_BASE_ATTN2: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, torch.Tensor]]" = weakref.WeakKeyDictionary()


def attn2_parameters(unet) -> dict[str, torch.nn.Parameter]:
    """The UNet's own attn2 weights by their stock names, also when LoRA adapters wrap them (`.base_layer`)."""
    return {n.replace(".base_layer", ""): p for n, p in unet.named_parameters()
            if ".attn2." in n and "lora_" not in n}


def base_attn2(unet) -> dict[str, torch.Tensor]:
    """The UNet's own attn2 weights (fp32 CPU copy), taken the first time a cross-attention run is loaded."""
    return _BASE_ATTN2.setdefault(unet, {n: p.detach().to("cpu", torch.float32, copy=True)
                                             for n, p in attn2_parameters(unet).items()})


def restore_base_attn2(unet) -> None:
    """Put the UNet's own attn2 weights back (no-op when no cross-attention run was loaded into it)."""
    base = _BASE_ATTN2.get(unet)
    if base:
        params = attn2_parameters(unet)
        with torch.no_grad():
            for n, w in base.items():
                params[n].copy_(w.to(params[n].dtype))


def read_crossattn_weights(unet: torch.nn.Module, path: str | Path) -> dict[str, torch.Tensor]:
    """A `crossattn_weights.safetensors` checked against a stock UNet: every attn2 tensor present, nothing else."""
    weights = load_file(str(path))
    expected = set(attn2_parameters(unet))
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise KeyError(f"{path}: not a cross-attention file for this UNet; missing {missing[:5]}"
                       f"{'…' if len(missing) > 5 else ''} ({len(missing)}), unexpected {unexpected[:5]}"
                       f"{'…' if len(unexpected) > 5 else ''} ({len(unexpected)})")
    return weights


def load_crossattn_weights(unet: torch.nn.Module, path: str | Path) -> None:
    """Load a `crossattn_weights.safetensors` into a stock UNet, replacing its attn2 weights."""
    params = attn2_parameters(unet)
    with torch.no_grad():
        for name, tensor in read_crossattn_weights(unet, path).items():
            params[name].copy_(tensor.to(params[name].dtype))
