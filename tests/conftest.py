from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from tests.models import make_adapter, tiny_chat_model, tiny_model


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


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with a BPE tokenizer and chat template (random weights)."""
    return tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="session")
def tiny_chat_adapter_dir(tiny_chat_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(tiny_chat_dir, tmp_path_factory.mktemp("tiny-chat-adapter"))


@pytest.fixture(scope="session")
def pico_world() -> Any:
    """The pico world, built once (about a minute on 2 cores) and cached across runs under
    $ADAPTER_REPAIR_CACHE (default ~/.cache/adapter-repair)."""
    from adapter_repair.pico import build_pico_world

    return build_pico_world()


@pytest.fixture(autouse=True)
def _quiet_bnb_cast(caplog: pytest.LogCaptureFixture) -> None:
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
