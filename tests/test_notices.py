"""The libraries' notices that are expected in this series are silenced at their source (helpers.core.notices), by
logger and words, and nothing else of those loggers is: a reader's page shows what matters."""
from __future__ import annotations

import logging
import subprocess
import sys
import warnings

from tiny_runs import train_tiny_run

from helpers.core import notices
from helpers.core.presets import get_preset
from helpers.generate.sampling import load_pipeline
from helpers.methods.runs import RunSet


class Caught(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _said(logger_name: str, message: str) -> list[str]:
    logger, caught = logging.getLogger(logger_name), Caught()
    logger.addHandler(caught)
    try:
        logger.warning(message)
    finally:
        logger.removeHandler(caught)
    return caught.messages


def test_the_notices_expected_everywhere_are_silenced_and_nothing_else_of_their_loggers():
    for notice in notices.EVERYWHERE:
        assert _said(notice.logger, f"{notice.words}: and the rest of it") == [], notice
        assert _said(notice.logger, "something else went wrong") == ["something else went wrong"], notice


def test_a_notice_expected_in_one_place_is_silenced_there_only():
    lora = notices.LORA_WITHOUT_TEXT_ENCODER[0]
    said = f"{lora.words} found with the prefix='text_encoder'"
    assert _said(lora.logger, said) == [said]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with notices.expected(notices.LORA_WITHOUT_TEXT_ENCODER, notices.SECOND_ADAPTER):
            assert _said(lora.logger, said) == []
            warnings.warn(f"{notices.SECOND_ADAPTER.words}. This will lead to …")
            warnings.warn("another warning")
    assert [str(w.message) for w in caught] == ["another warning"]
    assert _said(lora.logger, said) == [said]


def test_bitsandbytes_says_nothing_about_optional_cpu_kernels_once_helpers_is_imported():
    code = "import helpers.core, bitsandbytes, peft; print('imported')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "imported", done.stderr
    assert "kernels-community" not in done.stderr, done.stderr


def test_loading_a_unet_only_lora_run_prints_nothing(tmp_path, capfd):
    folder = train_tiny_run(tmp_path, "lora")
    pipe = load_pipeline(get_preset("sd15_xattn_cifar10", "tiny"), "cpu")
    capfd.readouterr()
    runs = RunSet(pipe)
    runs.add(folder, "first")
    runs.add(folder, "second")  # a second adapter in the same UNet, as notebook 05 loads every run
    out, err = capfd.readouterr()
    assert "No LoRA keys" not in err and "peft_config" not in err, err
    assert err.strip() == "", err
