"""The UNet training methods and the registry of all methods. The interface they implement (helpers.method.Method)
is all the training loop calls, so a method that trains another network with another loss (the prior of notebook
04) plugs in with `register_method` and no change to the loop.

- `crossattn`: only the UNet cross-attention layers (`attn2`: to_q/to_k/to_v/to_out) train.
- `lora`: peft LoRA on the UNet attention projections (rank/alpha/dropout from the preset); optional LoRA on the
  text encoder(s). Exported in diffusers format (stock `pipe.load_lora_weights`) and kohya format (A1111/ComfyUI).
"""
from __future__ import annotations

import weakref
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .method import Method, _cast_trainable_fp32
from .models import Components, pipeline_class
from .presets import Preset

CROSSATTN_FILE = "crossattn_weights.safetensors"
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default weight name
KOHYA_FILE = "lora_kohya.safetensors"


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
        _cast_trainable_fp32([components.unet])

    def export(self, components: Components, out_dir: Path) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / CROSSATTN_FILE
        weights = {n.removeprefix("unet."): p.detach().to("cpu", torch.float32).contiguous()
                   for n, p in self.trainable_parameters(components).items()}
        save_file(weights, path, metadata={"format": "t4-diffusion-lab crossattn", "base_model": components.model_ref})
        return [path]


    def load(self, pipe, final_dir: Path, name: str) -> dict[str, torch.Tensor]:
        weights = read_crossattn_weights(pipe.unet, Path(final_dir) / CROSSATTN_FILE)
        return {n: w.to(torch.float32) for n, w in weights.items()}

    def apply(self, pipe, loaded: dict[str, torch.Tensor], scale: float) -> None:
        """attn2 = base + scale · (tuned − base); the base copy is the pipeline's own weights, kept on the CPU."""
        params = _attn2_params(pipe.unet)
        base = _base_attn2(pipe.unet)
        with torch.no_grad():
            for n, tuned in loaded.items():
                value = base[n] + scale * (tuned - base[n]) if scale != 1.0 else tuned
                params[n].copy_(value.to(params[n].dtype))


_BASE_ATTN2: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, torch.Tensor]]" = weakref.WeakKeyDictionary()


def _attn2_params(unet) -> dict[str, torch.nn.Parameter]:
    """The UNet's own attn2 weights by their stock names, also when LoRA adapters wrap them (`.base_layer`)."""
    return {n.replace(".base_layer", ""): p for n, p in unet.named_parameters()
            if ".attn2." in n and "lora_" not in n}


def _base_attn2(unet) -> dict[str, torch.Tensor]:
    """The UNet's own attn2 weights (fp32 CPU copy), taken the first time a cross-attention run is loaded."""
    return _BASE_ATTN2.setdefault(unet, {n: p.detach().to("cpu", torch.float32, copy=True)
                                             for n, p in _attn2_params(unet).items()})


def restore_base_attn2(unet) -> None:
    """Put the UNet's own attn2 weights back (no-op when no cross-attention run was loaded into it)."""
    base = _BASE_ATTN2.get(unet)
    if base:
        params = _attn2_params(unet)
        with torch.no_grad():
            for n, w in base.items():
                params[n].copy_(w.to(params[n].dtype))


def read_crossattn_weights(unet: torch.nn.Module, path: str | Path) -> dict[str, torch.Tensor]:
    """A `crossattn_weights.safetensors` checked against a stock UNet: every attn2 tensor present, nothing else."""
    weights = load_file(str(path))
    expected = set(_attn2_params(unet))
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise KeyError(f"{path}: not a cross-attention file for this UNet; missing {missing[:5]}"
                       f"{'…' if len(missing) > 5 else ''} ({len(missing)}), unexpected {unexpected[:5]}"
                       f"{'…' if len(unexpected) > 5 else ''} ({len(unexpected)})")
    return weights


def load_crossattn_weights(unet: torch.nn.Module, path: str | Path) -> None:
    """Load a `crossattn_weights.safetensors` into a stock UNet, replacing its attn2 weights."""
    params = _attn2_params(unet)
    with torch.no_grad():
        for name, tensor in read_crossattn_weights(unet, path).items():
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
        _fresh_adapter(components.unet, self._config(self.preset.lora_targets))
        modules = [components.unet]
        for enc in components.text_encoders:  # an adapter a stopped run left on a text encoder goes either way
            _remove_adapter(enc)
        if self.trains_text_encoder:
            if not components.text_encoders:
                raise ValueError("train_text_encoder needs the text encoders loaded")
            for enc in components.text_encoders:
                enc.requires_grad_(False)
                _fresh_adapter(enc, self._config(("q_proj", "k_proj", "v_proj", "out_proj")))
            modules += components.text_encoders
        _cast_trainable_fp32(modules)

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

    def load(self, pipe, final_dir: Path, name: str) -> str:
        pipe.load_lora_weights(Path(final_dir), weight_name=LORA_FILE, adapter_name=name)
        return name

    def apply(self, pipe, loaded: str, scale: float) -> None:
        """Only this run's adapter active, at `scale` (diffusers' set_adapters; other loaded runs are off)."""
        pipe.enable_lora()
        pipe.set_adapters([loaded], adapter_weights=[scale])


METHODS: dict[str, type[Method]] = {"crossattn": CrossAttention, "lora": Lora}
# Methods that live in their own module and register themselves when it is imported (on first use)
METHOD_MODULES: dict[str, str] = {"ip_adapter": "helpers.ip_adapter", "mlp_prior": "helpers.prior",
                                  "diffusion_prior": "helpers.prior"}


def register_method(name: str, cls: type[Method]) -> None:
    """Add a training method (e.g. the prior-conditioned one) without touching the loop."""
    METHODS[name] = cls


def method_class(name: str) -> type[Method] | None:
    """The class of method `name` (importing the module that registers it on first use), None if unknown."""
    if name not in METHODS and name in METHOD_MODULES:
        import importlib
        importlib.import_module(METHOD_MODULES[name])
    return METHODS.get(name)


def make_method(preset: Preset) -> Method:
    cls = method_class(preset.method)
    if cls is None:
        raise ValueError(f"unknown method {preset.method!r}; known: {sorted(METHODS)}")
    return cls(preset)
