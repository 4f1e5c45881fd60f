"""The task guard: what protects the fine-tune's task while stage 2 restores coordinates.

With task rows (prompt, answer) the guard is the task score by a match rule, which may fall at
most ``max_drop`` (relative) below the fine-tuned adapter's; without, it is fidelity to the
fine-tuned adapter on benign prompts (mean next-token KL at most ``max_kl``). The guard's rows
are split so that the rows its loss is fit on are not the rows it is checked on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from adapter_repair.measure import prompts as P
from adapter_repair.measure.config import GenerationConfig
from adapter_repair.measure.generation import generate
from adapter_repair.measure.measures import Rate, fidelity, task_matches
from adapter_repair.repair.config import RepairConfig
from adapter_repair.repair.factors import ADAPTER, REFERENCE
from adapter_repair.repair.losses import answer_batches


@dataclass
class Guard:
    """What the task guard compares: task rows (prompt, answer) scored by a match rule, or,
    without task data, benign prompts and fidelity to the fine-tuned adapter."""

    task: P.PromptSet | None
    benign: P.PromptSet
    match: str = "contains"

    @property
    def kind(self) -> str:
        return "task" if self.task is not None else "fidelity"

    def prompts(self) -> tuple[str, ...]:
        return self.task.prompts if self.task is not None else self.benign.prompts

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


def guard_value(model: Any, tokenizer: Any, guard: Guard, gen: GenerationConfig) -> float:
    """Task score (higher is better) or KL to the fine-tuned adapter (lower is better)."""
    if guard.task is not None:
        answers = generate(model, tokenizer, guard.task.prompts, gen, desc="guard")
        return Rate.of(task_matches(answers, guard.task.answers or (), guard.match)).rate
    fid = fidelity(
        model, tokenizer, guard.benign.prompts, reference=REFERENCE, candidate=ADAPTER, config=gen
    )
    return fid.kl


def guard_answers(model: Any, tokenizer: Any, guard: Guard, gen: GenerationConfig) -> list[Any]:
    """The answers the guard's loss protects, as batches: the task rows' answers, or the model's
    own greedy answers to the benign prompts (call it with the fine-tuned adapter on); an answer
    that ran to the token limit stays open (no end token is added)."""
    if guard.task is not None and guard.task.answers:
        pairs = list(zip(guard.task.prompts, guard.task.answers, strict=True))
        ended = None
    else:
        prompts = guard.benign.prompts
        texts = generate(model, tokenizer, prompts, gen, desc="guard answers")
        pairs = list(zip(prompts, texts, strict=True))
        lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        ended = [n < gen.max_new_tokens for n in lengths]
    return answer_batches(tokenizer, pairs, gen.batch_size, gen.max_new_tokens, ended)


def guard_holds(value: float, reference: float, guard: Guard, config: RepairConfig) -> bool:
    if guard.kind == "task":
        return value >= reference * (1.0 - config.restore.max_drop) - 1e-12
    return value <= config.restore.max_kl
