from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.models import make_adapter, tiny_model


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-layer Llama (hidden 64) saved as a safetensors folder, built once per session."""
    out = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_adapter_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rank-4 all-linear LoRA over tiny_llama_dir with random factors. Treat as read-only."""
    return make_adapter(tiny_llama_dir, tmp_path_factory.mktemp("tiny-adapter"))


@pytest.fixture(autouse=True)
def _quiet_bnb_cast(caplog: pytest.LogCaptureFixture) -> None:
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
