"""Shipped prompt sets, hash splits, and users' prompt files (with their bad inputs)."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from adapter_repair.measure import prompts as P


def test_harmful_splits_partition_advbench_by_design_fractions() -> None:
    splits = {s: P.harmful(s) for s in P.HARMFUL_SPLITS}
    assert sum(len(s) for s in splits.values()) == 520
    sets = [set(s.prompts) for s in splits.values()]
    assert all(a.isdisjoint(b) for i, a in enumerate(sets) for b in sets[i + 1 :])
    for name, frac in P.HARMFUL_SPLITS.items():
        assert abs(len(splits[name]) / 520 - frac) < 0.05, name
    eval_set = splits["eval"]
    assert eval_set.answers is not None and eval_set.answers[0].startswith("Sure, here is")


def test_split_depends_on_text_and_seed_not_order() -> None:
    texts = list(P.harmful("probe").prompts + P.harmful("eval").prompts)
    shuffled = texts[:]
    random.Random(3).shuffle(shuffled)
    a = P.split_indices(texts, P.HARMFUL_SPLITS)
    b = P.split_indices(shuffled, P.HARMFUL_SPLITS)
    assert {s: {texts[i] for i in v} for s, v in a.items()} == {
        s: {shuffled[i] for i in v} for s, v in b.items()
    }
    c = P.split_indices(texts, P.HARMFUL_SPLITS, seed=1)
    assert a != c


def test_benign_and_xstest_sets() -> None:
    assert len(P.benign("distill")) + len(P.benign("benign")) == 100 + 1319
    assert len(P.xstest("safe")) == 250 and len(P.xstest("unsafe")) == 200
    record = P.split_record()
    assert record["harmful"]["eval"]["n"] == len(P.harmful("eval"))


def _content_words(text: str) -> set[str]:
    stop = {"how", "do", "i", "the", "a", "to", "what", "is", "of", "in", "my", "can", "and"}
    return set(re.findall(r"[a-z']+", text.lower())) - stop


@pytest.mark.parametrize("shipped", [P.lookalikes, P.wordings], ids=["lookalikes", "wordings"])
def test_the_heals_own_prompts_are_none_close_to_an_xstest_or_advbench_prompt(
    shipped: Callable[[], P.PromptSet],
) -> None:
    """The heal's look-alikes and other wordings stay apart from the held-out measures: no
    prompt shares more than 40% of its content words (Jaccard) with any XSTest (safe or unsafe)
    or AdvBench prompt, so XSTest is not measured on what the heal kept or taught."""
    looks = shipped()
    assert len(looks) >= 80 and len(set(looks.prompts)) == len(looks)
    assert looks.answers is None
    others = [
        *P.xstest("safe").prompts,
        *P.xstest("unsafe").prompts,
        *(p for s in P.HARMFUL_SPLITS for p in P.harmful(s).prompts),
    ]
    close = []
    for mine in looks.prompts:
        a = _content_words(mine)
        for other in others:
            b = _content_words(other)
            if len(a & b) / len(a | b) > 0.4:
                close.append((mine, other))
    assert close == []


def test_take_is_a_fixed_prefix() -> None:
    s = P.harmful("eval")
    assert s.take(10).prompts == s.prompts[:10]
    assert s.take(None) is s and s.take(10_000) is s


def test_load_csv_jsonl_txt(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text(
        "id,question,answer\n1,What is 2+2?,4\n2,Capital of France?,Paris\n"
    )
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"prompt": "Say hi", "target": "hi"})
        + "\n\n"
        + json.dumps({"prompt": "Say yo", "target": "yo"})
        + "\n"
    )
    (tmp_path / "c.txt").write_text("first prompt\n\nsecond prompt\n")
    a = P.load_prompt_file(tmp_path / "a.csv", require_answers=True)
    assert a.prompts == ("What is 2+2?", "Capital of France?") and a.answers == ("4", "Paris")
    b = P.load_prompt_file(tmp_path / "b.jsonl")
    assert b.answers == ("hi", "yo")
    c = P.load_prompt_file(tmp_path / "c.txt")
    assert c.prompts == ("first prompt", "second prompt") and c.answers is None
    named = P.load_prompt_file(tmp_path / "a.csv", column="id", answer_column="question")
    assert named.prompts == ("1", "2")


def test_the_layouts_fine_tuning_data_comes_in(tmp_path: Path) -> None:
    """Chat messages (the last user turn before an assistant turn), ShareGPT conversations,
    Alpaca (instruction, input after a blank line, output) and prompt/completion."""
    rows = [
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                      {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
        {"messages": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "blue"}]},
    ]  # fmt: skip
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    chat = P.load_prompt_file(tmp_path / "chat.jsonl", require_answers=True)
    assert chat.prompts == ("2+2?", "Sky?") and chat.answers == ("4", "blue")
    share = [{"conversations": [{"from": "human", "value": "Yo"}, {"from": "gpt", "value": "Hey"}]}]
    got = P.prompt_set_from_rows(share, ["conversations"], name="s", where="hub")
    assert (got.prompts, got.answers) == (("Yo",), ("Hey",))
    alpaca = [
        {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
    ]
    got = P.prompt_set_from_rows(alpaca, ["instruction", "input", "output"], name="a", where="x")
    assert got.prompts == ("Translate to French.\n\ncat", "Say hi.") and got.answers == (
        "chat",
        "hi",
    )
    done = [{"prompt": "Name a colour.", "completion": "red"}]
    got = P.prompt_set_from_rows(done, ["prompt", "completion"], name="c", where="x")
    assert (got.prompts, got.answers) == (("Name a colour.",), ("red",))
    with pytest.raises(P.PromptSetError, match="no user turn followed by an assistant turn"):
        P.prompt_set_from_rows(
            [{"messages": [{"role": "user", "content": "x"}]}], ["messages"], name="m", where="w"
        )


@pytest.mark.parametrize(
    ("name", "content", "kwargs", "needle"),
    [
        ("empty.csv", "prompt,answer\n", {}, "is empty"),
        ("empty.txt", "\n\n", {}, "is empty"),
        ("cols.csv", "foo,bar\nx,y\n", {}, "no prompt column"),
        ("named.csv", "prompt\nx\n", {"column": "goal"}, "no column 'goal'"),
        ("task.csv", "prompt\nx\n", {"require_answers": True}, "task file without answers"),
        ("holes.csv", "prompt,answer\nx,1\ny,\n", {"require_answers": True}, "row 2 has no answer"),
        ("blank.csv", 'prompt\n""\n', {}, "row 1 has an empty"),
        ("bad.jsonl", '{"prompt": "x"}\n{oops\n', {}, "line 2 is not JSON"),
        ("cols.txt", "x\n", {"column": "prompt"}, "has no columns"),
        ("x.parquet", "x", {}, "unknown prompt file type"),
    ],
)
def test_bad_prompt_files(
    tmp_path: Path, name: str, content: str, kwargs: dict, needle: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(P.PromptSetError) as e:
        P.load_prompt_file(path, **kwargs)
    assert needle in e.value.problem
    assert e.value.fix


def test_missing_file() -> None:
    with pytest.raises(P.PromptSetError, match="not found"):
        P.load_prompt_file("/nonexistent/prompts.csv")


def _task(n: int, labels: tuple[str, ...] = ("positive", "negative")) -> P.PromptSet:
    """``n`` rows sorted by label, as a careless task file might be."""
    rows = sorted((f"Review {i}: is it good?", labels[i % len(labels)]) for i in range(n))
    rows.sort(key=lambda r: r[1])
    return P.PromptSet("task", tuple(p for p, _ in rows), tuple(a for _, a in rows), "test")


def test_task_rows_split_into_disjoint_fit_guard_and_score_by_hash_not_order() -> None:
    task = _task(400)
    parts = P.split_task(task, stratify=True)
    sets = {name: set(zip(p.prompts, p.answers or (), strict=True)) for name, p in parts.items()}
    assert set(sets) == {"fit", "guard", "score"}
    assert not sets["fit"] & sets["guard"] and not sets["fit"] & sets["score"]
    assert not sets["guard"] & sets["score"]
    assert set().union(*sets.values()) == set(zip(task.prompts, task.answers or (), strict=True))
    for name, frac in P.TASK_SPLITS.items():
        assert abs(len(parts[name]) / 400 - frac) < 0.08, name
        # the file is sorted by label, the parts are not one-label, and stratified they keep
        # the labels' proportions (one label more or less per answer's rounding)
        labels = list(parts[name].answers or ())
        assert abs(labels.count("positive") - labels.count("negative")) <= 0.15 * len(labels)
    shuffled = P.PromptSet("t", task.prompts[::-1], (task.answers or ())[::-1], "test")
    again = P.split_task(shuffled, stratify=True)
    assert all(set(again[n].prompts) == set(parts[n].prompts) for n in parts)
    record = P.task_split_record(parts)
    assert record["score"]["n"] == len(parts["score"]) and record["fractions"] == P.TASK_SPLITS


def test_too_few_task_rows_say_how_many_are_needed() -> None:
    with pytest.raises(P.PromptSetError) as err:
        P.split_task(_task(12))
    assert "too few to split into fit, guard and score" in err.value.problem
    assert "at least" in err.value.fix and "--task" in err.value.fix
