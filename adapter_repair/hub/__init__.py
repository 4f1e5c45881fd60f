"""Everything that talks to the Hugging Face Hub: pull an adapter and its base by repo id
(pinned by commit sha), write the model card, push the repaired adapter as one commit or a pull
request.

This package alone imports ``huggingface_hub``; the library (``adapter_repair`` outside ``hub``
and ``cli``) repairs local folders. ``fix`` is the Python entry point of
``adapter-repair fix SOURCE``.
"""

from adapter_repair.hub.fix import FixOutcome, fix

__all__ = ["FixOutcome", "fix"]
