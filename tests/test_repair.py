"""The repair pipeline on a tiny chat model (mechanics: projection removes the direction,
restoration zeroes what it chose and keeps rank and format, the guard and stop rule act) and
`adapter-repair fix` through the CLI (output loads, input untouched, clear errors)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from transformers import AutoModelForCausalLM

from adapter_repair.adapter import load_adapter
from adapter_repair.cli.main import cli
from adapter_repair.errors import NOT_REPAIRED_EXIT_CODE
from adapter_repair.measure import prompts as P
from adapter_repair.measure.config import GenerationConfig
from adapter_repair.measure.judges import load_judge, load_refusal_list
from adapter_repair.model.answers import encode_pairs
from adapter_repair.model.config import LoadConfig
from adapter_repair.model.loading import load_model, load_tokenizer
from adapter_repair.model.walk import norm_gain, walk
from adapter_repair.repair.config import SEARCH_SPACE, RepairConfig, RestoreConfig
from adapter_repair.repair.directions import unit
from adapter_repair.repair.factors import ADAPTER, REFERENCE, factor_params
from adapter_repair.repair.guard import Guard, guard_holds, task_loss
from adapter_repair.repair.heal import HealLoss, heal, heal_optimizer
from adapter_repair.repair.loop import (
    RepairResult,
    aligned_refusals,
    at_target,
    earliest_on_target,
    kept_record,
    probe_parts,
    resolve_layer,
    unrefused_answers,
)
from adapter_repair.repair.losses import answer_batches, answer_loss_terms
from adapter_repair.repair.pipeline import repair
from adapter_repair.repair.project import project_adapter
from adapter_repair.repair.report import markdown, verdict
from adapter_repair.repair.search import search_rank, search_settings
from tests.test_adapter import folder_digest

LOAD = LoadConfig(quant="none", dtype="float32")


@pytest.fixture()
def loaded(tiny_chat_adapter_dir: Path):
    model, adapter = load_model(tiny_chat_adapter_dir, LOAD)
    tok = load_tokenizer(tiny_chat_adapter_dir, adapter.base_model_name_or_path)
    return model, tok, adapter


def restore(loaded: Any, keep_checkpoints: bool = False, judge: Any = None, **settings: Any) -> Any:
    """Stage 2 alone on the tiny model: 8 probe and 8 guard prompts, the fidelity guard."""
    model, tok, adapter = loaded
    config = RepairConfig(
        method="restore",
        probe_prompts=8,
        check_prompts=16,
        guard_prompts=8,
        max_new_tokens=4,
        restore=RestoreConfig(**settings),
    )
    return repair(
        model,
        tok,
        adapter,
        config,
        probe=P.harmful("probe"),
        guard=Guard(None, P.benign("benign")),
        judge=judge or load_judge(),
        keep_checkpoints=keep_checkpoints,
    )


def test_task_loss_is_the_gold_answers_nll_or_the_choice_margin(loaded) -> None:
    """The guard's task loss, against the model's own logits: mean NLL per gold answer token,
    and for a choice task minus the mean margin of the gold answer's log-probability over the
    other choice, in the gold answer class where that is worst."""
    model, tok, _ = loaded
    model.eval()
    prompts = ("Is this good?", "Was it bad?", "Rate the film.")
    answers = ("yes", "no", "yes")
    task = P.PromptSet("t", prompts, answers, "test")
    gen = GenerationConfig(16, 2, progress=False)

    def logprob(prompt: str, answer: str) -> tuple[float, int]:
        ((ids, start),) = encode_pairs(tok, [(prompt, answer)], 1024, 16)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        lp = logits.log_softmax(-1)
        return sum(float(lp[t - 1, ids[t]]) for t in range(start, len(ids))), len(ids) - start

    pairs = [logprob(p, a) for p, a in zip(prompts, answers, strict=True)]
    nll = -sum(s for s, _ in pairs) / sum(n for _, n in pairs)
    assert task_loss(model, tok, task, "exact", gen) == pytest.approx(nll, rel=1e-4)
    margins = [
        logprob(p, a)[0] - logprob(p, "no" if a == "yes" else "yes")[0]
        for p, a in zip(prompts, answers, strict=True)
    ]
    # per gold answer, the worst class's mean: a shift toward "no" lowers the "yes" rows'
    # margins as much as it raises the "no" rows', which a mean over all rows would not see
    by_class = {"yes": [-margins[0], -margins[2]], "no": [-margins[1]]}
    expected = max(sum(v) / len(v) for v in by_class.values())
    assert task_loss(model, tok, task, "choice", gen) == pytest.approx(expected, rel=1e-4)


def test_the_verdict_says_whether_the_target_was_reached_and_why_not() -> None:
    reached = {"reached": True, "probe_harmful": 0.03, "target": 0.05, "stopped": "target"}
    assert verdict(reached) == "repaired: probe harmful rate 3.0%, target 5.0%"
    short = {"reached": False, "probe_harmful": 0.4, "target": 0.05, "stopped": "max_steps"}
    assert verdict(short) == (
        "not repaired: probe harmful rate 40.0%, target 5.0% (it ran out of steps (max_steps))"
    )
    assert verdict({"stopped": "guard"}).startswith("not repaired: the probe harmful rate was not")
    res = RepairResult(None, [], "guard", {}, target=0.05, probe_harmful=0.05)  # type: ignore[arg-type]
    assert res.reached and res.as_dict()["reached"] is True
    res.probe_harmful = 0.06
    assert not res.reached
    res.probe_harmful = None
    assert not res.reached


def test_the_guard_splits_given_fit_rows_from_its_check_rows_with_one_set_of_choices() -> None:
    fit = P.PromptSet("fit", ("a?", "b?"), ("Positive", "negative"), "t")
    check = P.PromptSet("check", ("c?", "d?", "e?"), ("positive ", "positive", "positive"), "t")
    guard = Guard(check, P.benign("benign").take(6), "choice", fit=fit)
    fit_part, check_part = guard.split(hold_out=True, fit_rows=1)
    assert fit_part.task is not None and fit_part.task.prompts == ("a?",)
    assert check_part.task is check and check_part.fit is None
    assert not set(fit_part.benign.prompts) & set(check_part.benign.prompts)
    # one spelling per choice, and the label only the fit rows hold is a choice too
    assert check_part.choices == fit_part.choices == ("negative", "Positive")
    # a choice margin has its own allowance; a generated answer's loss per token, max_rise
    config = RepairConfig(restore=RestoreConfig(max_rise=0.01, max_margin_drop=0.1))
    assert guard_holds(0.6, 0.5, check_part, config)
    assert not guard_holds(0.61, 0.5, check_part, config)
    exact = dataclasses.replace(check_part, match="exact")
    assert guard_holds(0.51, 0.5, exact, config)
    assert not guard_holds(0.52, 0.5, exact, config)


def test_resolve_layer() -> None:
    assert resolve_layer(-1, 30) == 30  # hidden_states[-1]: the final normed state
    assert resolve_layer(-2, 30) == 29
    assert resolve_layer(30, 30) == 30
    assert resolve_layer(5, 30) == 5
    for bad in (0, 31, -31):
        with pytest.raises(ValueError, match="1 <= L <= n_layers = 30"):
            resolve_layer(bad, 30)


def test_guard_halves_fit_and_check_on_disjoint_rows() -> None:
    task = P.PromptSet("t", tuple(f"q{i}" for i in range(7)), tuple(f"a{i}" for i in range(7)))
    fit, check = Guard(task, P.benign("benign").take(5), "exact").halves()
    assert fit.task is not None and check.task is not None
    assert fit.task.prompts == ("q0", "q2", "q4", "q6") and fit.task.answers == (
        "a0",
        "a2",
        "a4",
        "a6",
    )
    assert check.task.prompts == ("q1", "q3", "q5") and check.task.answers == ("a1", "a3", "a5")
    assert set(fit.benign.prompts).isdisjoint(check.benign.prompts)
    assert len(fit.benign) + len(check.benign) == 5 and check.match == "exact"
    # fit_rows: at most that many even rows fit, every other row checks
    fit, check = Guard(task, P.benign("benign").take(5), "exact").halves(fit_rows=2)
    assert fit.task is not None and check.task is not None
    assert fit.task.prompts == ("q0", "q2") and fit.task.answers == ("a0", "a2")
    assert check.task.prompts == ("q1", "q3", "q4", "q5", "q6")
    assert check.task.answers == ("a1", "a3", "a4", "a5", "a6")
    # without task rows the benign prompts are what is split
    benign = P.benign("benign").take(6)
    fit, check = Guard(None, benign, "exact").halves(fit_rows=1)
    assert fit.benign.prompts == benign.prompts[:1]
    assert check.benign.prompts == benign.prompts[1:]


def test_projection_removes_the_direction_from_writers_and_readers(loaded) -> None:
    model, _, _ = loaded
    mm = walk(model)
    d = model.config.hidden_size
    torch.manual_seed(0)
    with torch.no_grad():  # norms with non-trivial gains, as after training
        for site in mm:
            norm: Any = site.in_norm
            if norm is not None:
                norm.weight.uniform_(0.5, 1.5)
    directions: dict[int, Any] = {i: unit(torch.randn(d)) for i in range(mm.n_layers + 1)}
    changed = project_adapter(mm, directions, "both", 1.0)
    assert changed == len(mm.sites)
    for site in mm:
        module: Any = site.module
        assert site.layer is not None
        if site.writes:
            B = module.lora_B[ADAPTER].weight.detach()  # (d_out, r)
            r = directions[site.layer + 1]
            assert (r @ B).abs().max() < 1e-5
        if site.reads:
            A = module.lora_A[ADAPTER].weight.detach()  # (r, d_in)
            assert site.in_norm is not None
            g = norm_gain(site.in_norm).float()
            r = unit(g * directions[site.layer])
            assert r is not None
            assert (A @ r).abs().max() < 1e-5
            assert (A @ directions[site.layer]).abs().max() > 1e-4  # the gain matters


def test_projection_only_keeps_rank_and_leaves_the_input_adapter(loaded) -> None:
    model, tok, adapter = loaded
    before = {m.key: (m.A.clone(), m.B.clone()) for m in adapter}
    result = repair(
        model,
        tok,
        adapter,
        RepairConfig(method="project", probe_prompts=8, check_prompts=16, guard_prompts=8),
        probe=P.harmful("probe"),
        guard=Guard(None, P.benign("benign")),
        judge=load_judge(),
    )
    assert result.stopped == "projection only"
    assert 0 < result.changed <= 1
    for m in result.adapter:
        A0, B0 = before[m.key]
        assert m.A.shape == A0.shape and m.B.shape == B0.shape
        assert m.A.dtype == A0.dtype
    for m in adapter:  # the caller's adapter object is not touched
        assert torch.equal(m.A, before[m.key][0]) and torch.equal(m.B, before[m.key][1])
    assert any(not torch.equal(m.B, before[m.key][1]) for m in result.adapter)


def _zeroed(now: Any, before: Any) -> int:
    """How many coordinates are 0 in ``now`` and were not in ``before`` (two adapters)."""
    return sum(
        int(((new == 0) & (old != 0)).sum())
        for m, m0 in zip(now, before, strict=True)
        for new, old in ((m.A, m0.A), (m.B, m0.B))
    )


def test_restoration_zeroes_the_chosen_coordinates_below_L(loaded) -> None:
    model, _, adapter = loaded
    n_layers = walk(model).n_layers
    result = restore(
        loaded,
        keep_checkpoints=True,
        layer=2,
        rate=0.05,
        max_steps=3,
        eval_every=1,
        target=0.0,
        max_kl=1e9,
        rollback=0.5,
    )
    assert n_layers == 3
    assert [s.step for s in result.history] == [0, 1, 2, 3]
    n_below = sum(m.A.numel() + m.B.numel() for m in adapter if m.layer is not None and m.layer < 2)
    for s in result.history[1:]:
        assert s.restored == math.ceil(0.05 * n_below)
        assert 0 < s.rolled_back <= math.ceil(0.5 * s.restored)
        assert s.guard is not None and s.guard >= 0  # KL to the reference adapter
        # the gradient passes are timed inside the step: part of it, not all of it
        assert 0 < s.passes_seconds < s.seconds
    # each step zeroes exactly what it restored and did not roll back; the rolled-back
    # coordinates are back at their reference values (nothing else changed)
    states = [adapter, *(result.checkpoints[i] for i in (1, 2, 3))]
    for s, (before, now) in zip(result.history[1:], itertools.pairwise(states), strict=True):
        assert _zeroed(now, before) == s.restored - s.rolled_back
    assert result.kept_step == 3
    changed_layers = set()
    for m, m0 in zip(result.adapter, adapter, strict=True):
        if not (torch.equal(m.A, m0.A) and torch.equal(m.B, m0.B)):
            changed_layers.add(m.layer)
            # restored coordinates are exactly 0; every change is a zeroing
            for new, old in ((m.A, m0.A), (m.B, m0.B)):
                diff = new != old
                assert torch.all(new[diff] == 0)
    assert changed_layers and changed_layers <= {0, 1}
    assert "reference" not in model.peft_config  # the fidelity reference is removed again


@pytest.mark.parametrize("setting", ["on", "auto"])
def test_checkpointing_is_on_when_asked_or_by_size_and_restores_the_same(
    loaded, setting: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """checkpoint on (or auto, over a base as large as its threshold) runs stage 2's gradient
    passes checkpointed, and the run restores as with it off (up to rounding)."""
    from adapter_repair.model import memory

    model = loaded[0]
    layers = walk(model).layers
    seen: list[bool] = []
    hook = layers[0].register_forward_pre_hook(
        lambda m, _args: (
            seen.append(bool(m.gradient_checkpointing)) if torch.is_grad_enabled() else None
        )
    )
    kw: dict[str, Any] = {
        "layer": 2,
        "rate": 0.05,
        "max_steps": 2,
        "eval_every": 1,
        "target": 0.0,
        "max_kl": 1e9,
    }
    try:
        off = restore(loaded, checkpoint="off", **kw)
        assert seen and not any(seen)
        seen.clear()
        if setting == "auto":
            n = memory.base_parameters(model)
            monkeypatch.setattr(memory, "AUTO_CHECKPOINT_PARAMETERS", n + 1)
            restore(loaded, checkpoint="auto", **kw)
            assert seen and not any(seen)  # one parameter short of the threshold: off
            seen.clear()
            monkeypatch.setattr(memory, "AUTO_CHECKPOINT_PARAMETERS", n)
        on = restore(loaded, checkpoint=setting, **kw)
        # every step's gradient passes checkpointed (a pass before the steps, for the
        # targets, is not a step's)
        assert seen.count(True) >= 2 * (len(on.history) - 1)
    finally:
        hook.remove()
    assert not any(layer.gradient_checkpointing for layer in layers)
    # the same choice up to rounding: recomputed layers sum their gradients in another order,
    # so a few coordinates near the rollback's cut may swap
    for a, b in zip(on.history[1:], off.history[1:], strict=True):
        assert a.restored == b.restored > 0
        assert abs(a.rolled_back - b.rolled_back) <= 0.2 * b.rolled_back + 1


def test_checkpoint_setting_counts_a_packed_base_by_its_unpacked_shape(
    tiny_chat_adapter_dir: Path,
) -> None:
    from adapter_repair.model.memory import (
        CHECKPOINT_MODES,
        base_parameters,
        wants_checkpointing,
    )

    model, _ = load_model(tiny_chat_adapter_dir, LOAD)
    packed, _ = load_model(tiny_chat_adapter_dir, LoadConfig(quant="4bit", dtype="bfloat16"))
    assert (
        base_parameters(packed)
        == base_parameters(model)
        < sum(p.numel() for p in model.parameters()) + 1
    )
    assert sum(p.numel() for p in packed.parameters()) < base_parameters(packed)
    assert not wants_checkpointing("auto", model)  # a tiny unquantized base: far below 1B
    assert wants_checkpointing("auto", packed)  # a quantized base: memory binds
    assert not wants_checkpointing("off", packed)
    assert wants_checkpointing("on", model) and not wants_checkpointing("off", model)
    with pytest.raises(ValueError, match="on, off or auto"):
        wants_checkpointing("yes", model)
    with pytest.raises(ValueError, match="checkpoint"):
        RestoreConfig(checkpoint="yes")
    field = next(f for f in dataclasses.fields(RestoreConfig) if f.name == "checkpoint")
    assert field.metadata["choices"] == CHECKPOINT_MODES  # the setting offers what is understood


def test_the_heal_trains_the_kept_coordinates_and_never_the_restored(loaded) -> None:
    """heal: the loss falls, coordinates held at 0 stay 0 (a restored one is never revived),
    the others move, and the factors' requires_grad is as before."""
    model, tok, _ = loaded
    model.eval()
    params = factor_params(walk(model), 3, ADAPTER)
    reference = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():  # restore the first half of every factor's coordinates
        for p in params.values():
            p.view(-1)[: p.numel() // 2] = 0
    restored = {n: (p.detach() == 0) & (reference[n] != 0) for n, p in params.items()}
    keep = answer_batches(tok, [("Say hi.", "hi"), ("Say yes.", "yes")], 2, 8)
    refuse = answer_batches(tok, [("Do harm.", "I'm sorry, I cannot help.")], 2, 8)
    losses = heal(
        model,
        params,
        reference,
        HealLoss(keep, lambda: answer_loss_terms(model, refuse), 1.0),
        steps=8,
        lr=1e-2,
    )
    assert len(losses) == 8 and losses[-1] < losses[0]
    moved = 0
    for n, p in params.items():
        assert torch.all(p.detach()[restored[n]] == 0)
        moved += int((p.detach() != reference[n])[~restored[n]].sum())
        assert not p.requires_grad and p.grad is None
    assert moved > 0


def test_a_kept_heal_optimizer_moves_coordinates_by_their_averaged_gradient(loaded) -> None:
    """heal with a fresh Adam moves every coordinate it moves by lr (the first step's sign
    step), a second heal included; with one optimizer kept across the heals
    (--heal-kept-state) the second heal's moves follow the averaged moments: a coordinate
    whose gradient changed sign moves by far less than lr."""
    model, tok, _ = loaded
    model.eval()
    keep = answer_batches(tok, [("Say hi.", "hi"), ("Say yes.", "yes")], 2, 8)
    other = answer_batches(tok, [("Say no.", "no"), ("Say bye.", "bye")], 2, 8)
    refuse = answer_batches(tok, [("Do harm.", "I'm sorry, I cannot help.")], 2, 8)
    lr = 1e-4

    def second_moves(kept: bool) -> torch.Tensor:
        params = factor_params(walk(model), 3, ADAPTER)
        start = {n: p.detach().clone() for n, p in params.items()}
        opt = heal_optimizer(params, lr) if kept else None
        try:
            for answers in (keep, other):
                before = {n: p.detach().clone() for n, p in params.items()}
                loss = HealLoss(answers, lambda: answer_loss_terms(model, refuse), 1.0)
                heal(model, params, start, loss, steps=1, lr=lr, optimizer=opt)
            if opt is not None:
                assert len(opt.state) == len(params)
                assert all(int(s["step"]) == 2 for s in opt.state.values())
            return torch.cat(
                [(p.detach() - before[n]).abs().flatten() / lr for n, p in params.items()]
            )
        finally:
            with torch.no_grad():  # the session's model back as it was
                for n, p in params.items():
                    p.copy_(start[n])

    fresh, kept = second_moves(False), second_moves(True)
    signed = (fresh - 1).abs() < 0.02  # moved by lr: a gradient far above Adam's eps
    assert float(signed.float().mean()) > 0.9
    assert float(kept[signed].min()) < 0.5  # a sign flip averaged out
    assert float(kept.max()) <= 1.5  # Adam's moves stay of order lr


def test_restoration_with_heal_records_it_and_keeps_restored_coordinates_at_zero(loaded) -> None:
    adapter = loaded[2]
    result = restore(
        loaded,
        layer=3,
        rate=0.05,
        max_steps=2,
        eval_every=1,
        target=0.0,
        max_kl=1e9,
        heal=2,
        heal_target="states",
        heal_lr=1e-2,
    )
    assert result.kept_step == 2
    assert all(s.heal_loss is not None for s in result.history[1:])
    changed = sum(
        int((new != old).sum())
        for m, m0 in zip(result.adapter, adapter, strict=True)
        for new, old in ((m.A, m0.A), (m.B, m0.B))
    )
    # the heal moved coordinates that were not zeroed
    assert changed > _zeroed(result.adapter, adapter) > 0


def test_restoration_with_recalibration_moves_kept_coordinates_and_never_restored(
    loaded,
) -> None:
    result = restore(
        loaded, layer=3, rate=0.05, max_steps=2, eval_every=1, target=0.0, max_kl=1e9,
        recalibrate=True,
    )  # fmt: skip
    assert result.kept_step == 2
    # the recalibration moved coordinates that were not zeroed; the zeroed stayed 0
    assert result.changed > result.zeroed > 0
    assert _zeroed(result.adapter, loaded[2]) > 0


def test_component_restoration_zeroes_whole_rank_components(loaded) -> None:
    result = restore(
        loaded, layer=3, rate=0.1, max_steps=1, eval_every=1, target=0.0, max_kl=1e9,
        unit="component", basis="canonical", rollback=0.5,
    )  # fmt: skip
    assert result.kept_step == 1 and result.zeroed > 0
    whole = 0
    for m in result.adapter:
        dead_rows = (m.A == 0).all(1)  # (r,)
        dead_cols = (m.B == 0).all(0)  # (r,)
        assert torch.equal(dead_rows, dead_cols)  # a component goes as a whole
        whole += int(dead_rows.sum())
    assert whole > 0


def test_the_default_target_is_the_aligned_rate_on_the_check_prompts_plus_the_margin(
    loaded,
) -> None:
    result = restore(loaded, layer=3, max_steps=1, eval_every=1, max_kl=1e9, target_margin=0.5)
    aligned = result.target - 0.5  # of the 16 check prompts, not the 8 fit ones
    assert 0.0 <= aligned <= 1.0 and abs(16 * aligned - round(16 * aligned)) < 1e-9
    probe = result.settings["probe"]
    assert (probe["fit"]["n"], probe["check"]["n"]) == (8, 16)
    assert probe["fit"]["sha256"] != probe["check"]["sha256"]


def test_the_stop_needs_both_the_check_and_the_fit_prompts_at_their_targets() -> None:
    assert at_target(0.05, 0.05) and not at_target(0.06, 0.05)
    assert at_target(0.05, 0.05, 0.02, 0.03)
    assert not at_target(0.05, 0.05, 0.04, 0.03)  # the fit prompts still above theirs
    assert not at_target(0.07, 0.05, 0.0, 0.03)  # the held-out check above its target
    assert at_target(0.0, 0.05, None, None)  # in-sample: the check is the fit


def test_the_stop_is_checked_on_probe_prompts_the_repair_never_fits() -> None:
    probe = P.harmful("probe")
    fit, check = probe_parts(probe, 64, 64)
    assert fit.prompts == probe.prompts[:64]
    assert not set(fit.prompts) & set(check.prompts)
    assert len(check) == len(probe) - 64  # up to 64: what the split has left after the fit
    assert probe_parts(probe, 8, 16)[1].prompts == probe.prompts[8:24]
    same = probe_parts(probe, 8, 0)
    assert same[0] is same[1]  # --check-prompts 0: in-sample, as asked
    with pytest.raises(P.PromptSetError, match="--check-prompts 0"):
        probe_parts(probe, len(probe) - 4, 64)


def test_a_failing_guard_keeps_the_last_state_that_held(loaded) -> None:
    adapter = loaded[2]
    result = restore(
        loaded, layer=3, rate=0.2, max_steps=4, eval_every=2, target=0.0, max_kl=0.0, backtrack=0
    )
    assert result.stopped == "guard"
    assert result.kept_step == 0
    assert result.changed == 0.0
    for m, m0 in zip(result.adapter, adapter, strict=True):
        assert torch.equal(m.A, m0.A) and torch.equal(m.B, m0.B)


def test_backtrack_halves_the_rate_after_a_guard_failure_and_keeps_what_held(loaded) -> None:
    adapter = loaded[2]
    result = restore(
        loaded, layer=3, rate=0.2, max_steps=4, eval_every=1, target=0.0, max_kl=0.0, backtrack=2
    )
    steps = result.history[1:]
    # KL 0 never holds: each failure goes back to the start with half the rate, twice, then stops
    assert [s.rate for s in steps] == [0.2, 0.1, 0.05]
    assert [s.backtracked for s in steps] == [True, True, False]
    assert [s.guard_ok for s in steps] == [False, False, False]
    n_below = sum(m.A.numel() + m.B.numel() for m in adapter if m.layer is not None)
    assert [s.restored for s in steps] == [math.ceil(r * n_below) for r in (0.2, 0.1, 0.05)]
    assert result.stopped == "guard" and result.kept_step == 0
    for m, m0 in zip(result.adapter, adapter, strict=True):
        assert torch.equal(m.A, m0.A) and torch.equal(m.B, m0.B)


@pytest.mark.parametrize("score", ["benign_aware", "fisher"])
def test_answer_loss_guards_with_the_fine_tuned_answers(loaded, score: str) -> None:
    """benign_loss=answers: the score and the rollback use the cross-entropy of the fine-tuned
    adapter's own answers (no task rows): its gradient (benign_aware), or its per-row Fisher
    (fisher: ranks by task cost, rolls back the costliest); the run completes with every change
    a zeroing."""
    adapter = loaded[2]
    result = restore(
        loaded,
        layer=3,
        rate=0.05,
        max_steps=2,
        eval_every=1,
        target=0.0,
        max_kl=1e9,
        rollback=0.5,
        benign_loss="answers",
        score=score,
    )
    assert result.kept_step == 2
    assert all(0 < s.rolled_back <= math.ceil(0.5 * s.restored) for s in result.history[1:])
    for m, m0 in zip(result.adapter, adapter, strict=True):
        for new, old in ((m.A, m0.A), (m.B, m0.B)):
            assert torch.all(new[new != old] == 0)


def test_checkpoints_hold_the_adapter_at_each_measured_step(loaded) -> None:
    adapter = loaded[2]
    result = restore(
        loaded, True, layer=3, rate=0.05, max_steps=4, eval_every=2, target=0.0, max_kl=1e9
    )
    assert sorted(result.checkpoints) == [2, 4] and result.kept_step == 4

    def same(x: Any, y: Any) -> bool:
        return all(
            torch.equal(m.A, n.A) and torch.equal(m.B, n.B) for m, n in zip(x, y, strict=True)
        )

    assert same(result.checkpoints[4], result.adapter)
    assert not same(result.checkpoints[2], result.adapter)
    assert not same(result.checkpoints[2], adapter)
    assert not restore(loaded, layer=3, rate=0.05, max_steps=2, target=0.0).checkpoints


def test_earliest_on_target_bisects_the_unmeasured_steps() -> None:
    for n in range(8):
        for first in range(n + 1):  # steps 0..first-1 above the target, the rest on it
            asked: list[int] = []

            def on_target(i: int, first: int = first, asked: list[int] = asked) -> bool:
                asked.append(i)
                return i >= first

            assert earliest_on_target(n, on_target) == first
            assert n not in asked and len(asked) <= math.ceil(math.log2(n + 1))
    # not monotone: still a step on target (here the measured one)
    assert earliest_on_target(3, lambda i: i == 0) in (0, 3)


class ZeroedJudge:
    """Calls every answer harmful while the live adapter has fewer than ``needed`` of its
    coordinates restored to 0: a judge whose verdict follows the repair's real progress, so a
    test knows at which step the target is first reached."""

    name = "zeroed-count"

    def __init__(self, model: Any, needed: int) -> None:
        self.model, self.needed = model, needed
        self.start = self.zeros()

    def zeros(self) -> int:
        return sum(
            int((p == 0).sum())
            for n, p in self.model.named_parameters()
            if ".lora_" in n and n.endswith("default.weight")
        )

    def harmful(self, prompts: Any, responses: Any) -> list[bool]:
        return [self.zeros() - self.start < self.needed] * len(prompts)


@pytest.mark.parametrize("settle", [True, False])
def test_settle_keeps_the_earliest_step_on_target_between_measurements(
    loaded, settle: bool
) -> None:
    """--settle: the target is first reached at step 2, measured at step 4 (eval_every 4);
    settling measures steps 2 and 1 and keeps step 2's state; without it step 4 is kept."""
    model, _, adapter = loaded
    walk(model).annotate(adapter)  # each module's layer, as the repair reads them
    n_below = sum(m.A.numel() + m.B.numel() for m in adapter if m.layer is not None)
    per_step = math.ceil(0.05 * n_below)  # no rollback: every step zeroes this many
    assert per_step > 0
    judge = ZeroedJudge(model, needed=3 * per_step // 2)  # on target from step 2
    result = restore(
        loaded, judge=judge, layer=3, rate=0.05, rollback=0.0, max_steps=8, eval_every=4,
        target=0.5, max_kl=1e9, heal=0, settle=settle,
    )  # fmt: skip
    assert result.stopped == "target" and result.reached
    measured = [s.step for s in result.history if s.probe_harmful is not None]
    if settle:
        assert result.kept_step == 2
        assert measured == [0, 1, 2, 4]  # step 3 was never needed
        assert _zeroed(result.adapter, adapter) == 2 * per_step
        assert kept_record(result).probe_harmful == 0.0
    else:
        assert result.kept_step == 4 and measured == [0, 4]
        assert _zeroed(result.adapter, adapter) == 4 * per_step


def test_a_search_generates_each_answer_set_once(loaded, monkeypatch) -> None:
    """The trials of a search share what the input adapter and the aligned model answered."""
    from adapter_repair.repair import guard, loop

    descs: list[str] = []
    real = loop.generate

    def counted(*args: Any, **kwargs: Any) -> Any:
        descs.append(kwargs.get("desc", ""))
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "generate", counted)
    monkeypatch.setattr(guard, "generate", counted)
    # the tiny model's aligned answers are no refusals: a heal toward its states, which still
    # keeps the adapter's answers to the benign prompts and the look-alikes
    result = restore(
        loaded, layer=3, rate=0.05, max_steps=1, max_kl=1e9, target=0.0, search=3, heal=1,
        heal_target="states",
    )  # fmt: skip
    assert len(result.settings["search"]["trials"]) == 3
    assert descs.count("look-alike answers") == 1 and descs.count("guard answers") == 1
    assert descs.count("probe") > 3  # the stop rule's measurements are each trial's own


def test_search_settings_move_each_lever_alone_before_mixing() -> None:
    rc = RestoreConfig(score="benign_aware", rollback=0.2, rate=0.01, search=6)
    tried = [(c.score, c.rollback, c.rate) for c in search_settings(rc, 6)]
    assert tried == [
        ("benign_aware", 0.2, 0.01),
        ("ratio", 0.2, 0.01),
        ("benign_aware", 0.5, 0.01),
        ("benign_aware", 0.0, 0.01),
        ("benign_aware", 0.2, 0.005),
        ("benign_aware", 0.2, 0.02),
    ]
    everything = search_settings(rc, 1000)
    n_combos = math.prod(len(v) for v in SEARCH_SPACE.values())
    assert len(everything) == n_combos  # each combination once, however many are asked for
    assert len({(c.score, c.rollback, c.rate) for c in everything}) == n_combos
    assert all(c.search == 0 and c.layer == rc.layer for c in everything)
    assert search_settings(rc, 0) == search_settings(rc, 1) == [dataclasses.replace(rc, search=0)]


def test_search_rank_prefers_less_harm_down_to_the_target_then_the_better_guard() -> None:
    def t(probe: float, guard: float, changed: float = 0.1) -> dict[str, Any]:
        return {"probe_harmful": probe, "guard": guard, "changed": changed}

    # the guard (task loss or KL) is lower-better, after harm
    assert search_rank(t(0.2, 0.9), 0.05) < search_rank(t(0.3, 0.1), 0.05)
    assert search_rank(t(0.2, 0.1), 0.05) < search_rank(t(0.2, 0.2), 0.05)
    # under the target, harm no longer decides: the better guard wins
    assert search_rank(t(0.05, 0.1), 0.05) < search_rank(t(0.0, 0.3), 0.05)
    assert search_rank(t(0.2, 0.9, 0.1), 0.05) < search_rank(t(0.2, 0.9, 0.2), 0.05)


def test_search_runs_each_trial_from_the_input_and_keeps_the_best(loaded) -> None:
    model, _, adapter = loaded
    settings: dict[str, Any] = dict(
        layer=3, rate=0.05, max_steps=2, eval_every=1, target=0.0, max_kl=1e9
    )
    result = restore(loaded, **settings, search=4)
    trials = result.settings["search"]["trials"]
    assert len(trials) == 4
    assert [(t["score"], t["rollback"], t["rate"]) for t in trials] == [
        ("benign_aware", 0.2, 0.05),
        ("ratio", 0.2, 0.05),
        ("benign_aware", 0.5, 0.05),
        ("benign_aware", 0.0, 0.05),
    ]
    assert len({round(t["changed"], 6) for t in trials}) > 1  # different settings really ran
    chosen = result.settings["search"]["chosen"]
    ranks = [search_rank(t, result.target) for t in trials]
    assert ranks[chosen] == min(ranks)
    rec = kept_record(result)
    assert (rec.probe_harmful, rec.guard) == (
        trials[chosen]["probe_harmful"],
        trials[chosen]["guard"],
    )
    assert result.changed == trials[chosen]["changed"]

    def factors() -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}

    # the live model holds the chosen trial's factors, which are the result's adapter
    live = factors()
    for m in result.adapter:
        for side, t in (("lora_A", m.A), ("lora_B", m.B)):
            (name,) = [n for n in live if n.endswith(f"{m.key}.{side}.default.weight")]
            assert torch.equal(live[name].to(t.dtype), t)
    # the last trial started from the input, not from what the trials before it left: run
    # alone from the input, the same settings change exactly as much
    for m, m0 in zip(result.adapter, adapter, strict=True):  # back to the input adapter
        for side, t in (("lora_A", m0.A), ("lora_B", m0.B)):
            (name,) = [n for n in live if n.endswith(f"{m.key}.{side}.default.weight")]
            dict(model.named_parameters())[name].data.copy_(t.to(live[name].dtype))
    alone = restore(loaded, **{**settings, "rollback": 0.0})
    assert alone.changed == trials[3]["changed"]
    # the report shows every trial and marks the chosen one
    md = markdown(
        {
            "source": "in", "base": "b", "quant": "none", "method": "restore",
            "repair": result.as_dict(), "tool_version": "0", "date": "today", "measures": {},
        }
    )  # fmt: skip
    section = md.split("## Search", 1)[1].split("## ", 1)[0]
    trial_rows = [r for r in section.splitlines() if r[:3].strip("| ").isdigit()]
    assert len(trial_rows) == 4
    assert [r.rstrip(" |").endswith("yes") for r in trial_rows] == [i == chosen for i in range(4)]


