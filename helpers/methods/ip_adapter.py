"""SD1.5 conditioned on a CLIP image embedding: an IP-Adapter trained from scratch together with a LoRA (notebook 04).

The adapter is diffusers' own: `unet._load_ip_adapter_weights` installs an `ImageProjection` (the embedding → 4
tokens of the UNet's context width) as `unet.encoder_hid_proj` and an `IPAdapterAttnProcessor2_0` in every
cross-attention, whose `to_k_ip`/`to_v_ip` attend to those 4 tokens beside the text. As tencent-ailab/IP-Adapter's
tutorial_train.py: `to_k_ip`/`to_v_ip` start as copies of the layer's own `to_k`/`to_v`, the projection at torch's
default init; a sample's image embedding is dropped (zeros) 5 %, its caption (the empty prompt) 5 %, both 5 % of the
time, which is what classifier-free guidance needs at sampling (zeros = the unconditional image). The LoRA is the
reference project's (r8, α16, dropout 0.1 on to_q/to_k/to_v) on the peft path of helpers.methods.registry.Lora.

Exports load in stock diffusers (see `load_snippet` in helpers.methods.runs):
    pipe.load_lora_weights(final, weight_name="pytorch_lora_weights.safetensors")
    pipe.load_ip_adapter(final, subfolder="", weight_name="ip_adapter.safetensors", image_encoder_folder=None)
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..core.notices import LORA_WITHOUT_TEXT_ENCODER, expected
from ..core.precision import autocast_for
from ..data.embeddings import embed_dim, nearest_true_embeds
from ..models import Components, encode_prompts, from_pretrained
from ..tiny.world import resolve
from .diffusion import SampleDraws, denoising_loss
from .lora import LORA_FILE, Lora
from .method import cast_trainable_fp32

IP_ADAPTER_FILE = "ip_adapter.safetensors"
NUM_TOKENS = 4  # ImageProjection's token count (diffusers fixes it at 4 for the `image_proj.proj.weight` layout)
DROP_IMAGE, DROP_TEXT, DROP_BOTH = 0.05, 0.05, 0.05  # tutorial_train.py's condition dropout


# ---------------------------------------------------------------- the adapter in a UNet

def _cross_attention_processors(unet) -> list[str]:
    """Processor names diffusers gives IP weights, in its order (down, up, mid blocks): every one that is not a
    self-attention (`attn1`), exactly the rule of `_convert_ip_adapter_attn_to_diffusers`."""
    return [name for name in unet.attn_processors if not name.endswith("attn1.processor")]


def _base_weight(linear) -> torch.Tensor:
    """A Linear's own weight, also when peft wraps it (`base_layer`)."""
    return getattr(linear, "base_layer", linear).weight


def fresh_ip_adapter(unet, embed_dim: int) -> dict[str, dict[str, torch.Tensor]]:
    """A new adapter in the file layout (`{"image_proj": {...}, "ip_adapter": {"1.to_k_ip.weight": ...}}`):
    projection at torch's default Linear init (draws from the global RNG: seed first), norm at ones/zeros,
    `to_k_ip`/`to_v_ip` copies of each cross-attention's `to_k`/`to_v` (key ids 1, 3, 5, …, as diffusers
    reads them)."""
    width = unet.config.cross_attention_dim
    device = next(unet.parameters()).device
    with torch.device(device):
        proj = torch.nn.Linear(embed_dim, NUM_TOKENS * width)
    state = {"image_proj": {"proj.weight": proj.weight.detach().float(), "proj.bias": proj.bias.detach().float(),
                            "norm.weight": torch.ones(width, device=device),
                            "norm.bias": torch.zeros(width, device=device)},
             "ip_adapter": {}}
    for i, name in enumerate(_cross_attention_processors(unet)):
        attn = unet.get_submodule(name.removesuffix(".processor"))
        state["ip_adapter"][f"{2 * i + 1}.to_k_ip.weight"] = _base_weight(attn.to_k).detach().float().clone()
        state["ip_adapter"][f"{2 * i + 1}.to_v_ip.weight"] = _base_weight(attn.to_v).detach().float().clone()
    return state


def install_ip_adapter(unet, state: dict[str, dict[str, torch.Tensor]]) -> None:
    """Put an adapter (file layout) into `unet` with diffusers' own loader, replacing any adapter there."""
    remove_ip_adapter(unet)
    with torch.device(next(unet.parameters()).device):  # built where the UNet is (also the memory plan's meta)
        unet._load_ip_adapter_weights([state], low_cpu_mem_usage=False)


def remove_ip_adapter(unet) -> None:
    """The UNet part of diffusers' `pipe.unload_ip_adapter()`: plain attention processors, no image projection."""
    from diffusers.models.attention_processor import AttnProcessor2_0
    if getattr(unet, "encoder_hid_proj", None) is None:
        return
    unet.encoder_hid_proj = None
    unet.config.encoder_hid_dim_type = None
    unet.set_attn_processor({name: AttnProcessor2_0() for name in unet.attn_processors})


