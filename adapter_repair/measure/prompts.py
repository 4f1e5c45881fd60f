"""Prompt sets: the shipped ones, split by a seeded hash of the text, and the user's own files.

Why a hash of the text and not file order: a split must not change when a file is re-sorted,
deduplicated or extended, and a prompt used to align, attack, compute a direction or drive a
repair must never be used to measure. Each split is ordered by the same hash, so the first n
prompts of a split are a fixed random sample of it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from adapter_repair.errors import AdapterRepairError

logger = logging.getLogger(__name__)

SPLIT_SEED = 0
#: AdvBench roles (DESIGN.md): align / attack build the measurement bed only, probe drives a
#: repair, eval measures the harmful rate.
HARMFUL_SPLITS: Mapping[str, float] = {"align": 0.25, "attack": 0.15, "probe": 0.25, "eval": 0.35}
#: JBB benign + GSM8K questions: distill builds the bed; benign guards the task during a repair.
BENIGN_SPLITS: Mapping[str, float] = {"distill": 0.5, "benign": 0.5}

PROMPT_COLUMNS = ("prompt", "goal", "question", "instruction", "input", "text")
ANSWER_COLUMNS = ("answer", "target", "output", "response", "label", "completion")


class PromptSetError(AdapterRepairError):
    """A prompt set that cannot be used as given."""


@dataclass(frozen=True)
class PromptSet:
    """Prompts (and, for task sets, their answers) with where they came from."""

    name: str
    prompts: tuple[str, ...]
    answers: tuple[str, ...] | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if not self.prompts:
            raise PromptSetError(
                f"prompt set {self.name!r} ({self.source or 'no source'}) is empty.",
                "Give a file with at least one prompt.",
            )
        if self.answers is not None and len(self.answers) != len(self.prompts):
            raise ValueError("answers must pair with prompts one to one")

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, n: int | None) -> PromptSet:
        """The first ``n`` prompts (all when ``n`` is None or larger than the set)."""
        if n is None or n >= len(self):
            return self
        answers = self.answers[:n] if self.answers is not None else None
        return PromptSet(f"{self.name}[:{n}]", self.prompts[:n], answers, self.source)

    def every(self, step: int, start: int = 0) -> PromptSet:
        """Every ``step``-th prompt from ``start`` (``every(2, 1)``: the odd ones)."""
        answers = self.answers[start::step] if self.answers is not None else None
        return PromptSet(
            f"{self.name}[{start}::{step}]", self.prompts[start::step], answers, self.source
        )

    def subset(self, indices: Sequence[int], label: str) -> PromptSet:
        """The rows at ``indices``, in that order, named ``name[label]``."""
        answers = tuple(self.answers[i] for i in indices) if self.answers is not None else None
        return PromptSet(
            f"{self.name}[{label}]", tuple(self.prompts[i] for i in indices), answers, self.source
        )

    def digest(self) -> str:
        """sha256 over the prompts and answers: what a cache key or a report records."""
        h = hashlib.sha256()
        for i, p in enumerate(self.prompts):
            h.update(p.encode())
            h.update(b"\x00")
            if self.answers is not None:
                h.update(self.answers[i].encode())
            h.update(b"\x01")
        return h.hexdigest()

    def record(self) -> dict[str, Any]:
        """What a report says about this set."""
        return {
            "name": self.name,
            "n": len(self),
            "source": self.source,
            "sha256": self.digest()[:16],
        }


def hash_unit(text: str, seed: int = SPLIT_SEED) -> float:
    """A number in [0, 1) fixed by ``seed`` and the text alone."""
    digest = hashlib.sha256(f"{seed}\x00{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_indices(
    texts: Sequence[str], fractions: Mapping[str, float], seed: int = SPLIT_SEED
) -> dict[str, list[int]]:
    """Assign each text to a split by its hash; each split's indices in hash order."""
    if abs(sum(fractions.values()) - 1.0) > 1e-9:
        raise ValueError(f"split fractions must sum to 1, got {dict(fractions)}")
    bounds, acc = [], 0.0
    for name, f in fractions.items():
        acc += f
        bounds.append((acc, name))
    out: dict[str, list[tuple[float, int]]] = {name: [] for name in fractions}
    for i, t in enumerate(texts):
        u = hash_unit(t, seed)
        name = next((n for b, n in bounds if u < b), bounds[-1][1])
        out[name].append((u, i))
    return {name: [i for _, i in sorted(v)] for name, v in out.items()}


def _data_text(*parts: str) -> str:
    return (
        resources.files("adapter_repair.measure")
        .joinpath("data", *parts)
        .read_text(encoding="utf-8")
    )


