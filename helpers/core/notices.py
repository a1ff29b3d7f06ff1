"""Notices the libraries print that are expected in this series and tell a reader nothing, silenced at their source:
by the logger that prints them and the words they start with, nothing else of that logger. A notice that is only
expected in one place (a UNet-only LoRA has no text-encoder keys) is silenced there alone, by `expected(...)`.

    install()                       # once, when helpers.core is imported: the notices expected everywhere
    with expected(LORA_WITHOUT_TEXT_ENCODER):
        pipe.load_lora_weights(...)
"""
from __future__ import annotations

import logging
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class Notice:
    logger: str  # the logging.getLogger name that prints it ("" for a warnings.warn)
    words: str  # what it says: the record's message contains these words
    why: str  # why a reader of the series need not see it


# expected wherever the series runs
BNB_CPU_KERNELS = Notice(
    "bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community",
    "bitsandbytes looks for optional CPU kernels of 4-bit matmuls at import; the series never quantizes to 4 bits")
EMPTY_FP32_MODULES = Notice(
    "diffusers.models.modeling_utils", "that should be kept in float32: []",
    "diffusers says this on every .to(dtype=…) of a model, even one with no module to keep in float32 (the list is "
    "empty): nothing is cast that should not be")
IP_ADAPTER_WITHOUT_ENCODER = Notice(
    "diffusers.loaders.ip_adapter", "image_encoder is not loaded since `image_encoder_folder=None`",
    "notebook 04's runs draw from given CLIP image embeddings, so no image encoder is loaded, by design")
EVERYWHERE = (BNB_CPU_KERNELS, EMPTY_FP32_MODULES, IP_ADAPTER_WITHOUT_ENCODER)

# expected in one place only: silenced there with `expected`
LORA_WITHOUT_TEXT_ENCODER = (
    Notice("diffusers.loaders.lora_base", "No LoRA keys associated to CLIPTextModel",
           "a run that trained no text-encoder LoRA has no text-encoder keys; its file loads whole"),
    Notice("diffusers.loaders.peft", "No LoRA keys associated to CLIPTextModel",
           "the same notice, from diffusers' other LoRA loader"))
SECOND_ADAPTER = Notice(
    "", "Already found a `peft_config` attribute in the model",
    "peft says it when a second LoRA joins the same UNet as a named adapter, which is how RunSet switches runs")


class _Silence(logging.Filter):
    def __init__(self, notices):
        super().__init__()
        self.words = tuple(n.words for n in notices)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a record that does not format is not one of ours: let it through
            return True
        return not any(words in message for words in self.words)


def _by_logger(notices) -> dict[str, list[Notice]]:
    grouped: dict[str, list[Notice]] = {}
    for notice in notices:
        grouped.setdefault(notice.logger, []).append(notice)
    return grouped


_INSTALLED: set[str] = set()


def install() -> None:
    """Silence the notices expected everywhere (EVERYWHERE), once per process. The loggers need not exist yet:
    `logging.getLogger` returns the same object to the library when it imports."""
    for name, notices in _by_logger(EVERYWHERE).items():
        if name not in _INSTALLED:
            logging.getLogger(name).addFilter(_Silence(notices))
            _INSTALLED.add(name)


@contextmanager
def expected(*notices):
    """Silence these notices (Notice objects or tuples of them) while the block runs, and only them."""
    flat = [n for item in notices for n in (item if isinstance(item, tuple) else (item,))]
    added = []
    with warnings.catch_warnings():
        for name, group in _by_logger(flat).items():
            if name == "":
                for notice in group:
                    warnings.filterwarnings("ignore", message=f".*{re.escape(notice.words)}")
                continue
            silence = _Silence(group)
            logging.getLogger(name).addFilter(silence)
            added.append((name, silence))
        try:
            yield
        finally:
            for name, silence in added:
                logging.getLogger(name).removeFilter(silence)
