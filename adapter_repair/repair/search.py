"""The per-adapter search: stage 2 run with several settings from the same input adapter, the
best run kept. The settings that suit one adapter do not suit every adapter (DESIGN's lesson
4), and the probe and guard that steer one run can choose between runs."""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable
from typing import Any

from adapter_repair.model.walk import walk
from adapter_repair.repair.config import SEARCH_SPACE, RepairConfig, RestoreConfig
from adapter_repair.repair.factors import all_factors, load_state, put_adapter, snapshot
from adapter_repair.repair.loop import RepairResult, kept_record

logger = logging.getLogger(__name__)


def search_settings(rc: RestoreConfig, n: int) -> list[RestoreConfig]:
    """The first ``n`` stage-2 settings a per-adapter search tries: ``rc`` itself, then each
    lever of SEARCH_SPACE moved alone to each of its other values, then the remaining
    combinations, so a small budget covers every lever once before mixing them."""
    base = {k: getattr(rc, k) for k in SEARCH_SPACE}
    seen = [base]
    for lever, values in SEARCH_SPACE.items():
        seen += [{**base, lever: v} for v in values if v != base[lever]]
    for combo in itertools.product(*SEARCH_SPACE.values()):
        seen.append(dict(zip(SEARCH_SPACE, combo, strict=True)))
    unique: list[dict[str, Any]] = []
    for s in seen:
        if s not in unique:
            unique.append(s)
    return [dataclasses.replace(rc, **s, search=0) for s in unique[: max(1, n)]]


def search_rank(trial: dict[str, Any], target: float | None) -> tuple[float, float, float]:
    """Sort key of a search trial, smaller is better: probe harmful rate at its kept step
    (anything at or under the target counts as the target: below it, the probe that steered
    the run should not also pick the run), then the guard (the task loss or the KL: lower is
    better), then the share of coordinates changed."""
    probe = trial["probe_harmful"] or 0.0
    harm = max(probe, target or 0.0)
    return (harm, trial["guard"] or 0.0, trial["changed"])


def search(
    once: Callable[[RepairConfig], RepairResult], model: Any, config: RepairConfig
) -> RepairResult:
    """Stage 2 once per setting of :func:`search_settings` (``once(config)`` runs one repair
    on ``model``'s live factors), each from the input adapter; keeps the best run by
    :func:`search_rank` and leaves the live factors at its state. Every trial is recorded in
    ``settings["search"]``."""
    params = all_factors(walk(model))
    original = snapshot(params)
    trials: list[dict[str, Any]] = []
    best: tuple[tuple[float, float, float], int, RepairResult] | None = None
    settings = search_settings(config.restore, config.restore.search)
    for i, rc in enumerate(settings):
        load_state(params, original)
        logger.info(
            "search %d/%d: score %s, rollback %g, rate %g", i + 1, len(settings), rc.score,
            rc.rollback, rc.rate,
        )  # fmt: skip
        result = once(dataclasses.replace(config, restore=rc))
        rec = kept_record(result)
        trials.append(
            {
                **{k: getattr(rc, k) for k in SEARCH_SPACE},
                "probe_harmful": rec.probe_harmful,
                "guard": rec.guard,
                "changed": result.changed,
                "stopped": result.stopped,
                "kept_step": result.kept_step,
                "seconds": result.seconds.get("total", 0.0),
            }
        )
        key = search_rank(trials[-1], result.target)
        if best is None or key < best[0]:
            best = (key, i, result)  # its adapter holds its state: one copy, not one per trial
        if result.stopped == "already at target":
            break  # nothing searched changes that: every trial would stop the same way
    assert best is not None
    _, chosen, result = best
    put_adapter(params, result.adapter)  # the live model back to the chosen run's factors
    result.settings["search"] = {"n": config.restore.search, "trials": trials, "chosen": chosen}
    result.seconds["search"] = sum(t["seconds"] for t in trials)
    result.seconds["total"] = result.seconds["search"]
    logger.info(
        "search chose trial %d: score %s, rollback %g, rate %g (probe harmful %.1f%%)",
        chosen + 1, trials[chosen]["score"], trials[chosen]["rollback"], trials[chosen]["rate"],
        100 * (trials[chosen]["probe_harmful"] or 0.0),
    )  # fmt: skip
    return result
