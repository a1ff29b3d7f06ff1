"""Every training method by name, written out: the preset's `method` field picks one. A new method is a class of
helpers.methods.method.Method and a line here; the training loop does not change."""
from __future__ import annotations

from ..core.presets import Preset
from .crossattn import CrossAttention
from .ip_adapter import IPAdapter
from .lora import Lora
from .method import Method
from .priors import DiffusionPriorMethod, MlpPriorMethod

METHODS: dict[str, type[Method]] = {
    "crossattn": CrossAttention,  # notebook 02
    "lora": Lora,  # notebooks 02 (variant) and 03
    "ip_adapter": IPAdapter,  # notebook 04 part 1
    "mlp_prior": MlpPriorMethod,  # notebook 04 part 2
    "diffusion_prior": DiffusionPriorMethod,  # notebook 04 part 2
}


def method_class(name: str) -> type[Method] | None:
    """The class of method `name`, None if unknown."""
    return METHODS.get(name)


def make_method(preset: Preset) -> Method:
    cls = method_class(preset.method)
    if cls is None:
        raise ValueError(f"unknown method {preset.method!r}; known: {sorted(METHODS)}")
    return cls(preset)
