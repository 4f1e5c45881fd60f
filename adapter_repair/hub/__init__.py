"""Everything that talks to the Hugging Face Hub (download, push, model card, the CI bot).

This package alone imports ``huggingface_hub``; the library (``adapter_repair`` outside ``hub``
and ``cli``) takes paths or ids that transformers resolves. Filled in by the Hub issue.
"""