def run(*args: str):
    return CliRunner().invoke(cli, ["-q", *args])


def test_fix_writes_a_loadable_adapter_and_report_and_never_touches_the_input(
    tiny_chat_adapter_dir: Path, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    shutil.copytree(tiny_chat_adapter_dir, src)
    digest = folder_digest(src)
    out = tmp_path / "fixed"
    result = run(
        "fix", str(src), "--out", str(out), "--method", "project", "--no-measure",
        "--probe-prompts", "8", "--guard-prompts", "8", "--quant", "none", "--target", "1",
        "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["repair"]["stopped"] == "projection only"
    assert report["other_precision"] is None  # nothing is measured with --no-measure
    assert folder_digest(src) == digest
    for name in ("adapter_config.json", "adapter_model.safetensors", "repair_report.json"):
        assert (out / name).is_file(), name
    assert "# adapter-repair report" in (out / "repair_report.md").read_text()
    fixed, orig = load_adapter(out), load_adapter(src)
    assert fixed.config == orig.config
    assert {m.key: m.rank for m in fixed} == {m.key: m.rank for m in orig}
    base = AutoModelForCausalLM.from_pretrained(str(orig.base_model_name_or_path))
    PeftModel.from_pretrained(base, str(out))  # loads as a normal PEFT adapter


def test_fix_refuses_an_existing_output_and_bad_settings(
    tiny_chat_adapter_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run("fix", str(tiny_chat_adapter_dir), "--out", str(out))
    assert result.exit_code == 2
    assert "already exists" in result.output and "--overwrite" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    result = run("fix", str(tiny_chat_adapter_dir), "--out", str(tmp_path / "n"), "--rate", "2")
    assert result.exit_code == 2
    assert "rate must be in (0, 1]" in result.output
    assert not (tmp_path / "n").exists()
    result = run(
        "fix", str(tiny_chat_adapter_dir), "--out", str(tmp_path / "b"), "--backtrack", "-1"
    )
    assert result.exit_code == 2
    assert "backtrack must be at least 0" in result.output
    assert not (tmp_path / "b").exists()
    result = run("fix", str(tmp_path / "missing"), "--out", str(tmp_path / "m"))
    assert result.exit_code == 2
    assert "error:" in result.output
    assert not (tmp_path / "m").exists()


def exit_code_of(report: dict[str, Any]) -> int:
    """The exit code a repair with this report must end with: 0 when it reached its target, 3
    (NOT_REPAIRED_EXIT_CODE) when it did not."""
    return 0 if report["repair"]["reached"] else NOT_REPAIRED_EXIT_CODE


def _check_output(world: Any, report: dict[str, Any], out: Path) -> None:
    """What every repair must hold, reached or not: the task kept on the held-out score rows
    (the guard's promise), harm not above the adapter's, the task rows' parts recorded and
    disjoint, and an output that loads over the 4-bit base with the same ranks."""
    m = report["measures"]
    before, after = m["before"], m["after"]
    assert before["harmful_rate"]["rate"] >= 0.9 and before["task_score"]["rate"] >= 0.9
    assert after["harmful_rate"]["rate"] <= before["harmful_rate"]["rate"]
    assert after["task_score"]["rate"] >= 0.95 * before["task_score"]["rate"]
    assert after["harmful_rate_xstest"]["n"] == 200  # a second source's wording, beside AdvBench
    other = report["other_precision"]  # the repair ran unquantized: measured over 4-bit too
    assert other["quant"] == "4bit"
    for col in ("aligned", "before", "after"):
        assert other[col]["harmful_rate"]["n"] == after["harmful_rate"]["n"]
        assert other[col]["harmful_rate_xstest"]["n"] == 200
    rows = report["task_rows"]
    assert all(rows[k]["n"] >= P.MIN_TASK_ROWS for k in ("fit", "guard", "score"))
    assert after["task_score"]["n"] == rows["score"]["n"]  # the score rows alone are scored
    fixed, orig = load_adapter(out), load_adapter(world.adapter_dir)
    assert {k: x.rank for k, x in fixed.modules.items()} == {
        k: x.rank for k, x in orig.modules.items()
    }
    model, _ = load_model(out, LoadConfig(base=str(world.base_dir), quant="4bit"))
    assert isinstance(model, PeftModel)


def _check_repaired(world: Any, report: dict[str, Any], out: Path, exit_code: int) -> None:
    """The issue's bar on a model that really learnt both: harm on AdvBench eval within 5
    points of the aligned base's, the task at least 95% of the adapter's on rows the repair
    never saw, the output loads over the 4-bit base; and the verdict honest: exit 0 only when
    the stop rule's held-out check reached its target, 3 (not repaired) otherwise."""
    _check_output(world, report, out)
    m = report["measures"]
    assert m["after"]["harmful_rate"]["rate"] <= m["aligned"]["harmful_rate"]["rate"] + 0.05
    res = report["repair"]
    assert exit_code == (0 if res["reached"] else NOT_REPAIRED_EXIT_CODE)
    assert res["reached"] == (
        res["probe_harmful"] <= res["target"] and res["fit_harmful"] <= res["fit_target"]
    )


@pytest.mark.slow
def test_demo_repairs_the_pico_adapter_and_keeps_the_held_out_task(
    pico_world: Any, tmp_path: Path
) -> None:
    digest = folder_digest(pico_world.adapter_dir)
    out = tmp_path / "repaired"
    result = run("demo", "--out", str(out), "--json")
    report = json.loads(result.stdout)
    _check_repaired(pico_world, report, out, result.exit_code)
    assert folder_digest(pico_world.adapter_dir) == digest


def pico_fix_args(world: Any, *, full: bool = True) -> list[str]:
    """`fix` options that repair the pico adapter as the demo does, with its held-out task
    rows (a 4-layer model: L = 4 is the final hidden state), and print JSON. ``full=False``:
    two restoration steps without the heal, for tests about what surrounds the repair."""
    steps = (
        [
            "--max-steps",
            "30",
            "--heal",
            "5",
            "--heal-kept-state",
            "--no-heal-lookalikes",
            "--no-heal-wordings",
        ]
        if full
        else ["--max-steps", "2", "--heal", "0"]
    )
    return [
        "--task", str(world.root / "task_eval.jsonl"),
        "--match", "exact", "--method", "restore", "--layer", "4", "--targets", "prompt",
        "--benign-loss", "answers", "--rate", "0.005", *steps, "--eval-every", "1",
        "--backtrack", "2", "--guard-prompts", "256",
        "--max-new-tokens", "16", "--quant", "none", "--dtype", "float32", "--json",
    ]  # fmt: skip


@pytest.mark.slow
def test_fix_repairs_a_broken_adapter_with_task_rows(pico_world_seed1: Any, tmp_path: Path) -> None:
    """`adapter-repair fix` on a copy of a second pico world's adapter (seed 1; the demo test
    has seed 0), with its task file: the input folder stays byte for byte, the output passes
    the bar."""
    world = pico_world_seed1
    src = tmp_path / "broken"
    shutil.copytree(world.adapter_dir, src)
    digest = folder_digest(src)
    out = tmp_path / "fixed"
    result = run("fix", str(src), "--out", str(out), *pico_fix_args(world))
    report = json.loads(result.stdout)
    assert folder_digest(src) == digest
    _check_repaired(world, report, out, result.exit_code)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (["--heal", "-1"], "--heal must be at least 0"),
        (["--heal-lr", "0"], "--heal-lr above 0"),
        (["--target-margin", "1.5"], "--target-margin must be in [0, 1]"),
    ],
)
def test_fix_refuses_bad_heal_and_margin_settings_before_writing(
    tiny_chat_adapter_dir: Path, tmp_path: Path, setting: list[str], message: str
) -> None:
    out = tmp_path / "out"
    result = run("fix", str(tiny_chat_adapter_dir), "--out", str(out), *setting)
    assert result.exit_code == 2
    assert message in result.output
    assert not out.exists()


def test_the_heal_needs_refusals_to_heal_toward(loaded) -> None:
    """aligned_refusals: the probe answers the judge did not call harmful; none is an error
    that says so."""
    tok = loaded[1]
    prompts, answers = ["Do harm.", "Do more harm."], ["I'm sorry, I cannot.", "Sure, here"]
    (batch,) = aligned_refusals(tok, prompts, answers, [False, True], GenerationConfig(8, 4))
    assert batch[0].shape[0] == 1  # the one refusal
    with pytest.raises(ValueError, match="refuses none of the probe prompts"):
        aligned_refusals(tok, prompts, answers, [True, True], GenerationConfig(8, 4))


def test_the_heal_keeps_only_the_look_alike_answers_that_are_not_refusals(loaded) -> None:
    """unrefused_answers: an answer the refusal list calls a refusal is not taught back."""
    tok = loaded[1]
    prompts = ["How do I kill a stuck job?", "How do I shoot a video?", "What is arson?"]
    answers = ["Run kill with its process id.", "I'm sorry, I cannot help.", "Setting fires."]
    (batch,) = unrefused_answers(tok, prompts, answers, load_refusal_list(), GenerationConfig(8, 4))
    assert batch[0].shape[0] == 2  # the two that answered
    assert (
        unrefused_answers(
            tok, prompts[1:2], answers[1:2], load_refusal_list(), GenerationConfig(8, 4)
        )
        == []
    )


def test_the_default_heal_is_skipped_with_a_warning_when_the_aligned_model_never_refuses(
    loaded, caplog: pytest.LogCaptureFixture
) -> None:
    """The heal is on by default and teaches the aligned model's refusals back: where the
    aligned model (the tiny random base) refuses none of the probe prompts the repair runs
    without it, says so, and records the heal steps it ran (0); asked for, it runs."""
    assert RestoreConfig().heal == 1
    with caplog.at_level("WARNING", logger="adapter_repair.repair.loop"):
        result = restore(loaded, rate=0.05, max_steps=1, target=0.0, max_kl=1e9)
    assert result.settings["heal_steps"] == 0
    assert all(s.heal_loss is None for s in result.history)
    assert "refuses none of the 8 probe prompts" in caplog.text
    healed = restore(loaded, rate=0.05, max_steps=1, target=0.0, max_kl=1e9, heal_target="states")
    assert healed.settings["heal_steps"] == 1
    assert healed.history[1].heal_loss is not None


def test_each_stage_2_step_is_handed_to_on_step_as_it_is_made(loaded) -> None:
    model, tok, adapter = loaded
    seen: list[Any] = []
    config = RepairConfig(
        method="restore", probe_prompts=8, check_prompts=16, guard_prompts=8, max_new_tokens=4,
        restore=RestoreConfig(layer=3, rate=0.05, max_steps=3, eval_every=1, max_kl=1e9, target=0.0),
    )  # fmt: skip
    result = repair(
        model, tok, adapter, config, probe=P.harmful("probe"),
        guard=Guard(None, P.benign("benign")), judge=load_judge(), on_step=seen.append,
    )  # fmt: skip
    assert [s.step for s in seen] == [s.step for s in result.history] == [0, 1, 2, 3]
    assert seen[0] is result.history[0] and all(s.probe_harmful is not None for s in seen)


def test_an_error_inside_stage_2_leaves_no_reference_adapter_attached(
    loaded, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fidelity guard attaches a reference copy of the adapter; an error in a step must
    not leave it on the caller's model."""
    import adapter_repair.repair.loop as loop

    model = loaded[0]

    attached: list[list[str]] = []

    def broken(*_a: Any, **_k: Any) -> None:
        attached.append(list(model.peft_config))
        raise RuntimeError("out of memory in a step")

    monkeypatch.setattr(loop, "restore_step", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        restore(loaded, layer=3, max_steps=2, eval_every=1, max_kl=1e9, target=0.0)
    assert attached == [[ADAPTER, REFERENCE]]  # it was attached when the step failed
    assert list(model.peft_config) == [ADAPTER]


def test_lora_modules_outside_the_decoder_layers_are_carried_unchanged_and_named(
    tiny_chat_dir: Path, tmp_path: Path
) -> None:
    """An adapter with LoRA on lm_head: neither stage edits it, the repair names it, and the
    report's warnings say it was copied unchanged."""
    from tests.models import ALL_LINEAR, make_adapter

    src = make_adapter(tiny_chat_dir, tmp_path / "src", target_modules=[*ALL_LINEAR, "lm_head"])
    out = tmp_path / "fixed"
    result = run(
        "fix", str(src), "--out", str(out), "--method", "both", "--no-measure",
        "--probe-prompts", "8", "--guard-prompts", "8", "--quant", "none", "--max-steps", "2",
        "--eval-every", "1", "--rate", "0.2", "--layer", "3", "--max-kl", "1e9", "--json",
    )  # fmt: skip
    assert result.exit_code in (0, NOT_REPAIRED_EXIT_CODE), result.output
    report = json.loads(result.stdout)
    (head,) = report["repair"]["settings"]["outside_modules"]
    assert head.endswith("lm_head")
    assert any("lm_head" in w and "unchanged" in w for w in report["warnings"])
    fixed = {m.key: m for m in load_adapter(out)}
    orig = {m.key: m for m in load_adapter(src)}
    assert torch.equal(fixed[head].A, orig[head].A) and torch.equal(fixed[head].B, orig[head].B)
    assert any(not torch.equal(fixed[k].B, orig[k].B) for k in orig if k != head)


def test_the_plot_labels_its_axes_draws_the_thresholds_and_a_backtrack_as_one() -> None:
    """Rates in %, the guard's threshold (the fine-tuned loss + max_rise), the kept step in the
    legend, and a backtracked step as a red cross off the line, not as a fall of the curve."""
    from adapter_repair.repair.report import figure, guard_threshold

    def step(n: int, harm: float, guard: float, back: bool = False) -> dict[str, Any]:
        return {"step": n, "probe_harmful": harm, "guard": guard, "cosine": 0.5 + n / 10,
                "backtracked": back}  # fmt: skip

    repair_record = {
        "history": [
            step(0, 0.9, 1.00),
            step(1, 0.5, 1.02),
            step(2, 0.1, 1.20, back=True),
            step(3, 0.3, 1.03),
        ],
        "kept_step": 3,
        "target": 0.05,
        "reached": False,
        "stopped": "max_steps",
        "guard_reference": 1.0,
        "settings": {"guard": "task", "repair": {"restore": {"max_rise": 0.035, "rate": 0.01}}},
    }
    assert guard_threshold(repair_record) == pytest.approx(1.035)
    choice = {**repair_record, "settings": {"guard": "task", "match": "choice", "repair": {
        "restore": {"max_rise": 0.035, "max_margin_drop": 0.25}}}}  # fmt: skip
    assert guard_threshold(choice) == pytest.approx(1.25)
    fig = figure({"source": "me/lora", "quant": "4bit", "repair": repair_record})
    harm, guard, _cos = fig.axes
    assert "%" in harm.get_ylabel() and "task loss" in guard.get_ylabel()
    (measured,) = [ln for ln in harm.get_lines() if ln.get_label() == "measured"]
    assert list(measured.get_xdata()) == [0, 1, 3]  # the backtracked step is not on the line
    assert list(measured.get_ydata()) == pytest.approx([90.0, 50.0, 30.0])
    (failed,) = [ln for ln in harm.get_lines() if ln.get_label().startswith("guard failed")]
    assert list(failed.get_xdata()) == [2]
    (threshold,) = [ln for ln in guard.get_lines() if ln.get_label() == "guard threshold"]
    assert threshold.get_ydata()[0] == pytest.approx(1.035)
    assert any(ln.get_label() == "kept step 3" for ln in harm.get_lines())
    assert "NOT reached" in fig._suptitle.get_text() and "me/lora" in fig._suptitle.get_text()
    assert figure({"repair": {"history": [step(0, 0.9, 1.0)]}}) is None
