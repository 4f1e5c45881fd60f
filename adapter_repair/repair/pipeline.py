"""The repair as callers use it: :func:`repair` on a loaded PeftModel (stage 1, stage 2, or the
per-adapter search over stage 2), and :func:`repair_folder`, adapter folder in, adapter folder
out, with the before/after measures and the report written beside the adapter.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapter_repair.adapter import LoraAdapter, check_output_folder, same_path, save_adapter
from adapter_repair.errors import AdapterFormatError, NothingToRepair
from adapter_repair.measure import prompts as P
from adapter_repair.measure.config import EvalConfig, GenerationConfig
from adapter_repair.measure.evaluate import EvalSets, evaluate_model
from adapter_repair.measure.judges import Judge, load_judge, load_refusal_list
from adapter_repair.measure.measures import use_adapter
from adapter_repair.model.config import LoadConfig
from adapter_repair.model.loading import load_model, load_tokenizer
from adapter_repair.model.walk import walk
from adapter_repair.repair.config import RepairConfig
from adapter_repair.repair.factors import all_factors, put_adapter
from adapter_repair.repair.guard import Guard
from adapter_repair.repair.loop import RepairResult, Step, repair_once
from adapter_repair.repair.report import write_report
from adapter_repair.repair.search import search
from adapter_repair.version import __version__

logger = logging.getLogger(__name__)


def repair(
    model: Any,
    tokenizer: Any,
    adapter: LoraAdapter,
    config: RepairConfig,
    *,
    probe: P.PromptSet,
    guard: Guard,
    judge: Judge,
    generation: GenerationConfig | None = None,
    keep_checkpoints: bool = False,
    on_step: Callable[[Step], None] | None = None,
) -> RepairResult:
    """Repair ``adapter``, attached to ``model`` (a PeftModel, adapter name "default", factors
    trainable) as the fine-tuned model; the same model with the adapter disabled is the aligned
    one. The live factors are changed in place; the result holds a copy as a LoraAdapter.

    ``probe``: harmful prompts the repair may use (directions, gradients, stop rule).
    ``guard``: task rows or benign prompts that protect what the fine-tune learnt.
    ``keep_checkpoints``: also return the adapter at every measured step that held (one copy
    each), so a benchmark can score the whole path, not only where the stop rule ended.

    With ``config.restore.search`` > 1, stage 2 runs once per setting of
    :func:`~adapter_repair.repair.search.search_settings`, each from the input adapter, and
    the best run by :func:`~adapter_repair.repair.search.search_rank` is kept (lowest probe
    harmful rate at its kept step down to the target, then the best guard, then the fewest
    coordinates changed): the settings that suit one adapter do not suit every adapter
    (DESIGN's lesson 4), and the probe and guard that steer one run can choose between runs.
    Every trial is recorded in ``settings["search"]``.

    ``on_step`` gets each stage-2 history entry as it is made (a progress display).
    """

    generated: dict[str, Any] = {}  # a search's trials generate each answer set once

    def once(cfg: RepairConfig) -> RepairResult:
        return repair_once(
            model, tokenizer, adapter, cfg, probe=probe, guard=guard, judge=judge,
            generation=generation, keep_checkpoints=keep_checkpoints, on_step=on_step,
            generated=generated,
        )  # fmt: skip

    if config.restore.search <= 1 or config.method == "project":
        return once(config)
    return search(once, model, config)


@dataclass
class RepairOutcome:
    """What :func:`repair_folder` did: the result, the report written beside the adapter, and
    where."""

    result: RepairResult
    report: dict[str, Any]
    out: Path


def measure_other_precision(
    source: str | os.PathLike[str],
    load: LoadConfig,
    tokenizer: Any,
    repaired: LoraAdapter,
    sets: EvalSets,
    gen: GenerationConfig,
    judge: Judge,
    refusals: Any,
    match: str,
) -> dict[str, Any]:
    """The harmful rates (``sets``' harmful and unsafe prompts) of the aligned base, the
    fine-tuned and the ``repaired`` adapter over the base loaded at the other precision: 4-bit
    NF4 when ``load`` is unquantized, else unquantized in ``load``'s dtype. A QLoRA adapter is
    used both ways, and its refusals differ between them."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # what the first model held, before the second load
    quant = "4bit" if load.resolved_quant() == "none" else "none"
    logger.info("measuring at the other precision (quant %s)", quant)
    model, _ = load_model(source, dataclasses.replace(load, quant=quant))
    harm_only = EvalSets(sets.harmful, unsafe=sets.unsafe)

    def rates(label: str) -> dict[str, Any]:
        report = evaluate_model(
            model, tokenizer, harm_only, generation=gen, judge=judge, refusals=refusals,
            match=match, label=f"{label} ({quant})",
        )  # fmt: skip
        return {k: v.as_dict() for k, v in report.measures.items()}

    out: dict[str, Any] = {"quant": quant}
    with use_adapter(model, None):
        out["aligned"] = rates("aligned")
    out["before"] = rates("fine-tuned")
    put_adapter(all_factors(walk(model)), repaired)
    out["after"] = rates("repaired")
    return out  # the model goes with this frame


def repair_folder(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    load: LoadConfig | None = None,
    config: RepairConfig | None = None,
    evaluation: EvalConfig | None = None,
    generation: GenerationConfig | None = None,
    task: P.PromptSet | None = None,
    measure: bool = True,
    overwrite: bool = False,
    provenance: Mapping[str, Any] | None = None,
    also: Callable[[Path, Mapping[str, Any]], object] | None = None,
    source_label: str | None = None,
    base_label: str | None = None,
    min_harmful: float | None = None,
    on_step: Callable[[Step], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> RepairOutcome:
    """Repair the adapter folder ``source`` into a new folder ``out`` (same format and rank,
    with ``repair_report.{json,md,png}``), measuring the aligned base, the fine-tuned and the
    repaired adapter before and after unless ``measure`` is False. ``source`` is only read.

    ``source_label`` and ``base_label`` name the source and the base in the report (default:
    their paths; a Hub repo's ``owner/name@sha`` rather than its cache folder).
    ``min_harmful``: after measuring the fine-tuned adapter, raise :class:`NothingToRepair`
    when its harmful rate is under this (needs ``measure``). ``provenance`` (where source and base came from: repo ids and commit shas) goes into the
    report as given; ``also(folder, report)`` writes more files (a model card) into the output
    before it appears, so that the adapter, its report and those files land together or not
    at all. ``on_step`` gets each stage-2 history entry as it is made and ``on_phase`` the
    name of each phase as it starts (measuring, repairing): a progress display.

    ``task``: the user's task rows (prompt, answer), split by a seeded hash of the prompt
    (:func:`~adapter_repair.measure.prompts.split_task`; by answer too for ``--match choice``)
    into ``fit`` rows (the task loss the repair protects), ``guard`` rows (the guard) and
    ``score`` rows, the only ones the before/after table reports; the report records each
    part's rows. Without task rows the guard is fidelity to the fine-tuned adapter on the
    shipped benign prompts.
    """
    load = load or LoadConfig()
    config = config or RepairConfig()
    evaluation = evaluation or EvalConfig()
    out_path = Path(out)
    check_output_folder(out_path, overwrite)
    if out_path.exists() and same_path(out_path, Path(source)):
        raise AdapterFormatError(
            f"refusing to write over the input adapter {source}.",
            "Choose a different --out folder; the input is never modified.",
        )
    # the task split first: too few rows is an error before any weight is read
    parts = P.split_task(task, stratify=evaluation.match == "choice") if task is not None else None
    gen = generation or GenerationConfig(config.max_new_tokens, config.batch_size)
    judge = load_judge(evaluation.judge)
    refusals = load_refusal_list(evaluation.refusal_list)
    model, adapter = load_model(source, load)
    load = load.for_adapter(adapter, log=False)  # the precision load_model chose, for the report
    tokenizer = load_tokenizer(source, load.base or adapter.base_model_name_or_path)
    score = parts["score"] if parts is not None else None
    sets = EvalSets(P.harmful("eval"), P.xstest("safe"), score, unsafe=P.xstest("unsafe")).limited(
        evaluation.limit
    )

    def phase(name: str) -> None:
        logger.info(name)
        if on_phase is not None:
            on_phase(name)

    warnings = []
    if adapter.extra_tensors:
        warnings.append(
            f"the adapter carries {len(adapter.extra_tensors)} modules_to_save tensor(s); they "
            "are copied unchanged and may still carry the fine-tune's behaviour."
        )
        logger.warning(warnings[-1])

    def measure_now(label: str) -> dict[str, Any]:
        report = evaluate_model(
            model,
            tokenizer,
            sets,
            generation=gen,
            judge=judge,
            refusals=refusals,
            match=evaluation.match,
            label=label,
        )
        return {k: v.as_dict() for k, v in report.measures.items()}

    t0 = time.perf_counter()
    measures: dict[str, Any] = {}
    if measure:
        phase("measuring the aligned base (adapter disabled)")
        with use_adapter(model, None):
            measures["aligned"] = measure_now("aligned")
        phase("measuring the fine-tuned adapter")
        measures["before"] = measure_now("fine-tuned")
        harmful = measures["before"]["harmful_rate"]["rate"]
        if min_harmful is not None and harmful < min_harmful:
            raise NothingToRepair(harmful, min_harmful)
    phase(f"repairing (method {config.method})")
    measure_seconds = time.perf_counter() - t0
    result = repair(
        model,
        tokenizer,
        adapter,
        config,
        probe=P.harmful("probe"),
        guard=Guard(
            parts["guard"] if parts is not None else None,
            P.benign("benign"),
            evaluation.match,
            fit=parts["fit"] if parts is not None else None,
        ),
        judge=judge,
        generation=dataclasses.replace(gen, progress=False),
        on_step=on_step,
    )
    outside = result.settings.get("outside_modules") or []
    if outside:
        warnings.append(
            f"{len(outside)} LoRA module(s) outside the decoder layers are copied unchanged and "
            f"may still carry the fine-tune's behaviour: {', '.join(outside)}."
        )
    t0 = time.perf_counter()
    other: dict[str, Any] | None = None
    if measure:
        phase("measuring the repaired adapter")
        measures["after"] = measure_now("repaired")
        if evaluation.other_precision:
            del model  # the second load comes after the first is freed
            gc.collect()
            phase("measuring at the other precision")
            other = measure_other_precision(
                source,
                load,
                tokenizer,
                result.adapter,
                sets,
                gen,
                judge,
                refusals,
                evaluation.match,
            )
    measure_seconds += time.perf_counter() - t0
    report: dict[str, Any] = {
        "tool_version": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source_label or str(source),
        "base": base_label or load.base or adapter.base_model_name_or_path,
        "quant": load.resolved_quant(),
        "method": config.method,
        "measures": measures,
        "other_precision": other,
        "measure_seconds": measure_seconds,
        "sets": sets.record(),
        "task_rows": P.task_split_record(parts) if parts is not None else None,
        "splits": P.split_record(),
        "judge": judge.name,
        "generation": dataclasses.asdict(gen),
        "repair": result.as_dict(),
        "warnings": warnings,
        # every setting as resolved (the precision load_model chose included): `fix --config
        # repair_report.json` reruns the same repair
        "config": {
            "load": dataclasses.asdict(load),
            "repair": dataclasses.asdict(config),
            "evaluation": dataclasses.asdict(evaluation),
            "measure": measure,
        },
    }
    if provenance:
        report["provenance"] = dict(provenance)

    def write_extra(folder: Path) -> None:
        write_report(folder, report)
        if also is not None:
            also(folder, report)

    path = save_adapter(result.adapter, out_path, overwrite=overwrite, also=write_extra)
    return RepairOutcome(result, report, path)
