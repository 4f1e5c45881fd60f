from __future__ import annotations

import logging
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Before huggingface_hub is imported (it reads these once): every Hub call of the test session
# goes to the local Hub server on a loopback port of its own (tests/hub_server.py; refused
# when no test started it), the HF cache and login live in a temporary HF_HOME (never the
# developer's token), and uploads skip Xet, which the local server does not speak.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


HUB_PORT = _free_port()
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{HUB_PORT}"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="adapter-repair-hf-home-")
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ.pop("HF_TOKEN", None)

import pytest  # noqa: E402

from tests.models import make_adapter, tiny_chat_model, tiny_model  # noqa: E402


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
    from adapter_repair.beds.pico import build_pico_world

    return build_pico_world()


@pytest.fixture(scope="session")
def pico_world_seed1() -> Any:
    """A second pico world, built from seed 1 (another minute): the repair's bar must hold on
    more than one build."""
    from adapter_repair.beds.pico import PicoRecipe, build_pico_world

    return build_pico_world(PicoRecipe(seed=1))


@pytest.fixture(autouse=True)
def _quiet_bnb_cast(caplog: pytest.LogCaptureFixture) -> None:
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


#: the local Hub's tokens: token -> (user, role)
HUB_TOKENS = {
    "hf_alicewrite0000000000": ("alice", "write"),
    "hf_bobwrite000000000000": ("bob", "write"),
    "hf_bobread0000000000000": ("bob", "read"),
    "hf_botwrite000000000000": ("repair-bot", "write"),
}


@pytest.fixture(scope="session")
def local_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The local Hub server on HF_ENDPOINT's port, for the whole session."""
    from tests.hub_server import LocalHub

    hub = LocalHub(tmp_path_factory.mktemp("local-hub"), port=HUB_PORT, tokens=dict(HUB_TOKENS))
    with hub:
        yield hub


@pytest.fixture
def hub(local_hub: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The local Hub, online (CI exports HF_HUB_OFFLINE=1 for every other test), no token
    set: a test sets HF_TOKEN to one of HUB_TOKENS."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return local_hub


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server (Debian's; .ci/run installs it) on a free loopback port."""
    import shutil
    import subprocess
    import time

    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed: apt-get install -y redis-server")
    port = _free_port()
    folder = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    import redis

    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)
