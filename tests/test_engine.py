"""helpers.engine on tiny finished runs: what each phase frees (weak references), what the T4 rules keep loaded
(the T4-dtype mode), the size a base model draws at, and images the SD1.5 safety checker withholds."""
from __future__ import annotations

import gc
import weakref

import pytest

from helpers.catalog import Catalog
from helpers.engine import Engine
from tiny_runs import train_tiny_run

LORA = "sd15_xattn_cifar10-lora-tiny"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("storage")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAB_STORAGE", str(root))
        train_tiny_run(root, "lora")
    return root


def test_unload_frees_the_pipeline_while_variants_are_still_referenced(root):
    engine = Engine(Catalog.scan("tiny", root), scorer=None, device="cpu")
    variants = [engine.variant("SD1.5 base"), engine.variant(LORA, 0.5)]  # what evaluate_runs keeps in a loop
    pipe = weakref.ref(engine.pipeline("SD1.5 base"))
    engine.unload()
    gc.collect()
    assert pipe() is None, "the SD1.5 pipeline outlived engine.unload() through its variants"
    with pytest.raises(RuntimeError, match="freed"):
        variants[1].apply(None)
