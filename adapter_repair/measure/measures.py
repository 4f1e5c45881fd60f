"""The measures every number of the project comes from.

* harmful rate: share of harmful requests the model answers (by a :class:`Judge`), with a 95%
  Wilson interval, since these sets hold a hundred or two prompts and a bare rate hides that;
* over-refusal: share of safe prompts the model refuses (by a refusal list);
* task score: share of task prompts answered right (exact, contains or choice match);
* fidelity of one adapter to another: mean next-token KL and greedy-token agreement over the
  reference's own greedy answers (teacher-forced), for when no task data is given.

The rate functions are pure (prompts and responses in, numbers out); only :func:`fidelity`
runs the model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from adapter_repair.measure.config import MATCH_RULES, GenerationConfig
from adapter_repair.measure.generation import generate_ids
from adapter_repair.measure.judges import Judge, RefusalList
from adapter_repair.model.inputs import model_device, pad_left, pad_token_id, position_ids_for

Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for k successes in n trials."""
    if n <= 0:
        raise ValueError("a rate needs n >= 1")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Rate:
    """k of n, with its 95% Wilson interval."""

    k: int
    n: int

    @property
    def rate(self) -> float:
        return self.k / self.n

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.k, self.n)

    def as_dict(self) -> dict[str, Any]:
        low, high = self.interval
        return {"k": self.k, "n": self.n, "rate": self.rate, "ci95": [low, high]}

    def __str__(self) -> str:
        low, high = self.interval
        return f"{100 * self.rate:.1f}% [{100 * low:.1f}, {100 * high:.1f}] (n={self.n})"

    @classmethod
    def of(cls, flags: Sequence[bool]) -> Rate:
        return cls(sum(bool(f) for f in flags), len(flags))


def harmful_rate(prompts: Sequence[str], responses: Sequence[str], judge: Judge) -> Rate:
    """Share of harmful ``prompts`` whose response the judge calls harmful compliance."""
    return Rate.of(judge.harmful(prompts, responses))


def refusal_rate(responses: Sequence[str], refusals: RefusalList) -> Rate:
    """Share of responses that are refusals (over-refusal, on safe prompts)."""
    return Rate.of([refusals.refused(r) for r in responses])


def _norm(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .!")


def task_matches(
    responses: Sequence[str], answers: Sequence[str], match: str = "contains"
) -> list[bool]:
    """Per response, is it right?

    ``exact``: equal after lowercasing and collapsing whitespace (and trailing ``.!``);
    ``contains``: the answer occurs in the response (same normalisation);
    ``choice``: the answers of the set are the choices (e.g. positive / negative); the one
    named first in the response must be the right one.
    """
    if match not in MATCH_RULES:
        raise ValueError(f"match must be one of {', '.join(MATCH_RULES)}; got {match!r}")
    if match == "exact":
        return [_norm(r) == _norm(a) for r, a in zip(responses, answers, strict=True)]
    if match == "contains":
        return [_norm(a) in _norm(r) for r, a in zip(responses, answers, strict=True)]
    choices = sorted({_norm(a) for a in answers}, key=len, reverse=True)
    pattern = re.compile(r"\b(" + "|".join(re.escape(c) for c in choices) + r")\b")
    out = []
    for r, a in zip(responses, answers, strict=True):
        m = pattern.search(_norm(r))
        out.append(m is not None and m.group(1) == _norm(a))
    return out


def task_score(responses: Sequence[str], answers: Sequence[str], match: str = "contains") -> Rate:
    return Rate.of(task_matches(responses, answers, match))


@contextmanager
def use_adapter(model: Any, name: str | None) -> Iterator[None]:
    """Run ``model`` (a PeftModel) with adapter ``name`` active, or with none (the base)."""
    if name is None:
        with model.disable_adapter():
            yield
        return
    previous = model.active_adapter
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter(previous)


@dataclass(frozen=True)
class Fidelity:
    """How closely a candidate adapter follows a reference on the reference's own answers."""

    kl: float  #: mean next-token KL(reference || candidate), nats per answer token
    agreement: float  #: share of answer tokens where both greedy choices agree
    n_tokens: int
    n_prompts: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "kl": self.kl,
            "agreement": self.agreement,
            "n_tokens": self.n_tokens,
            "n_prompts": self.n_prompts,
        }


def _answer_log_probs(
    model: Any, seqs: Sequence[Sequence[int]], n_answer: Sequence[int], pad: int
) -> list[torch.Tensor]:
    """Per sequence, log-probabilities at the positions that predict its answer tokens,
    (n_answer_i, vocab) each."""
    ids, mask = pad_left(seqs, pad)
    device = model_device(model)
    with torch.no_grad():
        logits = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=position_ids_for(mask).to(device),
            use_cache=False,
        ).logits.float()  # (batch, seq, vocab)
    width = ids.shape[1]
    return [
        F.log_softmax(logits[row, width - 1 - k : width - 1], dim=-1).cpu()
        for row, k in enumerate(n_answer)
    ]


def fidelity(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    reference: str | None,
    candidate: str | None,
    config: GenerationConfig | None = None,
) -> Fidelity:
    """Fidelity of adapter ``candidate`` to adapter ``reference`` (names of adapters loaded in
    the PeftModel ``model``; None is the base with adapters disabled)."""
    config = config or GenerationConfig()
    with use_adapter(model, reference):
        prompt_ids, answer_ids = generate_ids(model, tokenizer, prompts, config, desc="reference")
    pad = pad_token_id(tokenizer)
    kl_sum, agree, total = 0.0, 0, 0
    for start in range(0, len(prompts), config.batch_size):
        rows = [
            (p, a)
            for p, a in zip(
                prompt_ids[start : start + config.batch_size],
                answer_ids[start : start + config.batch_size],
                strict=True,
            )
            if a
        ]
        if not rows:
            continue
        seqs = [p + a for p, a in rows]
        n_answer = [len(a) for _, a in rows]
        with use_adapter(model, reference):
            ref = _answer_log_probs(model, seqs, n_answer, pad)
        with use_adapter(model, candidate):
            cand = _answer_log_probs(model, seqs, n_answer, pad)
        for r, c in zip(ref, cand, strict=True):
            kl_sum += float((r.exp() * (r - c)).sum())
            agree += int((r.argmax(-1) == c.argmax(-1)).sum())
            total += r.shape[0]
    if total == 0:
        return Fidelity(kl=0.0, agreement=1.0, n_tokens=0, n_prompts=len(prompts))
    return Fidelity(
        kl=kl_sum / total, agreement=agree / total, n_tokens=total, n_prompts=len(prompts)
    )
