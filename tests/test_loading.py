"""Base loading (fp32, bf16, 8-bit, 4-bit), the disabled adapter as the aligned model, the
bitsandbytes CPU trap, and the adapter-versus-base checks."""

from __future__ import annotations

import shutil
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import dequantize_4bit, has_avx512bf16
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from adapter_repair.errors import BaseMismatchError
from adapter_repair.model.config import LoadConfig
from adapter_repair.model.loading import fix_bnb_cpu_trap, load_base, load_model
from tests.models import make_adapter, tiny_model

IDS = torch.tensor([[5, 17, 42, 99, 3, 64, 7, 21]])


def logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=ids).logits.float()
        return out


@pytest.mark.parametrize(
    ("quant", "dtype", "layer_type", "tol"),
    [
        ("none", "float32", torch.nn.Linear, 0.0),
        ("none", "bfloat16", torch.nn.Linear, 0.05),
        ("8bit", "auto", bnb.nn.Linear8bitLt, 0.1),
        ("4bit", "auto", bnb.nn.Linear4bit, 0.3),
    ],
)
def test_load_quantized_base_with_adapter(
    tiny_llama_dir: Path,
    tiny_adapter_dir: Path,
    quant: str,
    dtype: str,
    layer_type: type,
    tol: float,
) -> None:
    reference = logits(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32))
    model, _ = load_model(
        tiny_adapter_dir, LoadConfig(base=str(tiny_llama_dir), quant=quant, dtype=dtype)
    )
    assert isinstance(model, PeftModel)
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer) is layer_type
    with model.disable_adapter():
        aligned = logits(model)
    tuned = logits(model)
    assert torch.isfinite(tuned).all()
    # The quantized base stays close to the fp32 base, and the adapter really changes outputs.
    err = (aligned - reference).norm() / reference.norm()
    assert err <= tol + 1e-6, f"{quant}/{dtype}: relative error {err:.3f}"
    assert (tuned - aligned).norm() / aligned.norm() > 0.01


@pytest.mark.parametrize("quant", ["none", "4bit"])
def test_disabled_adapter_equals_bare_base_exactly(
    tiny_llama_dir: Path, tiny_adapter_dir: Path, quant: str
) -> None:
    config = LoadConfig(base=str(tiny_llama_dir), quant=quant)
    bare = logits(load_base(config))
    model, _ = load_model(tiny_adapter_dir, config)
    with model.disable_adapter():
        assert torch.equal(logits(model), bare)


def test_enabled_adapter_equals_the_merged_update(
    tiny_llama_dir: Path, tiny_adapter_dir: Path
) -> None:
    """W + s B A, computed from our adapter object, is what the PeftModel runs."""
    model, adapter = load_model(
        tiny_adapter_dir, LoadConfig(base=str(tiny_llama_dir), quant="none")
    )
    merged = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for m in adapter:
            modules[m.base_name].weight += m.delta()
    assert torch.allclose(logits(model), logits(merged), atol=1e-4, rtol=1e-4)


def _lora_grads(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _dequantized_fp32_twin(model_4bit: PeftModel, base_dir: Path, adapter_dir: Path) -> PeftModel:
    fp32 = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    fp32_modules = dict(fp32.named_modules())
    with torch.no_grad():
        for name, m in model_4bit.get_base_model().named_modules():
            if isinstance(m, bnb.nn.Linear4bit):
                w = dequantize_4bit(m.weight.data, m.weight.quant_state).float()
                fp32_modules[name.removesuffix(".base_layer")].weight.copy_(w)
    return PeftModel.from_pretrained(fp32, str(adapter_dir), is_trainable=True)


def _grads_after_eval_generate(
    base_dir: Path, adapter_dir: Path, fix: bool
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model = AutoModelForCausalLM.from_pretrained(
        base_dir,
        quantization_config=_nf4(),
        dtype=torch.float32,
        device_map="cpu",
    )
    if fix:
        fix_bnb_cpu_trap(model)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    twin = _dequantized_fp32_twin(peft_model, base_dir, adapter_dir)
    peft_model.eval()
    with torch.no_grad():  # the evaluate step of evaluate -> repair -> evaluate
        peft_model.generate(input_ids=IDS[:, :4], max_new_tokens=4, do_sample=False)
    return _lora_grads(peft_model, IDS), _lora_grads(twin, IDS)


def _nf4() -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )


def _max_rel_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / (b[k].norm() + 1e-12)) for k in a)


def test_4bit_lora_gradients_stay_right_after_an_eval_generate(
    tiny_llama_dir: Path, tiny_adapter_dir: Path
) -> None:
    """The regression test ../shared/NOTES.md asks for: LoRA gradients through the 4-bit base,
    after an eval-mode generate under no_grad, equal those of an fp32 model holding the
    dequantized weights. load_base applies the fix; this checks the fix itself."""
    fixed, reference = _grads_after_eval_generate(tiny_llama_dir, tiny_adapter_dir, fix=True)
    assert _max_rel_error(fixed, reference) < 1e-3


@pytest.mark.skipif(not has_avx512bf16(), reason="the trap only exists on AVX512-BF16 CPUs")
def test_without_the_fix_the_trap_is_real(tiny_llama_dir: Path, tiny_adapter_dir: Path) -> None:
    """Shows the regression test above can fail: on these CPUs, without the fix, gradients
    after an eval-mode generate are wrong."""
    broken, reference = _grads_after_eval_generate(tiny_llama_dir, tiny_adapter_dir, fix=False)
    assert _max_rel_error(broken, reference) > 0.1


