"""The `lora` method: peft LoRA on the UNet attention projections (rank, alpha, dropout and targets from the
preset), optionally on the text encoder(s). Exported in diffusers' layout (`pytorch_lora_weights.safetensors`, for
stock `pipe.load_lora_weights`) and kohya's (`<run name>.safetensors`, fp16, for ComfyUI, AUTOMATIC1111 and
sd-scripts, with the kohya metadata they read). Which names each of those programs accepts is recorded from their own
code by scripts/check_consumers.py (tests/data/consumer_keys) and checked by tests/test_consumers.py."""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..models import Components, pipeline_class
from .method import Method, RunFacts, cast_trainable_fp32

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default weight name
LEGACY_KOHYA_FILE = "lora_kohya.safetensors"  # the kohya file's name before it was named after the run
# kohya's text-encoder prefixes: SD1.5's one encoder is lora_te (sd-scripts takes no other), SDXL's lora_te1/te2
KOHYA_TE_PREFIX = {"sd15": ("lora_te",), "sdxl": ("lora_te1", "lora_te2")}
BASE_MODEL_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}  # ss_base_model_version, as sd-scripts writes it


def kohya_file_name(run_name: str) -> str:
    """`<run name>.safetensors`: two runs copied into one `models/Lora` folder keep both files, and the webui's
    `<lora:NAME:1>` names the file."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", run_name).strip("._") or "lora"
    return f"{stem}.safetensors"


def kohya_path(final_dir: Path) -> Path:
    """The kohya file of a run's final/ folder (the .safetensors with kohya network metadata)."""
    from safetensors import safe_open
    final_dir = Path(final_dir)
    for path in sorted(final_dir.glob("*.safetensors")):
        if path.name == LORA_FILE:
            continue
        with safe_open(str(path), framework="pt") as f:
            if "ss_network_module" in (f.metadata() or {}):
                return path
    if (final_dir / LEGACY_KOHYA_FILE).is_file():
        return final_dir / LEGACY_KOHYA_FILE
    raise FileNotFoundError(f"no kohya LoRA file in {final_dir}")


