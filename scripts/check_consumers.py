"""Which LoRA key names do the programs our users draw with accept? Runs each consumer's OWN key-map code on the
real-size SD1.5 and SDXL architectures (built on the meta device from helpers.core.configs) and writes what it accepts to
tests/data/consumer_keys/{comfyui,a1111,sd_scripts}-{sd15,sdxl}.json, with the commit each was read at.

    .venv/bin/python scripts/check_consumers.py --comfyui PATH --webui PATH --sd-scripts PATH [--out DIR]

Each PATH is a checkout (a work tree, or a bare git directory: its HEAD is exported to a temporary folder) of
Comfy-Org/ComfyUI (comfyanonymous/ComfyUI), AUTOMATIC1111/stable-diffusion-webui and kohya-ss/sd-scripts (PATH@REV
reads commit REV: the data files were written from the webui's upstream dev commit a30b19dd, read from a fork's
mirror that holds it, the upstream snapshot being too large to fetch here). Nothing of
their code is kept (ComfyUI is GPL-3.0, the webui AGPL-3.0, sd-scripts Apache-2.0): only the names their code accepts,
as data. Their heavy imports (gradio, their model management, their settings) are stubbed here; the code that turns a
key into a layer is theirs, run as it is:

- ComfyUI: comfy.model_detection.unet_config_from_diffusers_unet + comfy.utils.unet_to_diffusers (the UNet's own
  layer names), comfy.lora.model_lora_keys_unet / model_lora_keys_clip on comfy.clip_model.CLIPTextModel (their CLIP,
  CLIP-L and bigG configs from their repository) and comfy.lora.load_lora (which key suffixes load).
- AUTOMATIC1111: extensions-builtin/Lora networks.assign_network_names_to_compvis_modules + networks.load_network on
  a probe of candidate keys, with the webui's model layout (ldm UNet layer names, as ComfyUI's map gives them, which
  are CompVis'/SAI's; transformers' CLIPTextModel with its `text_model` level as transformers 4 has it, the webui's
  pin; open_clip's ViT-bigG-14 text tower for SDXL's second encoder), and network.NetworkOnDisk.detect_version on
  files with probe metadata (the Lora tab hides a network whose version differs from the loaded checkpoint's).
- sd-scripts: networks/lora.py LoRANetwork (the module names it creates, `create_network_from_weights` creates only
  those a file names) on its own UNets (library/original_unet.py, library/sdxl_original_unet.py) and transformers'
  CLIP encoders with the `text_model` level, and convert_diffusers_to_sai_if_needed (its SDXL rename of
  diffusers-named UNet keys).

A data file holds, per consumer and family: `commit`, `modules` (accepted LoRA module name → the consumer's target
layer), `suffixes` (the key endings that load for one module, e.g. `.lora_down.weight`), and for the webui
`version_detection` (probe metadata → detected version).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from helpers.core import configs  # noqa: E402

FAMILIES = ("sd15", "sdxl")
KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


# ---------------------------------------------------------------- checkouts and stubs

def checkout(path: str, paths: list[str], tmp: Path) -> tuple[Path, str]:
    """(a folder holding `paths` of the checkout at REV (PATH@REV; HEAD by default), that commit's id)."""
    path, _, rev = path.partition("@")
    src = Path(path)
    git_dir = src / ".git" if (src / ".git").exists() else src
    commit = subprocess.run(["git", f"--git-dir={git_dir}", "rev-parse", (rev or "HEAD") + "^{commit}"],
                            capture_output=True, text=True, check=True).stdout.strip()
    if (src / ".git").exists() and not rev:
        return src, commit
    out = tmp / src.parent.name
    listing = subprocess.run(["git", f"--git-dir={git_dir}", "ls-tree", "-r", commit, "--", *paths],
                             capture_output=True, text=True, check=True).stdout.splitlines()
    for line in listing:  # only code and configs: a snapshot may lack its large blobs
        meta, name = line.split("\t", 1)
        if name.endswith((".py", ".json")):
            blob = subprocess.run(["git", f"--git-dir={git_dir}", "cat-file", "blob", meta.split()[2]],
                                  capture_output=True, check=True).stdout
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(blob)
    return out, commit


class Anything(types.ModuleType):
    """A stub module: any attribute is a fresh class (isinstance checks are False) unless set."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = type(name, (), {"__init__": lambda self, *a, **k: None})
        setattr(self, name, value)
        return value


class Settings:
    """Their command-line settings: every flag off."""

    def __getattr__(self, name):
        return False


@contextlib.contextmanager
def isolated_modules(prefixes: tuple[str, ...]):
    """Imports under `prefixes` (theirs and their stubs) vanish afterwards: the three consumers' `library`,
    `modules`, `network` packages never meet."""
    before = set(sys.modules)
    saved_path = list(sys.path)
    try:
        yield
    finally:
        for name in set(sys.modules) - before:
            if name.split(".")[0] in prefixes:
                del sys.modules[name]
        sys.path[:] = saved_path


def stub(name: str, **attrs) -> types.ModuleType:
    module = Anything(name)
    module.__path__ = []  # a package, so submodules can be stubbed too
    for k, v in attrs.items():
        setattr(module, k, v)
    sys.modules[name] = module
    if "." in name:
        parent, _, child = name.rpartition(".")
        setattr(sys.modules.get(parent) or stub(parent), child, module)
    return module


def load(name: str, file: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, file, submodule_search_locations=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    if "." in name:
        parent, _, child = name.rpartition(".")
        setattr(sys.modules[parent], child, module)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- the real-size models, on meta

def diffusers_unet(family: str):
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        return UNet2DConditionModel(**configs.UNETS[family])


class TextModelLevel(torch.nn.Module):
    """transformers 4's CLIPTextModel layout (`text_model.encoder…`), which the webui and sd-scripts run on:
    transformers 5 dropped that level."""

    def __init__(self, inner):
        super().__init__()
        self.text_model = inner
        self.config = inner.config


def hf_text_encoders(family: str) -> list[torch.nn.Module]:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    with torch.device("meta"):
        encoders = [CLIPTextModel(CLIPTextConfig(**configs.CLIP_L14_TEXT))]
        if family == "sdxl":
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**configs.OPENCLIP_BIGG_TEXT)))
    return [e if hasattr(e, "text_model") else TextModelLevel(e) for e in encoders]


def lora_layers(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def candidate_names(family: str, unet, ldm_names: list[str], encoders) -> list[str]:
    """Every kohya-style module name a file could use: diffusers' and SAI's UNet names, each prefix on each
    encoder (the consumers decide which they take)."""
    names = ["lora_unet_" + n.replace(".", "_") for n in lora_layers(unet)]
    names += ["lora_unet_" + n.replace(".", "_") for n in ldm_names]
    for encoder in encoders:
        for n in lora_layers(encoder):
            for prefix in ("lora_te_", "lora_te1_", "lora_te2_"):
                names.append(prefix + n.replace(".", "_"))
    return sorted(set(names))


# ---------------------------------------------------------------- ComfyUI

def comfyui(root: Path, family: str) -> tuple[dict, list[str]]:
    """(accepted module → ComfyUI weight key, the UNet's SAI/ldm layer names that take a LoRA)."""
    with isolated_modules(("comfy",)):
        sys.path.insert(0, str(root))
        stub("comfy", __path__=[str(root / "comfy")])
        stub("comfy.model_management")
        stub("comfy.model_base")  # only isinstance checks for other model kinds
        stub("comfy.checkpoint_pickle")
        stub("comfy.cli_args", args=Settings())
        stub("comfy.supported_models", models=[])
        stub("comfy.supported_models_base")
        stub("comfy.ops")
        stub("comfy.ldm.modules.attention", optimized_attention_for_device=lambda *a, **k: None)
        utils = load("comfy.utils", root / "comfy/utils.py")
        detection = load("comfy.model_detection", root / "comfy/model_detection.py")
        sys.modules["comfy"].weight_adapter = importlib.import_module("comfy.weight_adapter")  # load_lora's
        lora = load("comfy.lora", root / "comfy/lora.py")
        clip_model = load("comfy.clip_model", root / "comfy/clip_model.py")

        unet_sd = diffusers_unet(family).state_dict()
        unet_config = detection.unet_config_from_diffusers_unet(unet_sd)
        to_ldm = utils.unet_to_diffusers(unet_config)  # diffusers key → ldm key
        missing = [k for k in unet_sd if k not in to_ldm]
        if missing:
            raise SystemExit(f"ComfyUI's unet map lacks {len(missing)} diffusers keys, e.g. {missing[:3]}")
        ldm_sd = {"diffusion_model." + to_ldm[k]: v for k, v in unet_sd.items()}
        model = types.SimpleNamespace(state_dict=lambda: ldm_sd,
                                      model_config=types.SimpleNamespace(unet_config=unet_config))
        key_map = lora.model_lora_keys_unet(model, {})

        ops = types.SimpleNamespace(Linear=torch.nn.Linear, LayerNorm=torch.nn.LayerNorm,
                                    Embedding=torch.nn.Embedding)
        holder = torch.nn.Module()
        for name, config in [("clip_l", "sd1_clip_config.json")] + (
                [("clip_g", "clip_config_bigg.json")] if family == "sdxl" else []):
            part = torch.nn.Module()
            part.transformer = clip_model.CLIPTextModel(json.loads((root / "comfy" / config).read_text()),
                                                        torch.float32, "meta", ops)
            holder.add_module(name, part)
        key_map = lora.model_lora_keys_clip(holder, key_map)
        weights = {**ldm_sd, **holder.state_dict()}

        # Which endings load: load_lora on one module with every ending we could write.
        probe_module = next(k for k in key_map if k.startswith("lora_unet_"))
        loaded = set()
        for suffixes in (KOHYA_SUFFIXES, PEFT_SUFFIXES):
            sd = {probe_module + s: torch.ones(1, 1) for s in suffixes}
            if lora.load_lora(sd, {probe_module: key_map[probe_module]}, log_missing=False):
                loaded.update(suffixes)
        ldm_layers = sorted(k[len("diffusion_model."):-len(".weight")] for k, v in ldm_sd.items()
                            if k.endswith(".weight") and v.dim() >= 2)
    # Only LoRA-able layers (weights of ≥ 2 dims) and the kohya / diffusers spellings our files could use.
    modules = {k: v for k, v in key_map.items()
               if isinstance(v, str) and v in weights and weights[v].dim() >= 2
               and k.startswith(("lora_unet_", "lora_te", "unet.", "text_encoder"))}
    return {"modules": dict(sorted(modules.items())), "suffixes": sorted(loaded)}, ldm_layers


# ---------------------------------------------------------------- AUTOMATIC1111

def module_tree(shapes: dict[str, torch.Size]) -> torch.nn.Module:
    """nn.Modules named as the weight keys (Linear for 2-D, Conv2d for 4-D weights), on meta."""
    root = torch.nn.Module()
    for key, shape in shapes.items():
        *parents, leaf = key.split(".")
        node = root
        for p in parents:
            if not hasattr(node, p):
                node.add_module(p, torch.nn.Module())
            node = getattr(node, p)
        with torch.device("meta"):
            layer = (torch.nn.Linear(shape[1], shape[0]) if len(shape) == 2 else
                     torch.nn.Conv2d(shape[1], shape[0], tuple(shape[2:])))
        node.add_module(leaf, layer)
    return root


def webui(root: Path, family: str, ldm_layers: list[str], candidates: list[str]) -> dict:
    lora_dir = root / "extensions-builtin" / "Lora"
    with isolated_modules(("modules", "network", "networks", "network_lora", "network_hada", "network_ia3",
                           "network_lokr", "network_full", "network_norm", "network_glora", "network_oft",
                           "lyco_helpers", "lora_patches", "lora_logger", "gradio")):
        sys.path.insert(0, str(lora_dir))
        stub("gradio")
        from safetensors import safe_open

        def read_metadata(filename):
            with safe_open(filename, framework="pt") as f:
                return f.metadata() or {}

        probe_sd: dict[str, torch.Tensor] = {}
        stub("modules")
        opts = types.SimpleNamespace(lora_functional=False, lora_preferred_name="Alias from file")
        cmd_opts = types.SimpleNamespace(lora_dir=tempfile.mkdtemp(), lyco_dir_backcompat=tempfile.mkdtemp())
        shared = stub("modules.shared", opts=opts, cmd_opts=cmd_opts,
                      walk_files=lambda *a, **k: [])
        stub("modules.sd_models", read_state_dict=lambda filename: probe_sd,
             read_metadata_from_safetensors=read_metadata)
        stub("modules.cache", cached_data_for_file=lambda subsection, title, filename, func: func())
        stub("modules.hashes", sha256_from_cache=lambda *a, **k: None, sha256=lambda *a, **k: None)
        stub("modules.devices", cpu=torch.device("cpu"), device=torch.device("cpu"), dtype=torch.float32,
             cond_cast_unet=lambda x: x)
        stub("modules.errors", display=lambda e, what: (_ for _ in ()).throw(e))
        stub("modules.textual_inversion.textual_inversion")
        stub("modules.scripts")
        stub("modules.sd_hijack")
        stub("modules.patches")
        network = importlib.import_module("network")
        networks = importlib.import_module("networks")

        # The model as the webui holds it: sd_model.model.diffusion_model (CompVis/SAI UNet); SD1's
        # cond_stage_model.wrapped.transformer (transformers CLIPTextModel); SDXL's conditioner.embedders[0].wrapped
        # .transformer (CLIP-L) and embedders[1].wrapped.model (open_clip ViT-bigG-14, visual tower removed).
        sd_model = types.SimpleNamespace(is_sdxl=family == "sdxl")
        wrapper = torch.nn.Module()
        # ldm layer shapes do not matter to the name match; Linear(1, 1) stands for every layer.
        shapes = {n + ".weight": torch.Size([1, 1]) for n in ldm_layers}
        wrapper.diffusion_model = module_tree(shapes)
        sd_model.model = wrapper
        clip_l = hf_text_encoders("sd15")[0]
        if family == "sdxl":
            import open_clip
            with torch.device("meta"):
                bigg = open_clip.create_model("ViT-bigG-14", pretrained=None, device="meta")
            del bigg.visual
            embedders = []
            for attr, model in (("transformer", clip_l), ("model", bigg)):
                embedder = torch.nn.Module()
                embedder.wrapped = torch.nn.Module()
                embedder.wrapped.add_module(attr, model)
                embedders.append(embedder.wrapped)
                embedder.wrapped.wrapped = None  # FrozenCLIPEmbedderForSDXLWithCustomWords wraps the sgm embedder
            conditioner = types.SimpleNamespace(embedders=[types.SimpleNamespace(wrapped=e) for e in embedders])
            sd_model.conditioner = conditioner
        else:
            cond = torch.nn.Module()
            cond.transformer = clip_l
            sd_model.cond_stage_model = types.SimpleNamespace(wrapped=cond)
        shared.sd_model = sd_model
        networks.assign_network_names_to_compvis_modules(sd_model)

        # networks.load_network on a probe of every candidate name (kohya endings); it keeps the names it matched.
        layer_map = sd_model.network_layer_mapping
        with tempfile.TemporaryDirectory() as tmp:
            from safetensors.torch import save_file
            probe_file = Path(tmp) / "probe.safetensors"
            save_file({"x": torch.zeros(1)}, probe_file)
            matched = {}
            real_types = networks.module_types

            class Record:
                def create_module(self, net, weights):
                    matched[weights.network_key.split(".")[0]] = weights.sd_key
                    return object()

            networks.module_types = [Record()]
            disk = types.SimpleNamespace(filename=str(probe_file))
            for name in candidates:  # one name a file: several names of one layer would shadow each other
                probe_sd.clear()
                probe_sd.update({name + s: torch.zeros(1, 1) for s in KOHYA_SUFFIXES})
                networks.load_network("probe", disk)
            networks.module_types = real_types
            # The endings a LoRA module takes: the webui's own lora module type on one matched layer.
            some = next(iter(matched.values()))
            accepted = []
            for suffixes in (KOHYA_SUFFIXES, PEFT_SUFFIXES):
                w = {s[1:]: torch.zeros(1, 1) for s in suffixes}
                weights = network.NetworkWeights(network_key="probe", sd_key=some, w=w, sd_module=layer_map[some])
                if any(getattr(t, "create_module")(network.Network("probe", disk), weights) is not None
                       for t in real_types if type(t).__name__ == "ModuleTypeLora"):
                    accepted += suffixes

            # The version the Lora tab files it under (hidden while a checkpoint of another version is loaded).
            versions = []
            for metadata in ({"ss_base_model_version": "sdxl_base_v1-0"}, {"ss_base_model_version": "sd_v1"},
                             {"ss_network_dim": "4", "ss_network_alpha": "4"}, {"ss_v2": "True"}, {}):
                path = Path(tmp) / "v.safetensors"
                save_file({"x": torch.zeros(1)}, path, metadata=metadata)
                versions.append({"metadata": metadata,
                                 "version": network.NetworkOnDisk("v", str(path)).sd_version.name})
    return {"modules": dict(sorted(matched.items())), "suffixes": sorted(accepted), "version_detection": versions,
            "note": "a te2 q/k/v_proj LoRA lands on open_clip's fused MultiheadAttention and is applied only when "
                    "all of q, k, v and out_proj are present (networks.network_apply_weights)"}


# ---------------------------------------------------------------- sd-scripts

def sd_scripts(root: Path, family: str, candidates: list[str]) -> dict:
    with isolated_modules(("library", "networks")):
        sys.path.insert(0, str(root))
        stub("library", __path__=[str(root / "library")])
        stub("library.utils", setup_logging=lambda *a, **k: None)
        stub("library.model_util")
        stub("networks", __path__=[str(root / "networks")])
        original_unet = load("library.original_unet", root / "library/original_unet.py")
        sdxl_unet = load("library.sdxl_original_unet", root / "library/sdxl_original_unet.py")
        model_util = load("library.sdxl_model_util", root / "library/sdxl_model_util.py")  # noqa: F841
        lora = load("networks.lora", root / "networks/lora.py")

        with torch.device("meta"):
            unet = sdxl_unet.SdxlUNet2DConditionModel() if family == "sdxl" else original_unet.UNet2DConditionModel(
                **{k: v for k, v in configs.UNETS["sd15"].items() if k in original_unet.UNet2DConditionModel.__init__
                   .__code__.co_varnames})
        encoders = hf_text_encoders(family)
        network = lora.LoRANetwork(encoders if family == "sdxl" else encoders[0], unet, lora_dim=1, alpha=1,
                                   conv_lora_dim=1, conv_alpha=1, is_sdxl=family == "sdxl")
        network.apply_to(encoders if family == "sdxl" else encoders[0], unet, True, True)  # registers the modules
        keys = list(network.state_dict())  # what its load_weights takes: <module>.lora_down.weight, …
        names = {k.split(".")[0] for k in keys}
        suffixes = sorted({k[len(k.split(".")[0]):] for k in keys})
        modules = {n: n for n in names}
        if family == "sdxl":  # diffusers-named UNet keys: create_network_from_weights renames them first
            # A file's UNet keys are renamed together once any names down_blocks / up_blocks: probe each candidate
            # beside one such key (converted alone first), and read which name the candidate became.
            trigger = "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"
            alone = {trigger: None}
            lora.convert_diffusers_to_sai_if_needed(alone)
            for name in candidates:
                if not name.startswith("lora_unet_") or name in names:
                    continue
                sd = {trigger: None, name + ".lora_down.weight": None}
                lora.convert_diffusers_to_sai_if_needed(sd)
                new = [k.split(".")[0] for k in sd if k not in alone]
                if len(new) == 1 and new[0] in names:
                    modules[name] = new[0]
    return {"modules": dict(sorted(modules.items())), "suffixes": suffixes}


# ---------------------------------------------------------------- main

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", required=True)
    parser.add_argument("--webui", required=True)
    parser.add_argument("--sd-scripts", required=True)
    parser.add_argument("--out", default=str(ROOT / "tests" / "data" / "consumer_keys"))
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        comfy_root, comfy_commit = checkout(args.comfyui, [f"comfy/{f}" for f in (
            "utils.py", "lora.py", "model_detection.py", "clip_model.py", "weight_adapter", "sd1_clip_config.json",
            "clip_config_bigg.json")], tmp / "comfyui")
        webui_root, webui_commit = checkout(args.webui, ["extensions-builtin/Lora"], tmp / "webui")
        kohya_root, kohya_commit = checkout(args.sd_scripts, ["library", "networks"], tmp / "sd_scripts")
        for family in FAMILIES:
            unet = diffusers_unet(family)
            comfy, ldm_layers = comfyui(comfy_root, family)
            candidates = candidate_names(family, unet, ldm_layers, hf_text_encoders(family))
            results = {"comfyui": (comfy, comfy_commit, "Comfy-Org/ComfyUI (comfyanonymous/ComfyUI)"),
                       "a1111": (webui(webui_root, family, ldm_layers, candidates), webui_commit,
                                 "AUTOMATIC1111/stable-diffusion-webui"),
                       "sd_scripts": (sd_scripts(kohya_root, family, candidates), kohya_commit,
                                      "kohya-ss/sd-scripts")}
            for consumer, (data, commit, repo) in results.items():
                data = {"consumer": consumer, "repository": repo, "commit": commit, "family": family, **data}
                path = out / f"{consumer}-{family}.json"
                path.write_text(json.dumps(data, indent=0, sort_keys=False) + "\n")
                print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: "
                      f"{len(data['modules'])} module names, endings {data['suffixes']}")


if __name__ == "__main__":
    main()
