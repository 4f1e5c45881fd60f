"""The task guard: what protects the fine-tune's task while stage 2 restores coordinates.

The guard is a continuous quantity that moves before accuracy does and needs no generation
(a 0/1 score on a few dozen rows read flat while held-out accuracy fell). With task rows
(prompt, answer) it is the task loss of the gold answers, teacher-forced: the mean negative
log-probability per answer token, or, for a choice task, minus the mean margin of the gold
answer's log-probability over the best other choice, in the answer class where it is worst
(a shift toward one answer, the way restored refusals lean a sentiment task toward
"negative", lowers one class's margins as much as it raises the other's: their mean over a
balanced set does not move while accuracy falls). The loss may rise at most ``max_rise`` nats
above the fine-tuned adapter's, the choice margin fall at most ``max_margin_drop`` (its own
scale). Without task rows it is fidelity to the fine-tuned adapter on
benign prompts (mean next-token KL at most ``max_kl``). Lower is better for both. The rows its
loss is fit on are never the rows it is checked on; task accuracy is still measured and
reported beside it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from adapter_repair.measure import prompts as P
from adapter_repair.measure.config import GenerationConfig
from adapter_repair.measure.generation import generate
from adapter_repair.measure.measures import Rate, fidelity, task_matches
from adapter_repair.model.answers import answer_logprobs, encode_pairs, right_padded
from adapter_repair.model.inputs import model_device, pad_token_id
from adapter_repair.repair.config import RepairConfig
from adapter_repair.repair.factors import ADAPTER, REFERENCE
from adapter_repair.repair.losses import (
    MAX_PROMPT_TOKENS,
    answer_batches,
    generated_answer_batches,
)

#: A choice task's guard compares every choice when there are at most this many distinct
#: answers; with more it is the gold answers' loss.
MAX_CHOICES = 16


@dataclass
class Guard:
    """What the task guard compares: task rows (prompt, answer) scored by a match rule, or,
    without task data, benign prompts and fidelity to the fine-tuned adapter."""

    task: P.PromptSet | None
    benign: P.PromptSet
    match: str = "contains"
    #: task rows the benign loss is fit on, disjoint from ``task`` (the rows that check)
    fit: P.PromptSet | None = None
    #: a choice task's answers to compare (default: those of ``task``)
    choices: tuple[str, ...] | None = None

    @property
    def kind(self) -> str:
        return "task" if self.task is not None else "fidelity"

    def prompts(self) -> tuple[str, ...]:
        return self.task.prompts if self.task is not None else self.benign.prompts

    def split(self, hold_out: bool, fit_rows: int = 0) -> tuple[Guard, Guard]:
        """(fit, check): the given ``fit`` rows (at most ``fit_rows``; 0: all) against the
        check rows; else, with ``hold_out``, :meth:`halves`; else the same rows for both."""
        parts = [part for part in (self.fit, self.task) if part is not None]
        every = [a for part in parts for a in (part.answers or ())]
        choices = self.choices or (distinct_answers(every) if every else None)
        if self.fit is not None:
            fit = self.fit.take(fit_rows) if fit_rows else self.fit
            return (
                Guard(fit, self.benign.every(2, 0), self.match, choices=choices),
                Guard(self.task, self.benign.every(2, 1), self.match, choices=choices),
            )
        if hold_out and len(self.prompts()) >= 2:
            fit_part, check = self.halves(fit_rows)
            return (
                dataclasses.replace(fit_part, choices=choices),
                dataclasses.replace(check, choices=choices),
            )
        return dataclasses.replace(self, choices=choices), dataclasses.replace(
            self, choices=choices
        )

    def halves(self, fit_rows: int = 0) -> tuple[Guard, Guard]:
        """(fit, check): every other row for the benign loss, the rest for the guard; with
        ``fit_rows``, only the first ``fit_rows`` of the even rows fit and every other row
        checks (a bigger check set, the same cost per step)."""
        n = len(self.prompts())
        fit_idx = list(range(0, n, 2))
        if fit_rows:
            fit_idx = fit_idx[:fit_rows]
        chosen = set(fit_idx)
        check_idx = [i for i in range(n) if i not in chosen]

        def part(idx: list[int], label: str, start: int) -> Guard:
            if self.task is None:
                return Guard(None, self.benign.subset(idx, label), self.match)
            return Guard(self.task.subset(idx, label), self.benign.every(2, start), self.match)

        return part(fit_idx, "fit", 0), part(check_idx, "check", 1)


def answer_key(answer: str) -> str:
    """What makes two answers the same choice: case and surrounding space do not count."""
    return answer.strip().lower()


def distinct_answers(answers: Sequence[str]) -> tuple[str, ...]:
    """The distinct choices among ``answers`` (by :func:`answer_key`), each in its first
    spelling, in key order."""
    first: dict[str, str] = {}
    for a in answers:
        first.setdefault(answer_key(a), a)
    return tuple(first[k] for k in sorted(first))


def guard_value(model: Any, tokenizer: Any, guard: Guard, gen: GenerationConfig) -> float:
    """The guard's quantity, lower is better: the task loss of the gold answers
    (:func:`task_loss`) or the KL to the fine-tuned adapter."""
    if guard.task is not None:
        return task_loss(model, tokenizer, guard.task, guard.match, gen, guard.choices)
    fid = fidelity(
        model, tokenizer, guard.benign.prompts, reference=REFERENCE, candidate=ADAPTER, config=gen
    )
    return fid.kl


def guard_accuracy(model: Any, tokenizer: Any, guard: Guard, gen: GenerationConfig) -> float | None:
    """The task score of the check rows by generation (reported beside the guard); None
    without task rows."""
    if guard.task is None:
        return None
    answers = generate(model, tokenizer, guard.task.prompts, gen, desc="guard accuracy")
    return Rate.of(task_matches(answers, guard.task.answers or (), guard.match)).rate


def _answer_logprobs(
    model: Any, tokenizer: Any, pairs: list[tuple[str, str]], gen: GenerationConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each (prompt, answer)'s summed answer log-probability and token count, in order."""
    examples = encode_pairs(tokenizer, pairs, MAX_PROMPT_TOKENS, gen.max_new_tokens)
    pad, device = pad_token_id(tokenizer), model_device(model)
    sums, counts = [], []
    for i in range(0, len(examples), gen.batch_size):
        ids, mask, labels = right_padded(examples[i : i + gen.batch_size], pad)
        s, n = answer_logprobs(model, ids.to(device), mask.to(device), labels.to(device))
        sums.append(s.cpu())
        counts.append(n.cpu())
    return torch.cat(sums), torch.cat(counts)  # (n,), (n,)


