"""How the base model is loaded under the adapter (no torch at import: ``--help`` stays instant)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from adapter_repair.settings import check_choices, setting

if TYPE_CHECKING:
    import torch

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
