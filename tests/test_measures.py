"""Measures whose true values are known by construction: a scripted responder answers each
prompt from a table, so every rate must come out exactly."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapter_repair.measure import prompts as P
from adapter_repair.measure.evaluate import EvalSets, evaluate
from adapter_repair.measure.judges import SubstringJudge, load_judge, load_refusal_list
from adapter_repair.measure.measures import Rate, fidelity, task_matches, wilson_interval
from tests.models import make_adapter


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    # Reference values of the Wilson score interval (z = 1.96).
    [
        (0, 10, 0.0, 0.2775),
        (5, 10, 0.2366, 0.7634),
        (10, 10, 0.7225, 1.0),
        (1, 100, 0.0018, 0.0545),
    ],
)
def test_wilson_interval(k: int, n: int, low: float, high: float) -> None:
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=1e-4) and hi == pytest.approx(high, abs=1e-4)


def test_rate_refuses_an_empty_sample() -> None:
    with pytest.raises(ValueError):
        _ = Rate(0, 0).interval


def scripted(table: dict[str, str]):
    calls: list[str] = []

    def respond(prompts: Sequence[str], desc: str) -> list[str]:
        calls.append(desc)
        return [table[p] for p in prompts]

    respond.calls = calls
    return respond


def test_evaluate_with_a_scripted_model_is_exact() -> None:
    harmful = P.harmful("eval").take(20)
    safe = P.xstest("safe").take(10)
    task = P.PromptSet("task", ("2+2?", "3+3?", "4+4?", "5+5?"), ("4", "6", "8", "10"))
    table = {}
    # 7 of 20 harmful requests answered, 13 refused in varied ways.
    refusals = ["I'm sorry, no.", "I cannot do that.", "As an AI I must decline.", "i can't help"]
    for i, p in enumerate(harmful.prompts):
        table[p] = f"Sure, here is how: step {i}" if i < 7 else refusals[i % 4]
    # 3 of 10 safe prompts refused.
    for i, p in enumerate(safe.prompts):
        table[p] = "I am sorry, I cannot." if i < 3 else "Here you go."
    table.update({"2+2?": "It is 4.", "3+3?": "6", "4+4?": "nine", "5+5?": "The answer: 10"})
    respond = scripted(table)
    report = evaluate(
        respond,
        EvalSets(harmful, safe, task),
        load_judge("substring"),
        load_refusal_list("jailbreakbench"),
        match="contains",
    )
    assert report.measures["harmful_rate"] == Rate(7, 20)
    assert report.measures["over_refusal"] == Rate(3, 10)
    assert report.measures["task_score"] == Rate(3, 4)
    assert respond.calls == ["harmful", "over-refusal", "task"]
    assert [s["harmful"] for s in report.samples["harmful"]] == [True] * 7 + [False] * 13
    limited = evaluate(
        respond, EvalSets(harmful, None, None), load_judge(), load_refusal_list(), limit=5
    )
    assert limited.measures["harmful_rate"] == Rate(5, 5)
    assert set(limited.measures) == {"harmful_rate"}
    rows = report.rows()
    assert rows[0][:2] == ["harmful_rate", "35.0%"]


def test_each_refusal_list_keeps_its_rule() -> None:
    jbb, gcg, xs = (load_refusal_list(n) for n in ("jailbreakbench", "gcg", "xstest"))
    assert jbb.refused("Well... I'M SORRY, that is not possible")  # anywhere, any case
    assert gcg.refused("Well, I cannot do it") and not gcg.refused("well, i CANNOT do it")
    assert xs.refused("  Sorry, no") and not xs.refused("Here it is. Sorry for the delay")
    assert not jbb.refused("Sure, here is a plan")
    judge = SubstringJudge(gcg)
    assert judge.harmful(["a", "b"], ["Sure", "I apologize"]) == [True, False]
    assert judge.name == "substring:gcg"


@pytest.mark.parametrize(
    ("match", "expected"),
    [
        ("exact", [True, False, False, True]),
        ("contains", [True, True, False, True]),
        ("choice", [True, True, False, False]),
    ],
)
def test_task_match_rules(match: str, expected: list[bool]) -> None:
    answers = ["positive", "negative", "positive", "negative"]
    responses = ["Positive.", "It is negative, not positive", "neutral", "negative, then positive"]
    if match == "choice":
        # The first label named decides.
        responses = ["positive", "negative!", "neutral", "positive, or negative"]
    elif match == "exact":
        responses = ["Positive.", "negative!?", "neutral", "  NEGATIVE "]
    assert task_matches(responses, answers, match) == expected


def test_fidelity_of_an_adapter_to_itself_and_to_another(
    tiny_chat_dir: Path, tiny_chat_adapter_dir: Path, tmp_path: Path
) -> None:
    other = make_adapter(tiny_chat_dir, tmp_path / "other", seed=7)
    tok = AutoTokenizer.from_pretrained(tiny_chat_dir)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_chat_dir), str(tiny_chat_adapter_dir)
    )
    model.load_adapter(str(tiny_chat_adapter_dir), adapter_name="same")
    model.load_adapter(str(other), adapter_name="other")
    prompts = P.benign("benign").take(6).prompts
    from adapter_repair.measure.config import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=6, batch_size=4, progress=False)
    same = fidelity(model, tok, prompts, reference="default", candidate="same", config=cfg)
    assert same.kl == pytest.approx(0.0, abs=1e-6) and same.agreement == 1.0
    assert same.n_tokens > 0 and same.n_prompts == 6
    diff = fidelity(model, tok, prompts, reference="default", candidate="other", config=cfg)
    base = fidelity(model, tok, prompts, reference="default", candidate=None, config=cfg)
    assert diff.kl > 1e-3 and base.kl > 1e-3
    assert model.active_adapter == "default"  # restored
    # KL(p || p) is zero and the greedy tokens of the reference are its own argmax.
    assert torch.isfinite(torch.tensor([diff.kl, base.kl])).all()
