"""Pull an adapter and its base from the Hub into the Hugging Face cache, pinned by sha.

Only the files a repair needs come down: the adapter's config, safetensors and card (and its
tokenizer, when it ships one: fine-tunes often change the chat template); the base's config,
safetensors shards and tokenizer. Pickle weights are never downloaded. Each pull resolves the
revision to a commit sha first and downloads that sha, so the report's provenance names exactly
what was repaired, and a rerun after a dropped connection resumes the same files.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, snapshot_download

from adapter_repair.errors import AdapterFormatError, AdapterRepairError
from adapter_repair.hub.errors import hub_errors

logger = logging.getLogger(__name__)

TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
]
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "README.md", *TOKENIZER_FILES]
BASE_FILES = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    *TOKENIZER_FILES,
]
#: owner/name, optionally @revision (a branch, tag, sha, or refs/pr/N)
REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")


@dataclass(frozen=True)
class HubRef:
    """A Hub model repo and a revision (None: the default branch)."""

    repo_id: str
    revision: str | None = None

    @classmethod
    def parse(cls, text: str) -> HubRef:
        """``owner/name`` or ``owner/name@revision``; a clear error for anything else."""
        m = REPO_ID.match(text)
        if not m:
            raise AdapterRepairError(
                f"{text!r} is neither a folder on this machine nor a Hub repo id.",
                "Give the path of a local adapter folder, or a repo id as owner/name "
                "(optionally owner/name@revision).",
            )
        return cls(m["repo"], m["rev"])

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id


@dataclass(frozen=True)
class Pulled:
    """A repo revision downloaded into the cache: ``path`` holds its files at commit ``sha``."""

    repo_id: str
    revision: str | None
    sha: str
    path: Path


def _resolve(api: HfApi, ref: HubRef, what: str) -> tuple[str, set[str]]:
    """The commit sha ``ref`` points at, and the files of the repo at that commit."""
    logger.info("resolving %s on %s", ref, api.endpoint)
    with hub_errors(what, ref.repo_id):
        info = api.model_info(ref.repo_id, revision=ref.revision)
    return str(info.sha), {s.rfilename for s in info.siblings or []}


def _snapshot(api: HfApi, ref: HubRef, sha: str, patterns: list[str], what: str) -> Path:
    with hub_errors(what, ref.repo_id):
        path = snapshot_download(
            ref.repo_id,
            revision=sha,
            allow_patterns=patterns,
            endpoint=api.endpoint,
            token=api.token,
        )
    return Path(path)


def pull_adapter(ref: HubRef, *, api: HfApi | None = None) -> Pulled:
    """Download the LoRA adapter at ``ref``: checked to be one (a config and safetensors)
    before any weights come down."""
    api = api or HfApi()
    what = f"download the adapter {ref}"
    sha, names = _resolve(api, ref, what)
    at = f"{ref.repo_id}@{sha[:8]}"
    if "adapter_config.json" not in names:
        raise AdapterFormatError(
            f"{at} has no adapter_config.json: it is not a PEFT adapter repo.",
            "Give the repo of a LoRA adapter (adapter_config.json and adapter_model.safetensors)"
            "; a merged model cannot be repaired at adapter rank.",
        )
    if "adapter_model.safetensors" not in names:
        if "adapter_model.bin" in names:
            raise AdapterFormatError(
                f"{at} ships its weights only as adapter_model.bin, a pickle: loading it could "
                "run arbitrary code, so adapter-repair reads safetensors only.",
                "Ask the owner to add adapter_model.safetensors (PeftModel.save_pretrained "
                "writes it by default), or convert it yourself where you trust the file.",
            )
        raise AdapterFormatError(
            f"{at} has adapter_config.json but no adapter_model.safetensors.",
            "Upload the adapter's weights next to its config.",
        )
    logger.info("downloading the adapter %s (commit %s)", ref.repo_id, sha[:12])
    path = _snapshot(api, ref, sha, ADAPTER_FILES, what)
    return Pulled(ref.repo_id, ref.revision, sha, path)


def pull_base(ref: HubRef, *, api: HfApi | None = None) -> Pulled:
    """Download the base model at ``ref``: its config, safetensors weights and tokenizer."""
    api = api or HfApi()
    what = f"download the base model {ref}"
    sha, names = _resolve(api, ref, what)
    at = f"{ref.repo_id}@{sha[:8]}"
    if "config.json" not in names:
        raise AdapterRepairError(
            f"the base {at} has no config.json: it is not a transformers model repo.",
            "Pass --base with the model the adapter was trained on (a Hub id or a local folder).",
        )
    if not any(n.endswith(".safetensors") for n in names):
        raise AdapterRepairError(
            f"the base {at} has no safetensors weights (only pickle files, which "
            "adapter-repair does not load).",
            "Pass --base with a copy of the model in safetensors (most Hub models have one, "
            "sometimes under a refs/pr revision: --base-revision).",
        )
    logger.info("downloading the base %s (commit %s)", ref.repo_id, sha[:12])
    path = _snapshot(api, ref, sha, BASE_FILES, what)
    return Pulled(ref.repo_id, ref.revision, sha, path)


def quiet_downloads() -> None:
    """No download bars from huggingface_hub: a command that draws its own bar (``fix`` on a
    terminal) keeps it the only one."""
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