def ip_adapter_state(unet) -> dict[str, torch.Tensor]:
    """The adapter in `unet` as the flat file layout stock `load_ip_adapter` reads: `image_proj.proj.*`,
    `image_proj.norm.*`, `ip_adapter.{k}.to_k_ip.weight`, `ip_adapter.{k}.to_v_ip.weight` (fp32, CPU)."""
    if getattr(unet, "encoder_hid_proj", None) is None:
        raise ValueError("this UNet has no IP-Adapter installed")
    proj = unet.encoder_hid_proj.image_projection_layers[0]
    out = {"image_proj.proj.weight": proj.image_embeds.weight, "image_proj.proj.bias": proj.image_embeds.bias,
           "image_proj.norm.weight": proj.norm.weight, "image_proj.norm.bias": proj.norm.bias}
    processors = unet.attn_processors
    for i, name in enumerate(_cross_attention_processors(unet)):
        out[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = processors[name].to_k_ip[0].weight
        out[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = processors[name].to_v_ip[0].weight
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}


def read_ip_adapter(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """An exported adapter file as the nested dict `pipe.load_ip_adapter` also accepts in place of a path."""
    flat = load_file(str(path))
    nested = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        group, rest = key.split(".", 1)
        if group not in nested:
            raise KeyError(f"{path}: unexpected key {key!r} (an IP-Adapter file has image_proj.* and ip_adapter.*)")
        nested[group][rest] = value
    return nested


# ---------------------------------------------------------------- the training method

def condition_drops(draws: SampleDraws) -> tuple[torch.Tensor, torch.Tensor]:
    """(drop image, drop text) bool per sample: image only 5 %, text only 5 %, both 5 %, from the sample's own
    "condition" stream, so a resumed run drops exactly what an uninterrupted one would."""
    u = draws.randint(10_000, "condition").float() / 10_000
    image_only, text_only = u < DROP_IMAGE, (u >= DROP_IMAGE) & (u < DROP_IMAGE + DROP_TEXT)
    both = (u >= DROP_IMAGE + DROP_TEXT) & (u < DROP_IMAGE + DROP_TEXT + DROP_BOTH)
    return image_only | both, text_only | both


class IPAdapter(Lora):
    """IP-Adapter (ImageProjection + to_k_ip/to_v_ip, trained from scratch) + LoRA, trained on TRUE image
    embeddings (the dataset's items carry `image_embeds`, see `EmbeddedDataset`)."""
    name = "ip_adapter"
    needs_image_embeds = True

    def __init__(self, preset):
        super().__init__(preset)
        if not preset.clip_model:
            raise ValueError(f"preset {preset.name!r}: the ip_adapter method needs clip_model (the CLIP whose image "
                             "embeddings condition the UNet)")
        self.embed_dim = embed_dim(preset.clip_model)
        self.empty_text: torch.Tensor | None = None  # the empty caption's states: a dropped caption

    def setup(self, components: Components) -> None:
        unet = components.unet
        remove_ip_adapter(unet)  # one a stopped run left behind; the LoRA is replaced by Lora.setup
        # installed BEFORE the LoRA: diffusers' loader casts the whole UNet to its dtype (fp16 on a T4), which
        # would otherwise turn the fp32 LoRA weights into fp16
        install_ip_adapter(unet, fresh_ip_adapter(unet, self.embed_dim))
        super().setup(components)  # LoRA, frozen base, fp32 LoRA weights
        for module in (unet.encoder_hid_proj, *(p for p in unet.attn_processors.values()
                                                if isinstance(p, torch.nn.Module))):
            module.requires_grad_(True)
        cast_trainable_fp32([unet])
        if components.text_encoders:
            with torch.no_grad():
                self.empty_text = encode_prompts(components.family, components.tokenizers, components.text_encoders,
                                                 [""])[0].float().cpu()

    def ip_parameter_count(self, components: Components) -> int:
        return sum(p.numel() for n, p in self.trainable_parameters(components).items() if "lora_" not in n)

    def loss(self, components: Components, batch: dict, models: dict, draws: SampleDraws,
             dtype: torch.dtype) -> torch.Tensor:
        if "image_embeds" not in batch:
            raise ValueError("the ip_adapter method trains on items with image_embeds: wrap the dataset in "
                             "helpers.methods.ip_adapter.EmbeddedDataset")
        device = draws.device
        latents = self.latents(components, batch, draws)
        cond = self.conditioning(components, batch, device, dtype)
        drop_image, drop_text = (d.to(device) for d in condition_drops(draws))
        image = batch["image_embeds"].to(device, torch.float32)
        image = torch.where(drop_image[:, None], torch.zeros_like(image), image)
        if bool(drop_text.any()):
            if self.empty_text is None:
                raise ValueError("dropping captions needs the empty caption's states: load the text encoders")
            hidden = cond["encoder_hidden_states"]
            cond["encoder_hidden_states"] = torch.where(drop_text[:, None, None],
                                                        self.empty_text.to(device, hidden.dtype), hidden)
        cond["added_cond_kwargs"] = {"image_embeds": [image[:, None, :]]}
        return denoising_loss(models["unet"], components.noise_scheduler, latents, cond, draws,
                              self.preset.noise_offset, self.preset.snr_gamma)

    def sample_image_embeds(self, trainer, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """Embeddings for the sample grids during training: for each prompt, the TRUE image embedding of the
        held-out pair whose caption is closest to it (CLIP text cosine); zeros without an EmbeddingSet."""
        es = getattr(trainer.dataset, "embeddings", None)
        if es is None:
            return torch.zeros(len(prompts), self.embed_dim)
        return nearest_true_embeds(es)(list(prompts), list(seeds))

    # ---- what leaves the run
    def export(self, components: Components, out_dir: Path, run=None) -> list[Path]:
        files = super().export(components, out_dir, run)  # the LoRA (diffusers and kohya layouts)
        path = Path(out_dir) / IP_ADAPTER_FILE
        save_file(ip_adapter_state(components.unet), str(path),
                  metadata={"format": "t4-diffusion-lab ip_adapter", "base_model": components.model_ref,
                            "clip_model": str(self.preset.clip_model), "embed_dim": str(self.embed_dim),
                            "num_tokens": str(NUM_TOKENS)})
        return [*files, path]


@torch.no_grad()
def round_trip_delta(unet, final_dir: Path, model_ref: str, embeds: torch.Tensor) -> float:
    """max |Δ| between the trained `unet` and the UNet of a FRESH stock StableDiffusionPipeline of `model_ref` (same
    dtype and device) that loaded only the exported files, on seeded latents at t = 10, 500, 900 with `embeds`
    (≤ 3 rows). 0 up to float error when the export is complete; fp16 weights on a T4 leave ≈ 1e-3."""
    from diffusers import StableDiffusionPipeline
    param = unet.conv_in.weight  # a frozen weight: the UNet's storage dtype (fp16 on a T4)
    stock = from_pretrained(StableDiffusionPipeline, resolve(model_ref), None, param.dtype, safety_checker=None,
                            requires_safety_checker=False)  # the files training loaded (fp16 variant on a T4)
    stock.load_ip_adapter(str(final_dir), subfolder="", weight_name=IP_ADAPTER_FILE, image_encoder_folder=None)
    with expected(LORA_WITHOUT_TEXT_ENCODER):  # the adapter's LoRA is on the UNet alone
        stock.load_lora_weights(str(final_dir), weight_name=LORA_FILE)
    fresh = stock.unet.to(param.device).eval()
    g, n = torch.Generator().manual_seed(0), min(3, len(embeds))
    size = unet.config.sample_size
    x = torch.randn(n, unet.config.in_channels, size, size, generator=g).to(param.device, param.dtype)
    hidden = torch.randn(n, 77, unet.config.cross_attention_dim, generator=g).to(param.device, param.dtype)
    kw = dict(encoder_hidden_states=hidden,
              added_cond_kwargs={"image_embeds": [embeds[:n, None, :].to(param.device, param.dtype)]})
    t = torch.tensor([10, 500, 900][:n], device=param.device)
    training = unet.training
    unet.eval()
    try:
        with autocast_for(unet):  # fp32 trained layers inside an fp16 UNet (a T4)
            return float((fresh(x, t, **kw).sample.float() - unet(x, t, **kw).sample.float()).abs().max())
    finally:
        unet.train(training)


# ---------------------------------------------------------------- data: images with their embeddings

class EmbeddedDataset(torch.utils.data.Dataset):
    """A TrainDataset's items plus `image_embeds` (D,) from the EmbeddingSet of the same records, restricted to one
    side of its held-out split ("train" by default). `index` stays the TrainDataset's, so every draw of a sample is
    the same whichever split view serves it."""

    def __init__(self, dataset, embeddings, split: str = "train"):
        if [r.key for r in dataset.records] != embeddings.keys:
            raise ValueError("the embeddings were computed for other records than this dataset's: build them with "
                             "embedding_set(preset, records=dataset.records)")
        if split not in ("train", "held_out"):
            raise ValueError(f"split must be 'train' or 'held_out', not {split!r}")
        self.dataset, self.embeddings, self.split = dataset, embeddings, split
        self.indices = (embeddings.train_indices if split == "train" else embeddings.held_out_indices).tolist()

    @property
    def records(self):
        return [self.dataset.records[i] for i in self.indices]

    @property
    def latents(self):
        """The wrapped dataset's latent cache: with it, training never runs the VAE (Trainer.idle_modules)."""
        return getattr(self.dataset, "latents", None)

    @property
    def text(self):
        """The wrapped dataset's text cache: with it, training never runs the text encoder (Trainer.idle_modules)."""
        return getattr(self.dataset, "text", None)

    @property
    def cache_dirs(self) -> dict:
        """The wrapped dataset's cache folders (a NaN stop names the one a bad input came from)."""
        return getattr(self.dataset, "cache_dirs", {})

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict:
        index = self.indices[position]
        return {**self.dataset[index], "image_embeds": self.embeddings.image_embeds[index]}


# ---------------------------------------------------------------- embeddings for generation
