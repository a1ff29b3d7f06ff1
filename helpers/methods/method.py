"""The training-method interface: what trains, its loss, what idles while it trains, whether its runs draw
pictures, and what leaves the run (`export`). The training loop reads nothing a method does not declare here;
loading a finished run back into a pipeline is helpers.methods.runs' job. The methods: crossattn, lora, ip_adapter,
the priors; their registry is helpers.methods.registry."""
from __future__ import annotations

from dataclasses import dataclass

from pathlib import Path

import torch

from ..core.presets import Preset
from ..models import Components, encode_images, encode_prompts, time_ids
from .diffusion import SampleDraws, denoising_loss, sample_latents


def cast_trainable_fp32(modules) -> None:
    # Frozen weights stay fp16 on a T4; trainable ones must be fp32 or GradScaler refuses to unscale them
    # ("Attempting to unscale FP16 gradients") and small updates vanish in fp16 rounding.
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                p.data = p.data.float()


@dataclass(frozen=True)
class RunFacts:
    """What an export tells the programs that read it about the run: its name (the kohya file is named after it),
    the optimizer steps done and the training records (pictures and captions)."""
    name: str
    steps: int
    records: list | None = None


class Method:
    """Base: the denoising loss with text conditioning, shared by SD1.5 and SDXL. Subclasses choose what trains."""
    name = "base"
    uses_lora = False  # its runs load as peft LoRA adapters (RunSet switches them off for other variants)
    needs_image_embeds = False  # its runs draw from one CLIP image embedding per image beside the prompt
    #                             (notebook 04's IP-Adapter; helpers.generate.sampling says how that input travels)
    makes_image_embeds = False  # its runs draw nothing themselves but turn prompts into CLIP image embeddings (a
    #                             prior, notebook 04 part 2: helpers.prior.images.prompt_source)
    draws_images = True  # a run draws pictures: the training loop samples them (SampleHook), RunSet loads the run

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

    def idle_modules(self, components: Components, dataset) -> list[torch.nn.Module]:
        """Modules a training step never runs, which the Trainer moves off the GPU: the VAE when the dataset has
        cached latents, the text encoders when it has cached text and they do not train."""
        idle = []
        if getattr(dataset, "latents", None) is not None:
            idle.append(components.vae)
        if getattr(dataset, "text", None) is not None and not self.trains_text_encoder:
            idle += components.text_encoders
        return idle

    # ---- the loss
    @staticmethod
    def latents(components: Components, batch: dict, draws: SampleDraws) -> torch.Tensor:
        """The batch's training latents: drawn from the cached VAE distribution, or from a fresh encode of its
        pixels, with the VAE's scaling, on the draws' device."""
        if "latent_params" in batch:
            params = batch["latent_params"].to(draws.device)
        else:
            with torch.no_grad():
                params = encode_images(components.vae, batch["pixel_values"])
        return sample_latents(components.vae.config, params, draws).to(draws.device)

    def loss(self, components: Components, batch: dict, models: dict[str, torch.nn.Module], draws: SampleDraws,
             dtype: torch.dtype) -> torch.Tensor:
        """Denoising loss of one micro-batch: latents (cached distribution or a fresh VAE encode) → noise at the
        samples' timesteps → UNet prediction vs target. `models` are the prepared `modules(components)`; `dtype` is
        the frozen weights' dtype (conditioning is cast to it)."""
        latents = self.latents(components, batch, draws)
        cond = self.conditioning(components, batch, draws.device, dtype)
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
    def export(self, components: Components, out_dir: Path, run: RunFacts | None = None) -> list[Path]:
        raise NotImplementedError

    def load(self, pipe, final_dir: Path, name: str):
        """The inverse of `export`: put a finished run's weights into a stock pipeline under `name`, switched off.
        Returns what `apply(pipe, loaded, scale)` needs to switch it on."""
        raise NotImplementedError

    def apply(self, pipe, loaded, scale: float) -> None:
        """Switch the pipeline to this run at `scale` (0 = the base model, 1 = as trained)."""
        raise NotImplementedError

    def switch_off(self, pipe, loaded) -> None:
        """Undo what `apply` added to the pipeline beyond weights RunSet resets itself (LoRA, attn2): called for
        every loaded run before switching to another variant."""
