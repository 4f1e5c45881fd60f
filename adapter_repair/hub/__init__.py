"""Everything that talks to the Hugging Face Hub: pull an adapter and its base by repo id
(pinned by commit sha), write the model card, push the repaired adapter as one commit or a pull
request, and the Hub CI bot (:mod:`adapter_repair.hub.bot`).

This package alone imports ``huggingface_hub``; the library (``adapter_repair`` outside ``hub``
and ``cli``) repairs local folders. ``fix`` is the Python entry point of
``adapter-repair fix SOURCE``; ``PushConfig`` says whether and where it pushes.

Names are imported lazily (PEP 562), so importing a leaf such as :mod:`adapter_repair.hub.config`
does not load huggingface_hub and the repair stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "FixOutcome": "adapter_repair.hub.fix",
    "fix": "adapter_repair.hub.fix",
    "PushConfig": "adapter_repair.hub.config",
}

__all__ = ["FixOutcome", "PushConfig", "fix"]

if TYPE_CHECKING:
    from adapter_repair.hub.config import PushConfig
    from adapter_repair.hub.fix import FixOutcome, fix


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'adapter_repair.hub' has no attribute {name!r}")
