"""adapter-repair: restore the refusals a LoRA fine-tune removed, at adapter rank.

The library loads a PEFT LoRA adapter and its (possibly quantized) base, walks the PEFT model
once to find every LoRA module with its decoder layer and its role in the residual stream, and
repairs the adapter factors. It never prints and never talks to the Hub.

Names are imported lazily (PEP 562), so ``import adapter_repair`` and ``adapter-repair --help``
do not pay for torch and transformers until they are used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from adapter_repair.version import __version__

_EXPORTS = {
    "AdapterRepairError": "adapter_repair.errors",
    "LoadConfig": "adapter_repair.model.config",
    "ProjectConfig": "adapter_repair.repair.config",
    "RepairConfig": "adapter_repair.repair.config",
    "RestoreConfig": "adapter_repair.repair.config",
    "RepairResult": "adapter_repair.repair.loop",
    "repair": "adapter_repair.repair.pipeline",
    "repair_folder": "adapter_repair.repair.pipeline",
    "LoraAdapter": "adapter_repair.adapter",
    "LoraModule": "adapter_repair.adapter",
    "load_adapter": "adapter_repair.adapter",
    "save_adapter": "adapter_repair.adapter",
    "last_token_hidden": "adapter_repair.model.hidden",
    "attach_adapter": "adapter_repair.model.loading",
    "load_base": "adapter_repair.model.loading",
    "load_model": "adapter_repair.model.loading",
    "load_prompt_file": "adapter_repair.measure.prompts",
    "LoraSite": "adapter_repair.model.walk",
    "ModelMap": "adapter_repair.model.walk",
    "Role": "adapter_repair.adapter",
    "walk": "adapter_repair.model.walk",
}

__all__ = [
    "AdapterRepairError",
    "LoadConfig",
    "LoraAdapter",
    "LoraModule",
    "LoraSite",
    "ModelMap",
    "ProjectConfig",
    "RepairConfig",
    "RepairResult",
    "RestoreConfig",
    "Role",
    "__version__",
    "attach_adapter",
    "last_token_hidden",
    "load_adapter",
    "load_base",
    "load_model",
    "load_prompt_file",
    "repair",
    "repair_folder",
    "save_adapter",
    "walk",
]

if TYPE_CHECKING:
    from adapter_repair.adapter import LoraAdapter, LoraModule, Role, load_adapter, save_adapter
    from adapter_repair.errors import AdapterRepairError
    from adapter_repair.measure.prompts import load_prompt_file
    from adapter_repair.model.config import LoadConfig
    from adapter_repair.model.hidden import last_token_hidden
    from adapter_repair.model.loading import attach_adapter, load_base, load_model
    from adapter_repair.model.walk import LoraSite, ModelMap, walk
    from adapter_repair.repair.config import ProjectConfig, RepairConfig, RestoreConfig
    from adapter_repair.repair.loop import RepairResult
    from adapter_repair.repair.pipeline import repair, repair_folder


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'adapter_repair' has no attribute {name!r}")
