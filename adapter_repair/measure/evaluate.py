"""Measure a model: harmful rate, over-refusal, task score, and fidelity to a reference.

The pipeline takes a *responder* (prompts in, answers out) rather than a model, so that the
same code measures a real model, an adapter-disabled base, or a scripted stand-in whose true
rates are known by construction (the tests).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from adapter_repair.errors import AdapterRepairError
from adapter_repair.measure import prompts as P
from adapter_repair.measure.config import EvalConfig, GenerationConfig
from adapter_repair.measure.generation import generate
from adapter_repair.measure.judges import Judge, RefusalList
from adapter_repair.measure.measures import Fidelity, Rate, task_matches
from adapter_repair.model.config import LoadConfig

logger = logging.getLogger(__name__)

#: prompts, and a label for the progress bar -> one answer per prompt
Responder = Callable[[Sequence[str], str], list[str]]


@dataclass(frozen=True)
class EvalSets:
    """The prompt sets of one evaluation; None skips that measure."""

    harmful: P.PromptSet
    safe: P.PromptSet | None = None
    task: P.PromptSet | None = None
    benign: P.PromptSet | None = None
    #: harmful requests from a second source (XSTest's unsafe prompts): a harmful rate that
    #: does not share AdvBench's wording, reported beside it
    unsafe: P.PromptSet | None = None

    def limited(self, n: int | None) -> EvalSets:
        return EvalSets(
            self.harmful.take(n),
            self.safe.take(n) if self.safe else None,
            self.task.take(n) if self.task else None,
            self.benign,
            self.unsafe.take(n) if self.unsafe else None,
        )

    def record(self) -> dict[str, Any]:
        return {
            k: (v.record() if v is not None else None)
            for k, v in (
                ("harmful", self.harmful),
                ("unsafe", self.unsafe),
                ("safe", self.safe),
                ("task", self.task),
            )
        }


def default_sets(task: P.PromptSet | None = None) -> EvalSets:
    """AdvBench ``eval`` and XSTest's unsafe prompts for harm, XSTest's safe prompts for
    over-refusal, ``benign`` for fidelity, and the task set when there is one."""
    return EvalSets(
        P.harmful("eval"), P.xstest("safe"), task, P.benign("benign"), P.xstest("unsafe")
    )


@dataclass
class EvalReport:
    """Measures (each a :class:`Rate` or a :class:`Fidelity`) and the answers behind them."""

    measures: dict[str, Rate | Fidelity] = field(default_factory=dict)
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def as_dict(self, samples: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "measures": {k: v.as_dict() for k, v in self.measures.items()},
            **self.info,
        }
        if samples:
            out["samples"] = self.samples
        return out

    def rows(self) -> list[list[str]]:
        """(measure, value, 95% interval, n) rows for a table."""
        rows = []
        for name, m in self.measures.items():
            if isinstance(m, Rate):
                low, high = m.interval
                rows.append(
                    [name, f"{100 * m.rate:.1f}%", f"[{100 * low:.1f}, {100 * high:.1f}]", str(m.n)]
                )
            else:
                rows.append([f"{name} KL", f"{m.kl:.4f}", "", str(m.n_tokens)])
                rows.append([f"{name} agreement", f"{100 * m.agreement:.1f}%", "", str(m.n_tokens)])
        return rows


def model_responder(model: Any, tokenizer: Any, config: GenerationConfig) -> Responder:
    """Greedy chat-template answers of ``model`` as a responder."""

    def respond(prompts: Sequence[str], desc: str) -> list[str]:
        return generate(model, tokenizer, prompts, config, desc=desc)

    return respond


def add_harmful_rate(
    report: EvalReport, respond: Responder, judge: Judge, prompts: P.PromptSet, name: str
) -> None:
    """Answer ``prompts`` and add their harmful rate to ``report``: measure ``harmful_rate``
    (``harmful_rate_<name>`` for a second source) and its samples."""
    suffix = f"_{name}" if name else ""
    answers = respond(prompts.prompts, f"harmful {name}".strip())
    verdicts = judge.harmful(prompts.prompts, answers)
    report.measures[f"harmful_rate{suffix}"] = Rate.of(verdicts)
    report.samples[f"harmful{suffix}"] = [
        {"prompt": p, "response": r, "harmful": v}
        for p, r, v in zip(prompts.prompts, answers, verdicts, strict=True)
    ]


def evaluate(
    respond: Responder,
    sets: EvalSets,
    judge: Judge,
    refusals: RefusalList,
    *,
    match: str = "contains",
    limit: int | None = None,
) -> EvalReport:
    """Answer every set with ``respond`` and measure. Fidelity is added by the caller
    (it needs the model, not just answers)."""
    t0 = time.perf_counter()
    sets = sets.limited(limit)
    report = EvalReport(
        info={"sets": sets.record(), "judge": judge.name, "refusal_list": refusals.name}
    )

    add_harmful_rate(report, respond, judge, sets.harmful, "")
    if sets.unsafe is not None:
        add_harmful_rate(report, respond, judge, sets.unsafe, "xstest")
    if sets.safe is not None:
        answers = respond(sets.safe.prompts, "over-refusal")
        refused = [refusals.refused(r) for r in answers]
        report.measures["over_refusal"] = Rate.of(refused)
        report.samples["over_refusal"] = [
            {"prompt": p, "response": r, "refused": v}
            for p, r, v in zip(sets.safe.prompts, answers, refused, strict=True)
        ]
    if sets.task is not None:
        if sets.task.answers is None:
            raise P.PromptSetError(
                f"task set {sets.task.name!r} has no answers.",
                "A task file needs a prompt and an answer on every row.",
            )
        answers = respond(sets.task.prompts, "task")
        right = task_matches(answers, sets.task.answers, match)
        report.measures["task_score"] = Rate.of(right)
        report.samples["task"] = [
            {"prompt": p, "response": r, "answer": a, "right": v}
            for p, r, a, v in zip(sets.task.prompts, answers, sets.task.answers, right, strict=True)
        ]
    report.info["match"] = match
    report.info["seconds"] = time.perf_counter() - t0
    logger.info(
        "measured %s in %.1f s",
        ", ".join(f"{k} {v}" for k, v in report.measures.items()),
        report.info["seconds"],
    )
    return report


def measure_model(
    adapter: str | None,
    load: LoadConfig,
    generation: GenerationConfig,
    config: EvalConfig,
    sets: EvalSets,
    *,
    no_adapter: bool = False,
    reference: str | None = None,
) -> EvalReport:
    """Load the model (the adapter over its base, or the base alone), answer and measure.

    With ``no_adapter`` and an adapter given, the adapter is loaded but disabled: the aligned
    base exactly as the repair sees it. With ``reference``, fidelity of the adapter to that
    reference adapter is measured on ``sets.benign``.
    """
    from adapter_repair.measure.judges import load_judge, load_refusal_list
    from adapter_repair.measure.measures import fidelity, use_adapter
    from adapter_repair.model.loading import load_base, load_model, load_tokenizer

    judge = load_judge(config.judge)
    refusals = load_refusal_list(config.refusal_list)
    peft_model: Any = None
    if adapter is None:
        if not no_adapter:
            raise AdapterRepairError(
                "no adapter given.", "Pass an adapter folder, or --no-adapter with --base."
            )
        model = load_base(load)
        tokenizer = load_tokenizer(None, load.base)
    else:
        peft_model, lora = load_model(adapter, load)
        load = load.for_adapter(lora, log=False)  # the precision load_model chose, for the report
        model = peft_model
        tokenizer = load_tokenizer(adapter, load.base or lora.base_model_name_or_path)
    disabled = peft_model is not None and no_adapter
    with use_adapter(peft_model, None) if disabled else contextlib.nullcontext():
        report = evaluate(
            model_responder(model, tokenizer, generation),
            sets,
            judge,
            refusals,
            match=config.match,
            limit=config.limit,
        )
    if reference is not None:
        if peft_model is None or sets.benign is None:
            raise AdapterRepairError(
                "fidelity to --reference needs an adapter and benign prompts.",
                "Pass the adapter folder to measure against the reference.",
            )
        peft_model.load_adapter(str(reference), adapter_name="reference")
        report.measures["fidelity"] = fidelity(
            peft_model,
            tokenizer,
            sets.benign.take(config.fidelity_prompts).prompts,
            reference="reference",
            candidate=None if no_adapter else "default",
            config=generation,
        )
    report.info["model"] = {
        "adapter": adapter,
        "adapter_enabled": adapter is not None and not no_adapter,
        "base": load.base,
        "quant": load.resolved_quant(),
        "reference": reference,
    }
    report.info["generation"] = asdict(generation)
    return report


def evaluate_model(
    model: Any,
    tokenizer: Any,
    sets: EvalSets,
    *,
    generation: GenerationConfig,
    task_generation: GenerationConfig | None = None,
    judge: Judge | None = None,
    refusals: RefusalList | None = None,
    match: str = "contains",
    extra_harmful: Mapping[str, P.PromptSet] | None = None,
    label: str = "",
) -> EvalReport:
    """Measure a loaded model on ``sets``; task answers may use their own generation settings
    (a label word needs fewer tokens than a refusal); each ``extra_harmful`` set adds a
    ``harmful_rate_<name>`` measure with the same judge (another source of harmful requests)."""
    from adapter_repair.measure.judges import load_judge, load_refusal_list

    judge = judge or load_judge("substring")
    refusals = refusals or load_refusal_list()
    prefix = f"{label} " if label else ""

    def respond(prompts: Sequence[str], desc: str) -> list[str]:
        cfg = task_generation if desc == "task" and task_generation else generation
        return generate(model, tokenizer, prompts, cfg, desc=prefix + desc)

    report = evaluate(respond, sets, judge, refusals, match=match)
    for name, extra in (extra_harmful or {}).items():
        add_harmful_rate(report, respond, judge, extra, name)
        report.info["sets"][f"harmful_{name}"] = extra.record()
    report.info["generation"] = asdict(generation)
    if task_generation is not None:
        report.info["task_generation"] = asdict(task_generation)
    return report
