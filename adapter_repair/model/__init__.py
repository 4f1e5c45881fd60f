"""Loading the base under the adapter (4/8-bit, dtype), the one walk of the PeftModel that finds
each LoRA module's decoder layer and role, prompts as model inputs, the last-token hidden state
h_L, and the answer-only loss. Imports nothing above it: only the base modules (adapter,
errors, settings)."""
