"""How the base model is loaded under the adapter (no torch at import: ``--help`` stays instant)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from adapter_repair.settings import check_choices, setting

if TYPE_CHECKING:
    import torch

    from adapter_repair.adapter import LoraAdapter

logger = logging.getLogger(__name__)

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
        "The precision the adapter is measured and repaired at: the base loaded 4bit (NF4, as "
        "QLoRA trains and as PeftModel.from_pretrained loads a QLoRA adapter), 8bit, or none "
        "(the adapter as merged into the unquantized base). auto: what the adapter was trained "
        "over, as its folder records it (a bitsandbytes 4-bit config in its card, or a *-bnb-4bit "
        "base: 4bit), else none.",
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
        """``quant`` with auto read as none; :meth:`for_adapter` reads auto from an adapter."""
        return "none" if self.quant == "auto" else self.quant

    def for_adapter(self, adapter: LoraAdapter, *, log: bool = True) -> LoadConfig:
        """This config with ``quant`` auto resolved from what ``adapter`` was trained over
        (:meth:`~adapter_repair.adapter.LoraAdapter.trained_quant`); explicit values stay.
        ``log``: say the choice and why (once per load: the loader does)."""
        if self.quant != "auto":
            return self
        quant, why = adapter.trained_quant()
        logger.log(
            logging.INFO if log else logging.DEBUG,
            "precision: %s (%s)%s",
            quant or "none",
            why,
            "" if quant else "; pass --quant 4bit for a QLoRA adapter",
        )
        return replace(self, quant=quant or "none")

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