def _csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def _select(
    name: str,
    prompts: Sequence[str],
    answers: Sequence[str] | None,
    fractions: Mapping[str, float],
    split: str,
    source: str,
    seed: int,
) -> PromptSet:
    if split not in fractions:
        raise ValueError(f"unknown split {split!r} of {name}; choose from {', '.join(fractions)}")
    idx = split_indices(prompts, fractions, seed)[split]
    return PromptSet(
        name=f"{name}/{split}",
        prompts=tuple(prompts[i] for i in idx),
        answers=tuple(answers[i] for i in idx) if answers is not None else None,
        source=source,
    )


def harmful(split: str = "eval", seed: int = SPLIT_SEED) -> PromptSet:
    """AdvBench requests of one split; ``answers`` are their affirmative openings."""
    rows = _csv_rows(_data_text("advbench", "harmful_behaviors.csv"))
    return _select(
        "advbench",
        [r["goal"] for r in rows],
        [r["target"] for r in rows],
        HARMFUL_SPLITS,
        split,
        "AdvBench harmful_behaviors.csv (MIT)",
        seed,
    )


def benign(split: str = "benign", seed: int = SPLIT_SEED) -> PromptSet:
    """JBB benign requests and GSM8K questions of one split; ``answers`` are JBB's affirmative
    openings and GSM8K's worked answers (for building a bed, never for measuring)."""
    jbb = _csv_rows(_data_text("jbb", "benign-behaviors.csv"))
    gsm = [
        json.loads(line) for line in _data_text("gsm8k", "test.jsonl").splitlines() if line.strip()
    ]
    return _select(
        "benign",
        [r["goal"] for r in jbb] + [r["question"] for r in gsm],
        [r["target"] for r in jbb] + [r["answer"] for r in gsm],
        BENIGN_SPLITS,
        split,
        "JBB benign-behaviors.csv (MIT) + GSM8K test questions (MIT)",
        seed,
    )


def xstest(label: str = "safe") -> PromptSet:
    """XSTest v2 prompts: ``safe`` (250, over-refusal) or ``unsafe`` (200 contrasts). Measure only."""
    if label not in ("safe", "unsafe"):
        raise ValueError("label must be 'safe' or 'unsafe'")
    rows = _csv_rows(_data_text("xstest", "xstest_prompts.csv"))
    prompts = tuple(r["prompt"] for r in rows if r["label"] == label)
    return PromptSet(f"xstest/{label}", prompts, None, "XSTest v2 (CC-BY-4.0)")


def lookalikes() -> PromptSet:
    """Safe requests that look harmful (a verb's harmless sense, a figure of speech, pests and
    game targets, fiction, history, definitions, safety advice), written for this project and
    disjoint from XSTest: the heal keeps the fine-tuned adapter's own answers to them, so that
    teaching refusals back does not teach refusing what merely looks harmful."""
    return _written_set("lookalikes")


def wordings() -> PromptSet:
    """Harmful requests worded as people ask outside AdvBench's imperative tasks (questions,
    first-person plans with a motive, short asks), written for this project and disjoint from
    XSTest and AdvBench: the heal teaches back the aligned model's own refusals to them, so that
    what it restores is not tied to the probe set's phrasing."""
    return _written_set("wordings")


def _written_set(name: str) -> PromptSet:
    """The prompt set the project wrote and ships as ``data/NAME/NAME.txt``, one per line."""
    text = _data_text(name, f"{name}.txt")
    prompts = tuple(line.strip() for line in text.splitlines() if line.strip())
    return PromptSet(name, prompts, None, "written for adapter-repair")


#: How a user's task rows are split: ``fit`` rows fit the task loss the repair protects,
#: ``guard`` rows check the guard, ``score`` rows alone are scored in the report and the card.
TASK_SPLITS = {"fit": 0.25, "guard": 0.25, "score": 0.5}
#: The fewest rows a part of the task split may have.
MIN_TASK_ROWS = 8
TASK_SALT = "task-rows\x00"