def with_text_model_level(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's names on a transformers 5 CLIPTextModel (`encoder.layers.N…`: that version dropped the `text_model`
    level) as every LoRA file names CLIP layers (`text_model.encoder.layers.N…`): diffusers strips the level again
    when the encoder lacks it; ComfyUI, the webui and sd-scripts look only for it."""
    return {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in state_dict.items()}


def kohya_metadata(preset, family: str, rank: int, alpha: float, output_name: str,
                   run: RunFacts | None) -> dict[str, str]:
    """The kohya (sd-scripts) metadata the programs read: the webui files a LoRA under SD1/SD2/SDXL by
    ss_base_model_version (its Lora tab hides one of another version than the loaded checkpoint) and shows
    ss_output_name as its alias, ss_sd_model_name, ss_resolution and the tags of ss_tag_frequency; sd-scripts'
    own tools read the network keys (ss_network_module / dim / alpha, ss_v2, ss_base_model_version)."""
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
            "ss_base_model_version": BASE_MODEL_VERSION[family], "ss_v2": "False",
            "ss_output_name": output_name, "ss_sd_model_name": str(preset.model),
            "ss_resolution": f"({preset.resolution}, {preset.resolution})",
            "ss_max_train_steps": str(preset.max_steps), "ss_learning_rate": str(preset.learning_rate),
            "ss_training_comment": f"T4 Diffusion Lab, preset {preset.name}"}
    if run is not None:
        meta["ss_steps"] = str(run.steps)
        if run.records is not None:
            captions = [r.caption for r in run.records]
            meta["ss_num_train_images"] = str(len(captions))
            meta["ss_captions_sha256"] = hashlib.sha256("\n".join(captions).encode()).hexdigest()
            tags = Counter(t.strip() for c in captions for t in c.split(",") if t.strip())
            meta["ss_tag_frequency"] = json.dumps({output_name: dict(tags.most_common(200))})
    return meta


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
        return {prefix: {k: (v if v.is_meta else v.detach().to("cpu", torch.float32).contiguous())  # meta: names only
                         for k, v in get_peft_model_state_dict(module).items()}
                for prefix, module in self.modules(components).items()}

    def export_layers(self, components: Components) -> dict[str, dict[str, torch.Tensor]]:
        """peft_state_dicts with the text encoders' names as every LoRA file writes them (`text_model.` level)."""
        return {prefix: (sd if prefix == "unet" else with_text_model_level(sd))
                for prefix, sd in self.peft_state_dicts(components).items()}

    def export(self, components: Components, out_dir: Path, run: RunFacts | None = None) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        layers = self.export_layers(components)
        modules = self.modules(components)
        kwargs = {f"{prefix}_lora_layers": sd for prefix, sd in layers.items()}
        # Dropout is saved as 0: diffusers injects loaded LoRA layers in train mode and never calls eval(), so a
        # stock pipeline would drop LoRA inputs at inference (r8 α16 dropout 0.1: outputs differ call to call)
        kwargs.update({f"{prefix}_lora_adapter_metadata": {**modules[prefix].peft_config["default"].to_dict(),
                                                           "lora_dropout": 0.0} for prefix in layers})
        pipeline_class(components.family).save_lora_weights(out_dir, **kwargs)
        kohya_name = kohya_file_name(run.name if run is not None else Path(out_dir).parent.name)
        kohya = self.kohya_state_dict(layers, components.family)
        save_file(kohya, out_dir / kohya_name,
                  metadata=kohya_metadata(self.preset, components.family, self.preset.lora_rank,
                                          self.preset.lora_alpha, Path(kohya_name).stem, run))
        return [out_dir / LORA_FILE, out_dir / kohya_name]

    def kohya_state_dict(self, layers: dict[str, dict[str, torch.Tensor]], family: str) -> dict[str, torch.Tensor]:
        """Kohya layout, fp16: <module>.lora_down/up.weight + .alpha, modules `lora_unet_<diffusers path>` (all three
        programs take those, sd-scripts renaming SDXL's to SAI's) and lora_te / lora_te1 / lora_te2 +
        `_text_model_encoder_layers_N_…`. diffusers' converter writes alpha = rank (scale 1); ours may differ
        (r8 α16 → scale 2), so alpha is set from the preset."""
        from diffusers.utils import convert_state_dict_to_kohya
        peft_sd = {f"{prefix}.{k}": v for prefix, sd in layers.items() for k, v in sd.items()}
        kohya = convert_state_dict_to_kohya(peft_sd)  # text_encoder → lora_te1, text_encoder_2 → lora_te2
        if family == "sd15":
            kohya = {("lora_te_" + k[len("lora_te1_"):] if k.startswith("lora_te1_") else k): v
                     for k, v in kohya.items()}
        for key in kohya:
            if key.endswith(".alpha"):
                kohya[key] = torch.tensor(float(self.preset.lora_alpha))
        return {k: v.to(torch.float16).contiguous() for k, v in kohya.items()}


def where_files_go(final_dir: Path, family: str | None = None) -> str:
    """Where each file of a finished run's final/ goes, as notebook 02's and 03's export cells print it. A run of
    notebook 02's default method (cross-attention weights) has no LoRA: none of these programs loads it, and the
    text says so and points to the LoRA variant's run."""
    final_dir = Path(final_dir)
    try:
        kohya = kohya_path(final_dir)
    except FileNotFoundError:
        return (f"{final_dir} holds no LoRA (the cross-attention method's weights load only with this project's "
                "helpers: ComfyUI, AUTOMATIC1111 and diffusers' load_lora_weights cannot read them). Train the LoRA "
                "variant (method='lora') for files those programs take.")
    from safetensors import safe_open
    with safe_open(str(kohya), framework="pt") as f:
        meta = f.metadata() or {}
    family = family or ("sdxl" if meta.get("ss_base_model_version", "").startswith("sdxl") else "sd15")
    base = "SDXL base 1.0" if family == "sdxl" else "Stable Diffusion 1.5"
    return "\n".join([
        f"diffusers: pipe.load_lora_weights({str(final_dir)!r}, weight_name={LORA_FILE!r})",
        f"ComfyUI: copy {kohya.name} into ComfyUI/models/loras/ and pick it in a LoraLoader node",
        f"AUTOMATIC1111: copy {kohya.name} into stable-diffusion-webui/models/Lora/ and write "
        f"<lora:{kohya.stem}:1> in the prompt",
        f"Both with a {base} checkpoint; {kohya.name} also loads in diffusers and sd-scripts.",
    ])
