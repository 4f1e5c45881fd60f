"""The same loading checks on a CUDA GPU (marked gpu: CI has none; run on a GPU machine)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapter_repair.adapter import Role
from adapter_repair.model.config import LoadConfig
from adapter_repair.model.hidden import last_token_hidden
from adapter_repair.model.loading import load_base, load_model
from adapter_repair.model.walk import walk

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("quant", ["4bit", "8bit", "none"])
def test_cuda_load_walk_and_h_L(tiny_llama_dir: Path, tiny_adapter_dir: Path, quant: str) -> None:
    config = LoadConfig(base=str(tiny_llama_dir), quant=quant, device_map="cuda")
    ids = torch.tensor([[5, 17, 42, 99]], device="cuda")
    with torch.no_grad():
        bare = load_base(config)(input_ids=ids).logits
    model, _ = load_model(tiny_adapter_dir, config)
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(model(input_ids=ids).logits, bare)
    mm = walk(model)
    assert sum(s.role is Role.WRITE for s in mm) == 6
    with torch.no_grad():
        full = model(input_ids=ids, output_hidden_states=True).hidden_states
        h = last_token_hidden(model, ids, None, 2)
    assert torch.allclose(h.float(), full[2][:, -1].float(), atol=1e-3)
