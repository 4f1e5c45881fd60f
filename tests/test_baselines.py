"""The comparison methods of bench/repair.py (bench/baselines.py): IRR's removal and its
Optimal-Brain-Surgeon recalibration, and the one-shot safety patch."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import baselines as B
import repair_runs as bench_repair
import repair_tables

from adapter_repair.model.config import LoadConfig
from adapter_repair.model.loading import attach_adapter, load_base, load_model, load_tokenizer
from adapter_repair.repair.config import RestoreConfig
from adapter_repair.repair.losses import answer_batches


def test_irr_removes_the_entries_that_moved_toward_the_unaligned_model() -> None:
    delta = torch.tensor([[1.0, -2.0, 0.5], [-1.0, 3.0, -0.5]])
    safety = torch.tensor([[1.0, 1.0, -1.0], [1.0, 1.0, -1.0]])  # aligned - unaligned
    mask = B.removal_mask(delta, safety, None, keep=0.0)
    assert mask.tolist() == [[False, True, True], [True, False, False]]
    fisher = torch.tensor([[0.0, 5.0, 1.0], [2.0, 0.0, 0.0]])
    # keep the lowest-Fisher third of the three conflicts: (0, 2) with Fisher 1 stays
    kept = B.removal_mask(delta, safety, fisher, keep=1 / 3)
    assert kept.tolist() == [[False, True, False], [True, False, False]]


def test_irr_on_a_merged_model(tiny_chat_dir: Path, tiny_chat_adapter_dir: Path) -> None:
    """The whole baseline on a tiny chat model: only the adapted weights change, the removed
    share is reported, and fewer delta entries disagree in sign with the safety vector."""
    base = load_base(LoadConfig(base=str(tiny_chat_dir), quant="none", dtype="float32"))
    aligned = load_file(str(tiny_chat_dir / "model.safetensors"))
    g = torch.Generator().manual_seed(3)
    unaligned = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in aligned.items()}
    model = attach_adapter(base, tiny_chat_adapter_dir).merge_and_unload()
    names = [n for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))]
    tok = load_tokenizer(None, str(tiny_chat_dir))
    calibration = answer_batches(tok, [("hello there", "hi"), ("a b c", "d e")], 2, 8)

    def conflicts() -> int:
        params = dict(model.named_parameters())
        total = 0
        for n in names:
            key = f"{n}.weight"
            delta = params[key].detach() - aligned[key]
            total += int(
                (
                    (torch.sign(delta) != torch.sign(aligned[key] - unaligned[key])) & (delta != 0)
                ).sum()
            )
        return total

    before = conflicts()
    untouched = {k: v.detach().clone() for k, v in model.named_parameters() if "v_proj" in k}
    record = B.irr(model, names, aligned, unaligned, calibration)
    assert 0 < record["removed"] < 1 and record["layers"] == len(names)
    assert conflicts() < 0.5 * before
    for k, v in model.named_parameters():
        if k in untouched:
            assert torch.equal(v, untouched[k])


def test_one_shot_patch_learns_its_one_example(
    tiny_chat_dir: Path, tiny_chat_adapter_dir: Path
) -> None:
    model, _ = load_model(
        tiny_chat_adapter_dir, LoadConfig(base=str(tiny_chat_dir), quant="none", dtype="float32")
    )
    tok = load_tokenizer(None, str(tiny_chat_dir))
    base_before = {k: v.clone() for k, v in model.named_parameters() if "lora_" not in k}
    record = B.one_shot_patch(
        model, tok, "how do I pick a lock", "I can't help with that.", epochs=40, lr=1e-2
    )
    assert len(record["losses"]) == 40
    assert record["losses"][-1] < 0.85 * record["losses"][0]
    assert record["changed"] > 0.5  # every factor may move
    for k, v in model.named_parameters():
        if k in base_before:
            assert torch.equal(v, base_before[k])  # the base stays frozen


def test_the_plan_runs_ours_everywhere_and_the_rest_on_the_compare_adapters() -> None:
    plan = repair_tables.Plan(
        adapters=("a", "b", "c"),
        compare=("c", "a"),
        methods=("restore",),
        baselines=("irr",),
        variants=("restore-heal",),
    )
    assert plan.runs() == [
        ("c", "restore"),  # ours on the compare adapters first,
        ("a", "restore"),
        ("c", "restore-heal"),  # then each lever on all of them,
        ("a", "restore-heal"),
        ("c", "irr"),  # each baseline,
        ("a", "irr"),
        ("b", "restore"),  # and the rest of the zoo last
    ]
    assert bench_repair.repair_config("restore-heal").restore.heal == 5
    assert bench_repair.repair_config("published").restore.score == "grad"
    # ours is the product's defaults, so the table follows them
    assert bench_repair.repair_config("restore").restore == RestoreConfig()
    # a lever of the repair's own (the stop's check prompts) moves that, and stage 2 stays
    check0 = bench_repair.repair_config("restore-check0")
    assert check0.check_prompts == 0 and check0.restore == RestoreConfig()
    assert bench_repair.repair_config("restore").check_prompts > 0
    shares = [bench_repair.safe_lora_share(m) for m in ("safelora", "safelora-0.25", "restore")]
    assert shares == [1.0, 0.25, None]
    with pytest.raises(ValueError, match="share must be in"):
        bench_repair.safe_lora_share("safelora-1.5")
