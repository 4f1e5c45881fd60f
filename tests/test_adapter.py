"""Adapter folder I/O: round trip, scaling rules, atomic save, and every bad input."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from adapter_repair import adapter as adapter_mod
from adapter_repair.adapter import load_adapter, save_adapter
from adapter_repair.errors import AdapterFormatError, AdapterRepairError, UnsupportedAdapterError
from tests.models import make_adapter


def folder_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def adapter_copy(tiny_adapter_dir: Path, tmp_path: Path) -> Path:
    """A private, mutable copy of the session adapter."""
    out = tmp_path / "adapter"
    shutil.copytree(tiny_adapter_dir, out)
    return out


def test_round_trip_gives_equal_tensors_and_config(tiny_adapter_dir: Path, tmp_path: Path) -> None:
    before = folder_digest(tiny_adapter_dir)
    a = load_adapter(tiny_adapter_dir)
    assert len(a) == 3 * 7  # 3 layers x all seven linears
    m = a.modules["base_model.model.model.layers.0.self_attn.q_proj"]
    assert (m.rank, m.d_in, m.d_out) == (4, 64, 64)
    assert m.scaling == pytest.approx(8 / 4)
    out = save_adapter(a, tmp_path / "out")
    b = load_adapter(out)
    assert b.config == a.config
    assert json.loads((out / "adapter_config.json").read_text()) == json.loads(
        (tiny_adapter_dir / "adapter_config.json").read_text()
    )
    original = load_file(str(tiny_adapter_dir / "adapter_model.safetensors"))
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert original.keys() == saved.keys()
    for k, v in original.items():
        assert torch.equal(v, saved[k]), k
    assert (out / "README.md").read_bytes() == (tiny_adapter_dir / "README.md").read_bytes()
    assert folder_digest(tiny_adapter_dir) == before  # the input is never modified
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left over


def test_clone_is_independent(tiny_adapter_dir: Path) -> None:
    a = load_adapter(tiny_adapter_dir)
    b = a.clone()
    next(iter(b)).A.zero_()
    assert next(iter(a)).A.abs().sum() > 0


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"use_rslora": True},
        {
            "rank_pattern": {"o_proj": 2, "layers.1.mlp.down_proj": 6},
            "alpha_pattern": {"up_proj": 3},
        },
        {"use_rslora": True, "rank_pattern": {"k_proj": 8}, "alpha_pattern": {"q_proj": 32}},
    ],
    ids=["plain", "rslora", "patterns", "rslora+patterns"],
)
def test_scaling_and_rank_match_peft(
    tiny_llama_dir: Path, tmp_path: Path, overrides: dict[str, Any]
) -> None:
    folder = make_adapter(tiny_llama_dir, tmp_path / "a", **overrides)
    a = load_adapter(folder)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    peft_model = PeftModel.from_pretrained(model, str(folder))
    peft_modules = dict(peft_model.named_modules())
    for m in a:
        layer = peft_modules[m.key]
        assert m.scaling == pytest.approx(layer.scaling["default"]), m.key
        assert m.rank == layer.r["default"], m.key
        assert torch.equal(m.A, layer.lora_A["default"].weight.detach()), m.key
    if "rank_pattern" in overrides:
        assert {m.rank for m in a} != {4}


def test_save_is_atomic_when_writing_fails(
    tiny_adapter_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = load_adapter(tiny_adapter_dir)

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(adapter_mod, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_adapter(a, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary folder


def test_save_refuses_existing_output_and_the_input_itself(
    tiny_adapter_dir: Path, tmp_path: Path
) -> None:
    a = load_adapter(tiny_adapter_dir)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(AdapterFormatError, match="already exists"):
        save_adapter(a, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    with pytest.raises(AdapterFormatError, match="input adapter"):
        save_adapter(a, tiny_adapter_dir, overwrite=True)
    save_adapter(a, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists()
    assert load_adapter(tmp_path / "out").config == a.config


def test_modules_to_save_pass_through_with_a_warning(
    tiny_llama_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = make_adapter(
        tiny_llama_dir, tmp_path / "a", target_modules=["q_proj"], modules_to_save=["lm_head"]
    )
    with caplog.at_level(logging.WARNING, logger="adapter_repair"):
        a = load_adapter(folder)
    assert a.extra_tensors, "the lm_head copy should be carried"
    assert "non-LoRA tensor" in caplog.text
    out = save_adapter(a, tmp_path / "out")
    saved = load_file(str(out / "adapter_model.safetensors"))
    for k, v in a.extra_tensors.items():
        assert torch.equal(saved[k], v)


# --- bad input: one test each, through the library; tests/test_cli.py runs them through the CLI.


def _rewrite_config(folder: Path, edit: Callable[[dict[str, object]], None]) -> None:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    edit(cfg)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def _rewrite_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def break_missing_config(f: Path) -> None:
    (f / "adapter_config.json").unlink()


def break_config_not_json(f: Path) -> None:
    (f / "adapter_config.json").write_text('{"r": 4, "lora_alpha": ')


def break_config_missing_keys(f: Path) -> None:
    _rewrite_config(f, lambda c: c.__delitem__("lora_alpha"))


def break_pickle_only(f: Path) -> None:
    tensors = load_file(str(f / "adapter_model.safetensors"))
    (f / "adapter_model.safetensors").unlink()
    torch.save(tensors, f / "adapter_model.bin")


def break_truncated(f: Path) -> None:
    p = f / "adapter_model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def break_corrupt_header(f: Path) -> None:
    p = f / "adapter_model.safetensors"
    data = bytearray(p.read_bytes())
    data[8:40] = b"\x00garbage-not-a-json-header\xff\xfe\x00!!"
    p.write_bytes(bytes(data))


def break_nan(f: Path) -> None:
    def edit(t: dict[str, torch.Tensor]) -> None:
        k = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
        t[k][0, 0] = float("nan")

    _rewrite_tensors(f, edit)


def break_inf(f: Path) -> None:
    def edit(t: dict[str, torch.Tensor]) -> None:
        k = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"
        t[k][1, 2] = float("inf")

    _rewrite_tensors(f, edit)


def break_rank_too_large(f: Path) -> None:
    # k_proj is 64 -> 32 here: rank 40 cannot be a real factorisation.
    def edit(t: dict[str, torch.Tensor]) -> None:
        k = "base_model.model.model.layers.0.self_attn.k_proj"
        t[f"{k}.lora_A.weight"] = torch.randn(40, 64)
        t[f"{k}.lora_B.weight"] = torch.randn(32, 40)

    _rewrite_tensors(f, edit)
    _rewrite_config(f, lambda c: c.update(rank_pattern={"layers.0.self_attn.k_proj": 40}))


def break_dora(f: Path) -> None:
    _rewrite_config(f, lambda c: c.update(use_dora=True))


def break_embedding_lora(f: Path) -> None:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.randn(4, 128)
        t["base_model.model.model.embed_tokens.lora_embedding_B"] = torch.randn(64, 4)

    _rewrite_tensors(f, edit)


BAD_INPUTS: dict[str, tuple[Callable[[Path], None], type[AdapterRepairError], str]] = {
    "missing-config": (break_missing_config, AdapterFormatError, "no adapter_config.json"),
    "config-not-json": (break_config_not_json, AdapterFormatError, "not valid JSON"),
    "config-missing-keys": (break_config_missing_keys, AdapterFormatError, "lora_alpha"),
    "pickle-only": (break_pickle_only, AdapterFormatError, "safetensors only"),
    "truncated": (break_truncated, AdapterFormatError, "truncated or corrupt"),
    "corrupt": (break_corrupt_header, AdapterFormatError, "truncated or corrupt"),
    "nan": (break_nan, AdapterFormatError, "NaN or Inf"),
    "inf": (break_inf, AdapterFormatError, "NaN or Inf"),
    "rank-too-large": (break_rank_too_large, AdapterFormatError, "larger than its dimensions"),
    "dora": (break_dora, UnsupportedAdapterError, "DoRA"),
    "embedding-lora": (break_embedding_lora, UnsupportedAdapterError, "embedding"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_adapter_is_refused_with_a_fix(adapter_copy: Path, case: str) -> None:
    breaker, error, needle = BAD_INPUTS[case]
    breaker(adapter_copy)
    before = folder_digest(adapter_copy)
    with pytest.raises(error) as info:
        load_adapter(adapter_copy)
    assert needle in info.value.problem
    assert info.value.fix, "every error says what to do"
    assert folder_digest(adapter_copy) == before