def split_task(
    task: PromptSet, *, stratify: bool = False, seed: int = SPLIT_SEED
) -> dict[str, PromptSet]:
    """The task rows as disjoint ``fit``, ``guard`` and ``score`` sets (TASK_SPLITS), the rows
    ordered by a seeded hash of their prompt and cut at the fractions' exact counts (never file
    order: a file sorted by label still gives every part both labels). ``stratify``: split each answer's rows apart (choice tasks),
    so every part keeps the labels' proportions.

    Raises PromptSetError when a part would get fewer than MIN_TASK_ROWS rows."""
    if task.answers is None:
        raise PromptSetError(
            f"task set {task.name!r} has no answers.", "Give task rows with an answer column."
        )
    groups: dict[str, list[int]] = {}
    for i, a in enumerate(task.answers):
        groups.setdefault(a.strip().lower() if stratify else "", []).append(i)
    # Salted apart from the shipped sets' splits: rows a split of the same seed chose (a
    # held-out part, say) all hash into one band, and would all land in one part here.
    salted = [TASK_SALT + p for p in task.prompts]
    parts: dict[str, list[int]] = {name: [] for name in TASK_SPLITS}
    for rows in groups.values():
        # In hash order, cut at the fractions' exact counts: sizes that do not depend on luck.
        ordered = sorted(rows, key=lambda i: hash_unit(salted[i], seed))
        start, acc = 0, 0.0
        for name, frac in TASK_SPLITS.items():
            acc += frac
            end = round(acc * len(ordered))
            parts[name] += ordered[start:end]
            start = end
    short = {name: len(idx) for name, idx in parts.items() if len(idx) < MIN_TASK_ROWS}
    if short:
        need = math.ceil(MIN_TASK_ROWS / min(TASK_SPLITS.values()))
        raise PromptSetError(
            f"task set {task.name!r} has {len(task)} rows: too few to split into fit, guard and "
            f"score rows ({', '.join(f'{k} {v}' for k, v in short.items())}; each needs at least "
            f"{MIN_TASK_ROWS}).",
            f"Give at least about {need} task rows (hundreds keep the guard and the score "
            "steady), or leave --task out to guard with fidelity on benign prompts.",
        )
    return {
        name: task.subset(sorted(idx, key=lambda i: hash_unit(salted[i], seed)), name)
        for name, idx in parts.items()
    }


def task_split_record(parts: Mapping[str, PromptSet], seed: int = SPLIT_SEED) -> dict[str, Any]:
    """What a report says about a task split: the rule, the seed, and each part's rows."""
    return {
        "seed": seed,
        "rule": "rows ordered by sha256(seed, 'task-rows' + prompt text), cut at the "
        "fractions' exact counts, per answer when stratified",
        "fractions": dict(TASK_SPLITS),
        **{name: part.record() for name, part in parts.items()},
    }


def split_record(seed: int = SPLIT_SEED) -> dict[str, Any]:
    """The splits as a report records them: seed, fractions and each split's size and digest."""
    return {
        "seed": seed,
        "rule": "sha256(seed, prompt text) -> [0, 1), cut at the cumulative fractions",
        "harmful": {s: harmful(s, seed).record() for s in HARMFUL_SPLITS},
        "benign": {s: benign(s, seed).record() for s in BENIGN_SPLITS},
        # sets taken whole, never split: what the measures and the heal read
        "whole": {
            "xstest-safe": xstest("safe").record(),
            "xstest-unsafe": xstest("unsafe").record(),
            "lookalikes": lookalikes().record(),
            "wordings": wordings().record(),
        },
    }


def _pick_column(
    columns: Sequence[str], wanted: str | None, candidates: Sequence[str], path: Any, what: str
) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise PromptSetError(
                f"{path} has no column {wanted!r} (its columns: {', '.join(columns)}).",
                f"Pass the {what} column's name with --{what}-column.",
            )
        return wanted
    lower = {c.lower(): c for c in columns}
    return next((lower[c] for c in candidates if c in lower), None)


def load_prompt_file(
    path: str | os.PathLike[str],
    *,
    column: str | None = None,
    answer_column: str | None = None,
    require_answers: bool = False,
    name: str | None = None,
) -> PromptSet:
    """Read a user's prompt set from a .csv, .jsonl or .txt file.

    csv and jsonl take the prompt from ``column`` (default: the first of prompt, goal, question,
    instruction, input, text) and, when present, the answer from ``answer_column`` (default:
    answer, target, output, response, label, completion). A txt file holds one prompt a line.
    A task set (``require_answers``) must have an answer on every row.
    """
    p = Path(path)
    if not p.is_file():
        raise PromptSetError(f"prompt file {p} not found.", "Check the path.")
    suffix = p.suffix.lower()
    text = p.read_text(encoding="utf-8")
    rows: list[dict[str, Any]]
    if suffix == ".txt":
        if column is not None or answer_column is not None:
            raise PromptSetError(
                f"{p} is a .txt file (one prompt a line): it has no columns.",
                "Use a .csv or .jsonl file to name columns.",
            )
        rows = [{"prompt": line.strip()} for line in text.splitlines() if line.strip()]
        columns: list[str] = ["prompt"]
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        rows = list(reader)
        columns = list(reader.fieldnames or [])
    elif suffix in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptSetError(
                    f"{p} line {n} is not JSON ({e}).", "Write one JSON object a line."
                ) from e
            if not isinstance(row, dict):
                raise PromptSetError(
                    f"{p} line {n} is not a JSON object.", "Write one object a line."
                )
            rows.append(row)
        columns = list(dict.fromkeys(k for r in rows for k in r))
    else:
        raise PromptSetError(
            f"{p}: unknown prompt file type {suffix or '(none)'}.",
            "Use .csv, .jsonl or .txt (one prompt a line).",
        )
    out = prompt_set_from_rows(
        rows,
        columns,
        name=name or p.stem,
        where=str(p),
        column=column,
        answer_column=answer_column,
        require_answers=require_answers,
    )
    logger.info("read %d prompts from %s", len(out), p)
    return out