def test_load_base_applies_the_fix(tiny_llama_dir: Path) -> None:
    model = load_base(LoadConfig(base=str(tiny_llama_dir), quant="4bit"))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)


# --- the adapter against the base


def test_shapes_that_do_not_match_the_base(tiny_adapter_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "wider"
    tiny_model("llama", intermediate_size=96).save_pretrained(other)
    with pytest.raises(
        BaseMismatchError, match="128 -> 64 linear layer, the base has 96 -> 64"
    ) as e:
        load_model(tiny_adapter_dir, LoadConfig(base=str(other)))
    assert "--base" in e.value.fix


def test_target_modules_the_base_lacks(tiny_adapter_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "shallow"
    tiny_model("llama", num_hidden_layers=2).save_pretrained(other)
    with pytest.raises(BaseMismatchError, match=r"not in the base .*layers\.2"):
        load_model(tiny_adapter_dir, LoadConfig(base=str(other)))


def test_recorded_base_of_another_architecture(tiny_adapter_dir: Path, tmp_path: Path) -> None:
    # Same dimensions and module names, other architecture: only the record can tell.
    other = tmp_path / "qwen2"
    tiny_model("qwen2").save_pretrained(other)
    with pytest.raises(BaseMismatchError, match=r"\(llama\) but the base given is .*\(qwen2\)"):
        load_model(tiny_adapter_dir, LoadConfig(base=str(other)))


def test_missing_base_is_a_clear_error(tiny_adapter_dir: Path, tmp_path: Path) -> None:
    adapter = tmp_path / "a"
    shutil.copytree(tiny_adapter_dir, adapter)
    with pytest.raises(Exception, match="cannot load base model") as e:
        load_model(adapter, LoadConfig(base=str(tmp_path / "nowhere")))
    assert "--base" in str(e.value)


def test_adapter_trained_over_4bit_reloads_over_4bit(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """QLoRA-style: an adapter saved from a 4-bit PeftModel loads back over the 4-bit base."""
    folder = make_adapter(tiny_llama_dir, tmp_path / "q", target_modules=["q_proj", "down_proj"])
    model, adapter = load_model(folder, LoadConfig(base=str(tiny_llama_dir), quant="4bit"))
    assert len(adapter) == 6
    assert torch.isfinite(logits(model)).all()


# --- the precision the adapter is used in

QLORA_CARD = """---
library_name: peft
---
## Training procedure

The following `bitsandbytes` quantization config was used during training:
- quant_method: bitsandbytes
- load_in_8bit: False
- load_in_4bit: True
- bnb_4bit_quant_type: nf4
"""


def _is_4bit(model: torch.nn.Module) -> bool:
    return any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


@pytest.mark.parametrize(
    ("card", "quant", "loaded_4bit"),
    [
        (QLORA_CARD, "auto", True),  # the card says QLoRA: measured as it is used
        (None, "auto", False),  # nothing recorded: the adapter merged into the full base
        (QLORA_CARD, "none", False),  # an explicit value wins over the card
        (None, "4bit", True),
    ],
)
def test_auto_precision_follows_what_the_adapter_was_trained_over(
    tiny_llama_dir: Path,
    tiny_adapter_dir: Path,
    tmp_path: Path,
    card: str | None,
    quant: str,
    loaded_4bit: bool,
) -> None:
    folder = tmp_path / "a"
    shutil.copytree(tiny_adapter_dir, folder)
    (folder / "README.md").unlink(missing_ok=True)
    if card is not None:
        (folder / "README.md").write_text(card)
    config = LoadConfig(base=str(tiny_llama_dir), quant=quant)
    model, adapter = load_model(folder, config)
    assert _is_4bit(model) == loaded_4bit
    assert config.for_adapter(adapter).resolved_quant() == ("4bit" if loaded_4bit else "none")


@pytest.mark.parametrize(
    ("card", "base", "expected"),
    [
        ("- load_in_4bit: True\n- bnb_4bit_compute_dtype: bfloat16", "org/model", "4bit"),
        ('"load_in_4bit": true', "org/model", "4bit"),
        # an 8-bit card dumps the 4-bit keys too (older PEFT cards list the whole config)
        (
            "- load_in_8bit: True\n- load_in_4bit: False\n- bnb_4bit_quant_type: fp4",
            "org/model",
            "8bit",
        ),
        ("- load_in_4bit: False\n- bnb_4bit_quant_type: fp4", "org/model", None),
        ("- load_in_4bit: False", "org/model", None),
        ("", "unsloth/llama-3-8b-Instruct-bnb-4bit", "4bit"),
        ("", "org/model-4bit", "4bit"),
        ("", "org/llama-3-8b", None),
        ("A LoRA for 4 bits of trivia.", "org/model", None),
    ],
)
def test_trained_quant_reads_the_card_and_the_base_name(
    tiny_adapter_dir: Path, tmp_path: Path, card: str, base: str, expected: str | None
) -> None:
    from adapter_repair.adapter import load_adapter

    adapter = load_adapter(tiny_adapter_dir)
    adapter.files["README.md"] = card.encode()
    adapter.config["base_model_name_or_path"] = base
    quant, why = adapter.trained_quant()
    assert quant == expected
    assert why  # the log says why, either way
