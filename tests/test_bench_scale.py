"""bench/scale.py builds the 7B shape on a CPU machine one decoder layer at a time: a
checkpoint that loads over the 4-bit base as any other, with its adapter."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import scale as bench_scale

from adapter_repair.model.config import LoadConfig
from adapter_repair.model.loading import load_model

SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}


def test_the_streamed_base_has_one_shard_a_layer_and_loads_in_4bit_with_its_adapter(
    tiny_chat_dir: Path, tmp_path: Path
) -> None:
    base, adapter = bench_scale.streamed_llama(SHAPE, tmp_path / "shape", tiny_chat_dir)
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(index.values()))
    assert len(shards) == SHAPE["num_hidden_layers"] + 1  # the layers, then the rest
    for shard in shards:  # each layer's tensors in one shard and nothing else in it
        with safe_open(str(base / shard), "pt") as f:
            names = set(f.keys())
        layers = {k.split(".")[2] for k in names if k.startswith("model.layers.")}
        assert len(layers) <= 1
        assert names == {k for k, v in index.items() if v == shard}
    assert "lm_head.weight" not in index  # tied to the embedding
    model, lora = load_model(adapter, LoadConfig(base=str(base), quant="4bit", dtype="bfloat16"))
    assert len(lora.modules) == 7 * SHAPE["num_hidden_layers"]
    assert {x.rank for x in lora.modules.values()} == {16}
    packed = [p for p in model.parameters() if p.__class__.__name__ == "Params4bit"]
    assert len(packed) == 7 * SHAPE["num_hidden_layers"]
    # built once: a second call reads what is there
    assert bench_scale.streamed_llama(SHAPE, tmp_path / "shape", tiny_chat_dir) == (base, adapter)