@torch.no_grad()
def task_loss(
    model: Any,
    tokenizer: Any,
    task: P.PromptSet,
    match: str,
    gen: GenerationConfig,
    choices: Sequence[str] | None = None,
) -> float:
    """The task loss the guard watches, lower is better. A choice task with 2 to MAX_CHOICES
    distinct answers (``choices``, default those of ``task``; compared without case and
    surrounding space): minus the mean over rows of log p(gold) - max over the other choices
    of log p(choice), the answers scored whole (with their end token), taken per gold answer
    and the worst of those means returned (see the module docstring); otherwise the mean
    negative log-probability per token of the gold answers."""
    answers = list(task.answers or ())
    if len(answers) != len(task):
        raise ValueError("the task guard needs an answer for every row")
    options = list(distinct_answers([*(choices or ()), *answers]))
    keys = [answer_key(c) for c in options]
    if match == "choice" and 2 <= len(options) <= MAX_CHOICES:
        choices = options
        per_choice = [
            _answer_logprobs(model, tokenizer, [(p, c) for p in task.prompts], gen)[0]
            for c in choices
        ]
        lp = torch.stack(per_choice, 1)  # (n, k)
        rows = torch.arange(len(answers))
        gold = torch.tensor([keys.index(answer_key(a)) for a in answers])
        others = lp.clone()
        others[rows, gold] = -torch.inf
        margin = lp[rows, gold] - others.max(1).values  # (n,)
        return max(float(-margin[gold == k].mean()) for k in gold.unique())
    sums, counts = _answer_logprobs(
        model, tokenizer, list(zip(task.prompts, answers, strict=True)), gen
    )
    return float(-sums.sum() / counts.sum().clamp(min=1))


def guard_answers(model: Any, tokenizer: Any, guard: Guard, gen: GenerationConfig) -> list[Any]:
    """The answers the guard's loss protects, as batches: the task rows' answers, or the model's
    own greedy answers to the benign prompts (call it with the fine-tuned adapter on); an answer
    that ran to the token limit stays open (no end token is added)."""
    if guard.task is not None and guard.task.answers:
        pairs = list(zip(guard.task.prompts, guard.task.answers, strict=True))
        return answer_batches(tokenizer, pairs, gen.batch_size, gen.max_new_tokens)
    prompts = guard.benign.prompts
    texts = generate(model, tokenizer, prompts, gen, desc="guard answers")
    pairs = list(zip(prompts, texts, strict=True))
    return generated_answer_batches(tokenizer, pairs, gen.batch_size, gen.max_new_tokens)


def task_allowance(match: str, config: RepairConfig) -> float:
    """How far the task guard's value may rise above the fine-tuned adapter's: a choice
    task's margin and a generated answer's loss per token live on different scales."""
    return float(getattr(config.restore, config.restore.allowance_name(match)))


def guard_holds(value: float, reference: float, guard: Guard, config: RepairConfig) -> bool:
    """Task: the loss at most ``max_rise`` above the fine-tuned adapter's (a choice task's
    margin at most ``max_margin_drop`` below it); fidelity: the KL at most ``max_kl``."""
    if guard.kind == "task":
        return value <= reference + task_allowance(guard.match, config) + 1e-12
    return value <= config.restore.max_kl
