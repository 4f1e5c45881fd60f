"""Both judge kinds on tiny models trained in the test: a causal guard model that answers
safe/unsafe through its chat template, and a sequence classifier."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaForCausalLM

from adapter_repair.beds import pico
from adapter_repair.beds.train import train_on_answers
from adapter_repair.errors import AdapterRepairError
from adapter_repair.measure import prompts as P
from adapter_repair.measure.judges import ClassifierJudge, load_judge


def pairs(split: str, n: int, seed: int) -> list[tuple[str, str, bool]]:
    """(request, response, harmful?): affirmative openings are harmful, refusals are not."""
    rng = random.Random(seed)
    s = P.harmful(split).take(n)
    out = []
    for p, target in zip(s.prompts, s.answers or (), strict=True):
        out.append((p, target, True))
        out.append((p, rng.choice(pico.REFUSALS), False))
    return out


def train_guard(base_dir: Path, out: Path) -> Path:
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = LlamaForCausalLM.from_pretrained(base_dir)
    examples = []
    for p, r, harmful in pairs("align", 60, 0):
        head = tok.apply_chat_template(
            [{"role": "user", "content": p}, {"role": "assistant", "content": r}],
            tokenize=False,
            add_generation_prompt=True,
        )
        head_ids = tok(head, add_special_tokens=False)["input_ids"]
        ans = tok(("unsafe\nS1" if harmful else "safe") + "<|end|>", add_special_tokens=False)[
            "input_ids"
        ]
        examples.append((head_ids + ans, len(head_ids)))
    train_on_answers(
        model,
        examples,
        steps=80,
        lr=3e-3,
        batch_size=16,
        pad_id=tok.pad_token_id,
        seed=0,
        desc="guard",
    )
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def train_classifier(base_dir: Path, out: Path) -> Path:
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        base_dir, num_labels=2, id2label={0: "safe", 1: "unsafe"}, label2id={"safe": 0, "unsafe": 1}
    )
    model.config.pad_token_id = tok.pad_token_id
    data = pairs("align", 60, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(0)
    model.train()
    for _ in range(80):
        batch = [data[rng.randrange(len(data))] for _ in range(16)]
        texts = [
            tok.apply_chat_template(
                [{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                tokenize=False,
            )
            for p, r, _ in batch
        ]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        loss = model(**enc, labels=torch.tensor([int(h) for *_, h in batch])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def held_out() -> list[tuple[str, str, bool]]:
    return pairs("eval", 10, 2)


def accuracy(judge: ClassifierJudge, data: list[tuple[str, str, bool]]) -> float:
    verdicts = judge.harmful([p for p, *_ in data], [r for _, r, _ in data])
    return sum(v == h for v, (*_, h) in zip(verdicts, data, strict=True)) / len(data)


def test_causal_guard_judge(tiny_chat_dir: Path, tmp_path: Path, held_out) -> None:
    judge = load_judge(str(train_guard(tiny_chat_dir, tmp_path / "guard")))
    assert isinstance(judge, ClassifierJudge) and judge.kind == "causal"
    assert accuracy(judge, held_out) >= 0.9


def test_sequence_classifier_judge(tiny_chat_dir: Path, tmp_path: Path, held_out) -> None:
    judge = load_judge(str(train_classifier(tiny_chat_dir, tmp_path / "cls")))
    assert isinstance(judge, ClassifierJudge) and judge.kind == "sequence"
    assert judge.unsafe_ids == [1]
    assert accuracy(judge, held_out) >= 0.9


def test_a_judge_that_cannot_be_loaded(tmp_path: Path) -> None:
    with pytest.raises(AdapterRepairError, match=r"judge model .* cannot be loaded") as e:
        load_judge(str(tmp_path / "no-such-judge"))
    assert "--judge substring" in e.value.fix
    with pytest.raises(AdapterRepairError, match="unknown refusal list"):
        load_judge("substring:nope")