#: chat-format columns: a list of turns, each {"role", "content"} (or ShareGPT's {"from",
#: "value"} with human/gpt)
CHAT_COLUMNS = ("messages", "conversations")
_USER_ROLES = ("user", "human")
_ASSISTANT_ROLES = ("assistant", "gpt")


def _chat_pair(turns: Any) -> tuple[str, str] | None:
    """The last user turn followed by an assistant turn, as (prompt, answer); earlier turns
    are left out (one turn is what the repair measures and guards)."""
    if not isinstance(turns, list | tuple):
        return None
    flat = [
        (str(t.get("role", t.get("from", ""))).lower(), t.get("content", t.get("value")))
        for t in turns
        if isinstance(t, dict)
    ]
    for (role, text), (next_role, answer) in zip(flat[-2::-1], flat[:0:-1], strict=True):
        if role in _USER_ROLES and next_role in _ASSISTANT_ROLES and text and answer:
            return str(text), str(answer)
    return None


def prompt_set_from_rows(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    *,
    name: str,
    where: str,
    column: str | None = None,
    answer_column: str | None = None,
    require_answers: bool = False,
) -> PromptSet:
    """A prompt set from table rows (a file's, or a Hub dataset split's), in the layouts
    fine-tuning data comes in:

    * chat: a ``messages`` (or ShareGPT ``conversations``) column of turns: the last user turn
      followed by an assistant turn is the prompt and its answer;
    * Alpaca: ``instruction``, optional ``input`` (appended after a blank line), ``output``;
    * a prompt column and an answer column (prompt/completion, question/answer, ...: the
      first of :data:`PROMPT_COLUMNS` and of :data:`ANSWER_COLUMNS`), or the ones named.

    ``where`` names the source in errors. A task set (``require_answers``) must have an
    answer on every row.
    """
    if not rows:
        raise PromptSetError(
            f"prompt set {name!r} ({where}) is empty.", "Give at least one prompt."
        )
    lower = {c.lower(): c for c in columns}
    chat = next((lower[c] for c in CHAT_COLUMNS if c in lower), None)
    if column is None and answer_column is None and chat is not None:
        pairs = []
        for n, r in enumerate(rows, start=1):
            pair = _chat_pair(r.get(chat))
            if pair is None:
                raise PromptSetError(
                    f"{where} row {n}: its {chat!r} holds no user turn followed by an "
                    "assistant turn.",
                    "Give chat rows as [{role: user, content: ...}, {role: assistant, "
                    "content: ...}], or name the columns with --prompt-column/--answer-column.",
                )
            pairs.append(pair)
        return PromptSet(
            name, tuple(p for p, _ in pairs), tuple(a for _, a in pairs), f"{where} ({chat})"
        )
    alpaca = column is None and "instruction" in lower and "output" in lower
    prompt_col = _pick_column(columns, column, PROMPT_COLUMNS, where, "prompt")
    if prompt_col is None:
        raise PromptSetError(
            f"{where} has no prompt column (its columns: {', '.join(columns)}; looked for "
            f"{', '.join((*CHAT_COLUMNS, *PROMPT_COLUMNS))}).",
            "Pass the prompt column's name with --prompt-column.",
        )
    if alpaca:
        prompt_col = lower["instruction"]
        answer_column = answer_column or lower["output"]
    answer_col = _pick_column(columns, answer_column, ANSWER_COLUMNS, where, "answer")
    extra_input = lower.get("input") if alpaca else None
    prompts, answers = [], []
    for n, r in enumerate(rows, start=1):
        prompt = r.get(prompt_col)
        if prompt is None or not str(prompt).strip():
            raise PromptSetError(
                f"{where} row {n} has an empty {prompt_col!r}.", "Remove the row or fill it in."
            )
        more = r.get(extra_input) if extra_input else None
        prompts.append(f"{prompt}\n\n{more}" if more and str(more).strip() else str(prompt))
        if answer_col is not None:
            a = r.get(answer_col)
            if (a is None or not str(a).strip()) and require_answers:
                raise PromptSetError(
                    f"{where} row {n} has no answer in {answer_col!r}.",
                    "Every task row needs a prompt and its answer.",
                )
            answers.append("" if a is None else str(a))
    if require_answers and answer_col is None:
        raise PromptSetError(
            f"{where} is a task file without answers (columns: {', '.join(columns)}; looked for "
            f"{', '.join(ANSWER_COLUMNS)}).",
            "A task file needs a prompt and an answer on every row: add an answer column or name "
            "it with --answer-column.",
        )
    return PromptSet(name, tuple(prompts), tuple(answers) if answer_col else None, where)
