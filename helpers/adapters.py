"""What trains and its loss. One class per method; the training loop only calls `setup`, `modules`,
`trainable_parameters`, `loss` and `export`, so a method that trains another network with another loss (the prior
of notebook 04) plugs in with `register_method` and no change to the loop. `load` is the inverse of `export`: a
finished run's files into a stock pipeline, switchable on and off (helpers.runs).

- `crossattn`: only the UNet cross-attention layers (`attn2`: to_q/to_k/to_v/to_out) train.
- `lora`: peft LoRA on the UNet attention projections (rank/alpha/dropout from the preset); optional LoRA on the
  text encoder(s). Exported in diffusers format (stock `pipe.load_lora_weights`) and kohya format (A1111/ComfyUI).
"""
from __future__ import annotations

import weakref
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .diffusion import SampleDraws, denoising_loss, sample_latents
from .models import Components, encode_images, encode_prompts, pipeline_class, time_ids
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
    """Base: the denoising loss with text conditioning, shared by SD1.5 and SDXL. Subclasses choose what trains."""
    name = "base"
    uses_lora = False  # its runs load as peft LoRA adapters (RunSet switches them off for other variants)
    needs_image_embeds = False  # its runs draw from one CLIP image embedding per image beside the prompt
    #                             (notebook 04's IP-Adapter; helpers.sampling says how that input travels)
    makes_image_embeds = False  # its runs draw nothing themselves but turn prompts into CLIP image embeddings (a
    #                             prior, notebook 04 part 2): `image_embeds_source`

    def __init__(self, preset: Preset):
        self.preset = preset

    # ---- what trains
    def setup(self, components: Components) -> None:
        raise NotImplementedError

    def modules(self, components: Components) -> dict[str, torch.nn.Module]:
        """Name → module whose requires_grad parameters train. The Trainer prepares these (DDP on several GPUs),
        switches them between train and eval, and passes the prepared ones back to `loss`."""
        return {"unet": components.unet}

    def trainable_parameters(self, components: Components) -> dict[str, torch.nn.Parameter]:
        """Qualified name → trainable parameter; the names key checkpoints."""
        return {f"{prefix}.{name}": p for prefix, module in self.modules(components).items()
                for name, p in module.named_parameters() if p.requires_grad}

    def extra_state(self, components: Components) -> dict[str, torch.Tensor]:
        """Name → tensor a checkpoint must hold besides the trainable weights for an exact resume (e.g. EMA
        weights and their update count). The Trainer saves them with the weights and restores them IN PLACE, so
        return the live tensors. Names must not clash with `trainable_parameters`."""
        return {}

    def after_step(self, components: Components) -> None:
        """Called after every optimizer step that changed the weights (not after fp16-skipped ones), before the
        hooks, so a checkpoint written at this step already holds what this call updated (e.g. an EMA)."""

    # ---- the loss
    def loss(self, components: Components, batch: dict, models: dict[str, torch.nn.Module], draws: SampleDraws,
             dtype: torch.dtype) -> torch.Tensor:
        """Denoising loss of one micro-batch: latents (cached distribution or a fresh VAE encode) → noise at the
        samples' timesteps → UNet prediction vs target. `models` are the prepared `modules(components)`; `dtype` is
        the
        frozen weights' dtype (conditioning is cast to it)."""
        device = draws.device
        if "latent_params" in batch:
            params = batch["latent_params"].to(device)
        else:
            with torch.no_grad():
                params = encode_images(components.vae, batch["pixel_values"])
        latents = sample_latents(components.vae.config, params, draws).to(device)
        cond = self.conditioning(components, batch, device, dtype)
        return denoising_loss(models["unet"], components.noise_scheduler, latents, cond, draws,
                              self.preset.noise_offset, self.preset.snr_gamma)

    @property
    def trains_text_encoder(self) -> bool:
        return False

    # ---- how a batch becomes conditioning
    def conditioning(self, components: Components, batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
        """UNet keyword arguments: encoder_hidden_states, and for SDXL added_cond_kwargs (text_embeds, time_ids)."""
        if "prompt_embeds" in batch:
            hidden, pooled = batch["prompt_embeds"], batch.get("pooled_prompt_embeds")
        else:
            with torch.set_grad_enabled(self.trains_text_encoder):
                hidden, pooled = encode_prompts(components.family, components.tokenizers, components.text_encoders,
                                                list(batch["caption"]))
        kwargs = {"encoder_hidden_states": hidden.to(device, dtype)}
        if components.family == "sdxl":
            size = (self.preset.resolution, self.preset.resolution)
            ids = torch.stack([time_ids(o.tolist(), ct.tolist(), size)
                               for o, ct in zip(batch["original_size"], batch["crop_top_left"])])
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(device, dtype), "time_ids": ids.to(device, dtype)}
        return kwargs

    # ---- what leaves the run, and its way back in
    def export(self, components: Components, out_dir: Path) -> list[Path]:
        raise NotImplementedError

    def load(self, pipe, final_dir: Path, name: str):
        """The inverse of `export`: put a finished run's weights into a stock pipeline under `name`, switched off.
        Returns what `apply(pipe, loaded, scale)` needs to switch it on."""
        raise NotImplementedError

    def apply(self, pipe, loaded, scale: float) -> None:
        """Switch the pipeline to this run at `scale` (0 = the base model, 1 = as trained)."""
        raise NotImplementedError

    def image_embeds_source(self, final_dir: Path, device: torch.device | str):
        """For a method that `makes_image_embeds`: its finished run (`final_dir`) as a
        `helpers.sampling.ImageEmbeds`, (prompts, seeds) → one CLIP image embedding per image (N, D) in the space
        of `preset.clip_model`, at the scale of the raw embeddings an image-conditioned run trained on. The seed
        lets a sampling prior give each image its own embedding. This is how the catalog draws an
        image-conditioned run of the same CLIP from a typed prompt (helpers.catalog)."""
        raise NotImplementedError(f"the {self.name!r} method makes no image embeddings")

    def switch_off(self, pipe, loaded) -> None:
        """Undo what `apply` added to the pipeline beyond weights RunSet resets itself (LoRA, attn2): called for
        every loaded run before switching to another variant."""


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
        """Module prefix → its LoRA weights in diffusers key layout (fp32, on CPU)."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict
        out = {}
        for prefix, module in self.modules(components).items():
            sd = get_peft_model_state_dict(module)
            out[prefix] = {k: v.detach().to("cpu", torch.float32).contiguous()
                           for k, v in convert_state_dict_to_diffusers(sd).items()}
        return out

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
